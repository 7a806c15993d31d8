"""Kernel variants of docs/RESULTS.md's fourth issue-31 session, call 1 (run at commit 8e69030, where
nvfp4.kernels._fp8_kernel is the kernel that transposes int32 bytes; fp8_b at 64 x 64 is the kernel
since commit 6d71e8a):
    python tools/kernel_variants.py fp8     # FP8 transposed-copy variants: bitwise against the kernel, then us
    python tools/kernel_variants.py sweep   # NVFP4 quantize: tile widths x warps at the small step's shapes
    python tools/kernel_variants.py eager   # one eager layer: host time per piece, torch.profiler CPU table
    python tools/kernel_variants.py eager-ab  # the eager layer A/B of call 3 (at commit d7258cb, see below)
"""
import sys, time, itertools, torch, triton
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import triton.language as tl
from nvfp4 import kernels
from nvfp4.kernels import _to_fp8, _fp8_byte
@triton.jit
def _scale_of(amax_ptr, scale_inv_ptr, FP8_MAX: tl.constexpr, X_MAX: tl.constexpr):
    amax = tl.load(amax_ptr)
    scale = tl.math.div_rn(tl.full(amax.shape, FP8_MAX, tl.float32), amax)
    scale = tl.where(scale == float("inf"), X_MAX, scale)
    scale = tl.where(amax == 0.0, 1.0, scale)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(scale_inv_ptr, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale))
    return scale

@triton.jit
def _words(b):  # [C, W, 4] int32 bytes -> [C, W] words, j-th byte at bits 8j
    C: tl.constexpr = b.shape[0]
    W: tl.constexpr = b.shape[1]
    even, odd = tl.split(tl.reshape(b, (C, W, 2, 2)))
    low, high = tl.split(even | (odd << 8))
    return low | (high << 16)

@triton.jit
def fp8_a(x_ptr, amax_ptr, out_ptr, out_t_words_ptr, scale_inv_ptr, rows, cols, FP8_MAX: tl.constexpr,
          X_MAX: tl.constexpr, ROWWISE: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_C: tl.constexpr):
    """A: the transposed copy from a second, column-ordered load of the tile (L1 hits), each thread 4 rows."""
    scale = _scale_of(amax_ptr, scale_inv_ptr, FP8_MAX, X_MAX)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    if ROWWISE:
        x = tl.load(x_ptr + r[:, None] * cols + c[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + r[:, None] * cols + c[None, :], _to_fp8(x.to(tl.float32) * scale, out_ptr.dtype.element_ty), mask=mask)
    if TRANSPOSED:
        w = tl.program_id(0) * (BLOCK_R // 4) + tl.arange(0, BLOCK_R // 4)
        j = tl.arange(0, 4)
        rr = 4 * w[None, :, None] + j[None, None, :]
        xt = tl.load(x_ptr + rr * cols + c[:, None, None], mask=(rr < rows) & (c[:, None, None] < cols), other=0.0)
        word = _words(_fp8_byte(xt.to(tl.float32) * scale, out_ptr.dtype.element_ty))
        tl.store(out_t_words_ptr + c[:, None] * (rows // 4) + w[None, :], word,
                 mask=(c[:, None] < cols) & (w[None, :] * 4 < rows))

@triton.jit
def fp8_b(x_ptr, amax_ptr, out_ptr, out_t_words_ptr, scale_inv_ptr, rows, cols, FP8_MAX: tl.constexpr,
          X_MAX: tl.constexpr, ROWWISE: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_C: tl.constexpr):
    """B: tl.trans of the 16-bit tile, then bytes and words."""
    scale = _scale_of(amax_ptr, scale_inv_ptr, FP8_MAX, X_MAX)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    x = tl.load(x_ptr + r[:, None] * cols + c[None, :], mask=mask, other=0.0)
    if ROWWISE:
        tl.store(out_ptr + r[:, None] * cols + c[None, :], _to_fp8(x.to(tl.float32) * scale, out_ptr.dtype.element_ty), mask=mask)
    if TRANSPOSED:
        xt = tl.reshape(tl.trans(x), (BLOCK_C, BLOCK_R // 4, 4))
        word = _words(_fp8_byte(xt.to(tl.float32) * scale, out_ptr.dtype.element_ty))
        w = tl.program_id(0) * (BLOCK_R // 4) + tl.arange(0, BLOCK_R // 4)
        tl.store(out_t_words_ptr + c[:, None] * (rows // 4) + w[None, :], word,
                 mask=(c[:, None] < cols) & (w[None, :] * 4 < rows))


class V:  # the variants by name
    fp8_a, fp8_b = fp8_a, fp8_b


bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")
what = sys.argv[1]

def fp8_launch(fn, x, fp8, br=32, bc=64, warps=4):
    rows, cols = x.shape
    amax = torch.zeros(2, dtype=torch.float32, device=x.device)
    kernels.launch_amax(x, amax)
    out = torch.empty(rows, cols, dtype=fp8, device=x.device)
    out_t = torch.empty(cols, rows, dtype=fp8, device=x.device)
    si = torch.empty((), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc))
    fn[grid](x, amax, out, out_t.view(torch.int32), si, rows, cols, FP8_MAX=torch.finfo(fp8).max,
             X_MAX=torch.finfo(x.dtype).max, ROWWISE=True, TRANSPOSED=True, BLOCK_R=br, BLOCK_C=bc, num_warps=warps)
    return out, out_t, si

if what == "fp8":
    torch.manual_seed(0)
    bad = 0
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        for (r, c) in ((64, 128), (96, 64), (8704, 384), (512, 1536), (33280, 192)):
            for dt in (torch.bfloat16, torch.float32):
                x = torch.randn(r, c, device="cuda") * torch.exp2(torch.randint(-30, 30, (r, c), device="cuda").float())
                x.view(-1)[::97] = 0.0
                x.view(-1)[5::1013] = -0.0
                x = x.to(dt)
                ref = fp8_launch(kernels._fp8_kernel, x, fp8)
                for name, fn, br, bc, w in (("b", V.fp8_b, 32, 64, 4), ("b64", V.fp8_b, 64, 64, 4), ("b32x128", V.fp8_b, 32, 128, 4), ("a", V.fp8_a, 32, 64, 4)):
                    if r % br: continue
                    got = fp8_launch(fn, x, fp8, br, bc, w)
                    ok = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(ref[:2], got[:2])) and torch.equal(ref[2], got[2])
                    ok = ok and torch.equal(ref[1].view(torch.uint8), ref[0].view(torch.uint8).t())
                    if not ok:
                        bad += 1
                        print("MISMATCH", fp8, r, c, dt, name, flush=True)
    print("fp8 variants bitwise:", "all equal" if bad == 0 else f"{bad} mismatches", flush=True)
    for (r, c) in ((8704, 384), (8704, 1152), (8704, 1536), (33280, 192), (33280, 576), (1152, 384)):
        xs = [torch.randn(r, c, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        it = itertools.cycle(xs)
        line = f"fp8 {r}x{c}:"
        for name, fn, br, bc, w in (("cur", kernels._fp8_kernel, 32, 64, 4), ("b", V.fp8_b, 32, 64, 4), ("b64x64", V.fp8_b, 64, 64, 4),
                                    ("b32x128", V.fp8_b, 32, 128, 4), ("b64x64w8", V.fp8_b, 64, 64, 8), ("a", V.fp8_a, 32, 64, 4)):
            t = bench(lambda: fp8_launch(fn, next(it), torch.float8_e4m3fn, br, bc, w))
            line += f" {name} {t*1e3:.1f}us"
        print(line, flush=True)

if what == "sweep":
    seed = torch.tensor([7], device="cuda")
    shapes = [("X enc", 8704, 384, "x", 12 * 3), ("X enc fc2", 8704, 1536, "x", 6), ("X dec", 33280, 192, "x", 4 * 3), ("X dec fc2", 33280, 384, "x", 4),
              ("dY enc fc1", 8704, 1536, "dy", 6), ("dY enc", 8704, 384, "dy", 12), ("dY enc qkv", 8704, 1152, "dy", 6),
              ("dY dec qkv", 33280, 576, "dy", 4), ("dY dec", 33280, 192, "dy", 8), ("dY dec fc1", 33280, 384, "dy", 4)]
    totals = {}
    for name, r, c, kind, count in shapes:
        xs = [torch.randn(r, c, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        it = itertools.cycle(xs)
        amax = torch.zeros(2, device="cuda"); kernels.launch_amax(xs[0], amax, True)
        rv = torch.empty(r, c, dtype=torch.bfloat16, device="cuda")
        cv = torch.empty(r, c, dtype=torch.bfloat16, device="cuda") if kind == "dy" else None
        co = kernels.packed_copy(c, r, "cuda") if kind == "x" else None
        res = []
        for block_c, warps in ((128, 4), (128, 2), (64, 2), (64, 1), (32, 1), (32, 2), (256, 8)):
            if c % block_c: continue
            try:
                t = bench(lambda: kernels.launch_quantize(next(it), amax, col_out=co, rht=True, seed=seed if kind == "dy" else None,
                                                         row_values=rv, col_values=cv, block_c=block_c, num_warps=warps))
            except Exception as e:
                print(name, block_c, warps, "failed", type(e).__name__, str(e)[:200], flush=True); continue
            res.append((t, block_c, warps))
            totals[(block_c, warps)] = totals.get((block_c, warps), 0.0)
        default = bench(lambda: kernels.launch_quantize(next(it), amax, col_out=co, rht=True, seed=seed if kind == "dy" else None, row_values=rv, col_values=cv))
        print(f"{name} [{r}x{c}] x{count} default {default*1e3:.1f}us | " + "; ".join(f"{bc}/{w}: {t*1e3:.1f}" for t, bc, w in sorted(res)), flush=True)

def eager_layer():
    """One linear layer (M 8704, K 384, N 1152) and its eager forward + backward, step(recipe)."""
    from nvfp4 import quantized_linear
    m, k, n = 8704, 384, 1152
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", requires_grad=True)
    b = torch.zeros(n, device="cuda", requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def step(recipe):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = quantized_linear(x, w, b, recipe)
        y.backward(dy)
    return step, (m, k, n)


if what == "eager":
    from nvfp4 import NVFP4Recipe
    step, (m, k, n) = eager_layer()
    for recipe in (None, NVFP4Recipe()):
        for _ in range(20): step(recipe)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50): step(recipe)
        host = (time.perf_counter() - t0) / 50
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 50
        print(f"eager {'bf16' if recipe is None else 'nvfp4'}: host {host*1e3:.3f} ms/step, wall {wall*1e3:.3f} ms/step", flush=True)
    # host cost per call of the pieces (no sync between; GPU work is queued)
    xq = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    amax = torch.zeros(2, device="cuda"); rv = torch.empty_like(xq); co = kernels.packed_copy(k, m, "cuda")
    seed = torch.tensor([7], device="cuda"); no_seed = torch.empty(0, dtype=torch.int64, device="cuda")
    pieces = {
        "launch_amax": lambda: kernels.launch_amax(xq, amax, True, pdl=True),
        "launch_quantize": lambda: kernels.launch_quantize(xq, amax, col_out=co, rht=True, row_values=rv, pdl=True),
        "op quantize (custom op)": lambda: torch.ops.nvfp4.quantize(xq, no_seed, 1, 1, 2, True, False),
        "quantize impl direct": lambda: kernels.quantize._init_fn(xq, no_seed, 1, 1, 2, True, False),
        "torch.randint seed": lambda: torch.randint(2 ** 62, (1,), device="cuda"),
        "torch.zeros(2)": lambda: torch.zeros(2, dtype=torch.float32, device="cuda"),
        "torch.empty x7": lambda: [torch.empty(0, device="cuda") for _ in range(7)],
        "_supports_pdl": lambda: kernels._supports_pdl(xq),
        "op unpack": lambda: torch.ops.nvfp4.unpack(*co),
        "op scaled_mm": lambda: torch.ops.nvfp4.scaled_mm(rv, rv.t(), amax[0], amax[1], None, 1.0, torch.bfloat16),
    }
    for name, fn in pieces.items():
        try:
            for _ in range(10): fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200): fn()
            print(f"host {name}: {(time.perf_counter() - t0) / 200 * 1e6:.1f} us/call", flush=True)
            torch.cuda.synchronize()
        except Exception as e:
            print(f"host {name}: failed {type(e).__name__}: {str(e)[:150]}", flush=True)
    from torch.profiler import profile, ProfilerActivity
    recipe = NVFP4Recipe()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10): step(recipe)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))

if what == "eager-ab":  # at commit d7258cb, which had kernels.op (the ops' Python functions in eager mode)
    from nvfp4 import NVFP4Recipe
    step, _ = eager_layer()
    orig_op, orig_pdl = kernels.op, kernels._supports_pdl
    variants = {
        "bf16": (None, orig_op, orig_pdl),
        "nvfp4 (direct functions, PDL)": (NVFP4Recipe(), orig_op, orig_pdl),
        "nvfp4 (custom ops, PDL)": (NVFP4Recipe(), lambda name: getattr(torch.ops.nvfp4, name), orig_pdl),
        "nvfp4 (direct functions, no PDL)": (NVFP4Recipe(), orig_op, lambda x: False),
        "nvfp4 (custom ops, no PDL)": (NVFP4Recipe(), lambda name: getattr(torch.ops.nvfp4, name), lambda x: False),
    }
    res = {v: [] for v in variants}
    for rnd in range(4):
        for name, (recipe, op, pdl) in variants.items():
            kernels.op, kernels._supports_pdl = op, pdl
            for _ in range(5): step(recipe)
            torch.cuda.synchronize()
            t0 = time.perf_counter(); n_it = 40
            for _ in range(n_it): step(recipe)
            torch.cuda.synchronize()
            res[name].append((time.perf_counter() - t0) / n_it * 1e3)
    for name, ts in res.items():
        ts.sort()
        print(f"eager {name}: median {ts[len(ts)//2]:.3f} ms (min {ts[0]:.3f}, max {ts[-1]:.3f}); vs bf16 {ts[len(ts)//2] / sorted(res['bf16'])[2]:.2f}x", flush=True)
    # host time per quantize piece without and with PDL, and the GPU time of the nvfp4 layer
    kernels.op, kernels._supports_pdl = orig_op, orig_pdl
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10): step(NVFP4Recipe())
        torch.cuda.synchronize()
    gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 10 / 1e3
    print(f"nvfp4 layer GPU kernel time: {gpu:.3f} ms/step", flush=True)
