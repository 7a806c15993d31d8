"""The fused Triton kernels against the PyTorch reference (bit for bit) and float64: on the GPU,
and on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported)."""
import os

import pytest

from conftest import REPO, requires_cuda, run_python

CHECK = r"""
import itertools, sys, torch, triton
sys.path.insert(0, {repo!r})
from nvfp4 import kernels
from nvfp4.kernels import PACKED, VALUES
from nvfp4.formats import hadamard_matrix, quantize_nvfp4, random_bits, random_hadamard_transform, unpack_e2m1
device = {device!r}
check_gemm = {check_gemm!r}
g = torch.Generator(device).manual_seed(0)

def empty(rows, cols):  # TE's storage of an NVFP4 [rows, cols]: (data, scale)
    return kernels.packed_copy(rows, cols, device)

def values_of(copy):  # code * scale of TE's bytes, by formats.unpack_e2m1
    data, scale = copy
    return unpack_e2m1(data, data.shape[1] * 2) * scale.float().repeat_interleave(16, 1)

def scale_bytes(scale):  # a NaN's sign bit is the arithmetic's (x86: set, CUDA: clear)
    bits = scale.view(torch.uint8)
    return torch.where(bits & 0x7F == 0x7F, 0x7F, bits)

def same_values(a, b):  # equal values, NaN where NaN (and +0.0 == -0.0)
    a, b = a.float(), b.float()
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())

def bitwise(a, b):  # same, and zeros of the same sign
    a, b = a.float(), b.float()
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num().view(torch.int32), b.nan_to_num().view(torch.int32))

def same_bytes(copy, ref):  # the kernel's bytes are the reference's TE bytes (NVFP4Tensor.packed)
    data, scale = ref.packed()
    return torch.equal(copy[0], data) and torch.equal(scale_bytes(copy[1]), scale_bytes(scale))
cases = 0
for dtype in (torch.float32, torch.bfloat16):
    for tile in (1, 16):
        for rows, cols in ((64, 128), (48, 96), (40, 32), (16, 1152)):
            if rows % tile:
                continue
            x = (torch.randn(rows, cols, generator=g, device=device) *
                 torch.logspace(-4, 4, cols, device=device)).to(dtype)
            x[0, :16] = 0
            x[1, 16:32] = -1e-30
            for stochastic in (False, True):
                bits = random_bits(x.shape, device, g) if stochastic else None
                ref = quantize_nvfp4(x, tile_rows=tile, stochastic=stochastic, bits=bits)
                out = empty(rows, cols)
                kernels.launch_quantize(x, ref.amax.repeat(2), out, tile_rows=tile, bits=bits)
                expected = ref.values()
                assert same_bytes(out, ref), (dtype, tile, rows, cols, stochastic)
                same = torch.equal(values_of(out).view(torch.int32), expected.view(torch.int32))
                assert same, (dtype, tile, rows, cols, stochastic, (values_of(out) != expected).sum().item())
                cases += 1
for special in (float("inf"), float("nan")):
    x = torch.randn(32, 64, device=device)
    x[3, 7] = special
    ref = quantize_nvfp4(x)
    out = empty(32, 64)
    kernels.launch_quantize(x, ref.amax.repeat(2), out)
    assert same_bytes(out, ref), special
    assert torch.equal(values_of(out).isnan(), ref.values().isnan())
    assert torch.equal(values_of(out).nan_to_num(), ref.values().nan_to_num())
print("bitwise", cases)

# every E2M1 tie and every SR threshold, exactly: blocks of amax 6 in a tensor of amax 2688
# (scale 1, encode 1), each of the 256 rows stochastically rounded with bits = its row index
ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -0.0])
x = torch.cat([ties.repeat(256, 1), torch.full((256, 16), 2688.0)], 1).to(device)
row_index = torch.arange(256, dtype=torch.uint8, device=device)[:, None].expand(256, 32).contiguous()
for bits in (None, row_index):
    for columnwise in (False, True):
        ref = quantize_nvfp4(x, stochastic=bits is not None, bits=bits)
        out = empty(*x.shape)
        if columnwise:  # the columnwise copy of x^T is x's rowwise copy
            kernels.launch_quantize(x.t().contiguous(), ref.amax.repeat(2), col_out=out, bits=None if bits is None else bits.t().contiguous())
        else:
            kernels.launch_quantize(x, ref.amax.repeat(2), out, bits=bits)
        assert same_bytes(out, ref), (bits is None, columnwise)
        assert torch.equal(values_of(out).view(torch.int32), ref.values().view(torch.int32)), (bits is None, columnwise)
print("ties ok")

# columnwise: x^T quantized into TE's columnwise bytes, bit for bit; RHT(x^T) with its 16 exact products
# summed in fp32 (bf16: then rounded once, as torch's matmul does), amax included
rht_cases = 0
for dtype in (torch.float32, torch.bfloat16):
    for rows, cols in ((64, 128), (48, 80), (16, 40), (160, 16)):
        x = (torch.randn(rows, cols, generator=g, device=device) * torch.logspace(-3, 3, cols, device=device)).to(dtype)
        for rht in (False, True):
            xt = x.t().contiguous()
            amax = torch.zeros(2, device=device)
            kernels.launch_amax(x, amax, rht)
            assert torch.equal(amax[0], x.abs().amax().float())
            if rht:
                xt = random_hadamard_transform(xt)
                terms = x.t().double().reshape(-1, 16, 1) * hadamard_matrix(device, torch.float64)
                exact = terms.sum(1).abs().max()
                assert (amax[1].double() - exact).abs() <= exact * 2.0 ** -8 + 16 * 2.0 ** -24 * terms.abs().sum(1).max()
                if dtype == torch.bfloat16:
                    assert torch.equal(amax[1], xt.abs().amax().float())
            else:
                assert torch.equal(amax[1], amax[0])
            for stochastic in (False, True):
                bits = random_bits(xt.shape, device, g) if stochastic else None
                ref = quantize_nvfp4(xt, stochastic=stochastic, bits=bits)
                out = empty(cols, rows)
                kernels.launch_quantize(x, ref.amax.repeat(2), col_out=out, rht=rht,
                               bits=None if bits is None else bits.t().contiguous())
                same = (values_of(out) == ref.values()).float().mean().item()
                need = 1.0 if not rht else 0.999 if dtype == torch.bfloat16 else 0.99
                assert same >= need, (dtype, rows, cols, rht, stochastic, same)
                assert rht or same_bytes(out, ref), (dtype, rows, cols, stochastic)
                rht_cases += 1
print("transposed", rht_cases)

# the amax pass propagates NaN (also past an inf) and takes inf, as torch's amax does
for special in ((float("inf"),), (float("nan"),), (float("inf"), float("nan"))):
    x = torch.randn(1024, 144, device=device, dtype=torch.bfloat16)
    for i, value in enumerate(special):
        x[700 + i, 5 + 60 * i] = value
    for rht in (False, True):
        amax = torch.zeros(2, device=device)
        kernels.launch_amax(x, amax, rht)
        ref = torch.stack([x.abs().amax().float(), random_hadamard_transform(x.t()).abs().amax().float() if rht
                           else x.abs().amax().float()])
        assert torch.equal(amax.isnan(), ref.isnan()) and torch.equal(amax.nan_to_num(), ref.nan_to_num()), (special, rht, amax, ref)

# programs that take several row tiles (large operands) still see the last, partial one
for (rows, rht), block_r in itertools.product(((16 * 9 + 7, False), (16 * 9, True), (16 * 21, True)), (16, 64)):
    x = torch.randn(rows, 16, generator=g, device=device, dtype=torch.bfloat16)
    x[-1, 3] = 1000.0
    amax = torch.zeros(2, device=device)
    kernels._amax_kernel[(triton.cdiv(rows, block_r * 2), 1)](x, amax, rows, 16, RHT=rht, ROW_TILES=2, BLOCK_R=block_r,
                                                              BLOCK_C=kernels.AMAX_BLOCK_C, PDL=False)
    ref = random_hadamard_transform(x.t()).abs().amax().float() if rht else 1000.0
    assert amax[0] == 1000.0 and amax[1] == ref, (rows, rht, block_r, amax)
print("row tiles ok")

# the fused GEMM: exact operands (products and sums exact in fp32, whatever the order), so
# only the epilogue is compared: alpha = fa * fb * scale, the bias rounded to the output
# dtype, one rounding; the GPU may fuse the bias add into an FMA (one rounding fewer)
if check_gemm:
    gemms = 0
    for m, k, n in ((48, 32, 40), (200, 128, 130)):
        a = (torch.randint(-6, 7, (m, k), generator=g, device=device) * 0.5).bfloat16()
        w = (torch.randint(-6, 7, (n, k), generator=g, device=device) * 0.25).bfloat16()
        bias = torch.randn(n, generator=g, device=device)
        fa, fb = torch.tensor(3.7, device=device), torch.tensor(1.3, device=device)
        acc = a.double() @ w.double().t()
        for b, out_dtype, with_bias, scale in itertools.product((w.t(), w.t().contiguous()), (torch.bfloat16, torch.float32),
                                                             (True, False), (kernels.nvfp4_alpha_scale(), 1.0)):
            out = torch.empty(m, n, dtype=out_dtype, device=device)
            kernels.launch_scaled_mm(a, b, fa, fb, bias if with_bias else None, out, scale)
            y = acc.float() * (fa * fb * scale)
            two_roundings = (y + bias.to(out_dtype) if with_bias else y).to(out_dtype)
            alpha = (fa * fb * scale).double()
            one_rounding = (acc * alpha + bias.to(out_dtype).double()).float().to(out_dtype) if with_bias else two_roundings
            ok = (out == two_roundings) | ((out == one_rounding) if device == "cuda" else False)
            assert ok.all(), (m, k, n, out_dtype, with_bias, (~ok).sum().item())
            gemms += 1
        # row-scaled: a factor per row of a (fprop's input) or per column of b
        for fa_v, fb_v in ((torch.rand(m, generator=g, device=device) + 0.5, fb),
                           (fa, torch.rand(n, generator=g, device=device) + 0.5)):
            for out_dtype in (torch.bfloat16, torch.float32):
                out = torch.empty(m, n, dtype=out_dtype, device=device)
                kernels.launch_scaled_mm(a, w.t(), fa_v, fb_v, None, out, kernels.nvfp4_alpha_scale(256, 448))
                alpha = (fa_v[:, None] if fa_v.dim() else fa_v) * (fb_v[None, :] if fb_v.dim() else fb_v)
                expected = (acc.float() * (alpha * kernels.nvfp4_alpha_scale(256, 448))).to(out_dtype)
                assert torch.equal(out, expected), (m, n, out_dtype, fa_v.dim(), (out != expected).sum().item())
                gemms += 1
    print("gemm", gemms)

else:
    print("gemm skipped")

# both copies from one read equal the copies made one at a time, bit for bit (also seeded)
x = torch.randn(96, 256, generator=g, device=device, dtype=torch.bfloat16)
amax = torch.zeros(2, device=device)
kernels.launch_amax(x, amax, True)
def equal(copy, other):
    return torch.equal(copy[0], other[0]) and torch.equal(copy[1].view(torch.uint8), other[1].view(torch.uint8))
for seed in (None, torch.tensor([7], device=device)):
    row, row_alone, col, col_alone = empty(96, 256), empty(96, 256), empty(256, 96), empty(256, 96)
    kernels.launch_quantize(x, amax, row, col, rht=True, seed=seed)
    kernels.launch_quantize(x, amax, row_alone, seed=seed)
    kernels.launch_quantize(x, amax, col_out=col_alone, rht=True, seed=seed)
    assert equal(row, row_alone) and equal(col, col_alone)
    # the op the layers call: both passes, the same bits, in either form or both
    op_seed = torch.empty(0, dtype=torch.int64, device=device) if seed is None else seed
    op = torch.ops.nvfp4.quantize(x, op_seed, 1, PACKED | VALUES, PACKED | VALUES, True, seed is not None)
    assert equal(op[1:3], row) and equal(op[4:6], col) and torch.equal(op[6], amax)
    # the values forms are the bytes' values (code * scale; a zero's sign aside, which a GEMM ignores),
    # the columnwise one in x's layout; nvfp4::unpack expands the bytes to the same values
    assert same_values(op[0], values_of(row)) and same_values(op[3].t(), values_of(col)) and op[0].dtype == torch.bfloat16
    assert same_values(torch.ops.nvfp4.unpack(*row), values_of(row)) and same_values(torch.ops.nvfp4.unpack(*col), values_of(col))
    values_only = torch.ops.nvfp4.quantize(x, op_seed, 1, VALUES, VALUES, True, seed is not None)
    assert same_values(values_only[0], op[0]) and same_values(values_only[3], op[3])
    assert all(t.numel() == 0 for t in (values_only[1], values_only[2], values_only[4], values_only[5]))
print("both copies ok")
# its fake (meta) function and registration agree with it, as torch.compile relies on (not
# test_schema, which multiplies the outputs: float8 tensors cannot on CPUs)
OPCHECKS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
torch.library.opcheck(torch.ops.nvfp4.quantize, (x, torch.tensor([7], device=device), 16, VALUES | PACKED, 0, False, True), test_utils=OPCHECKS)
torch.library.opcheck(torch.ops.nvfp4.quantize, (x, torch.empty(0, dtype=torch.int64, device=device), 1, 0, PACKED, True, False), test_utils=OPCHECKS)
torch.library.opcheck(torch.ops.nvfp4.quantize, (x, torch.empty(0, dtype=torch.int64, device=device), 1, VALUES, VALUES | PACKED, False, False, 2, 256, True, True), test_utils=OPCHECKS)
torch.library.opcheck(torch.ops.nvfp4.unpack, tuple(row), test_utils=OPCHECKS)
torch.library.opcheck(torch.ops.nvfp4.quantize_fp8, (x, 1, True, True), test_utils=OPCHECKS)
print("op ok")

# FP8 current scaling: one kernel writes the rowwise copy and its transpose, byte for byte
# formats.quantize_fp8 (TE's CurrentScalingQuantizerRef), for E4M3 and E5M2, with the scale's
# special cases (amax 0 -> scale 1; a scale that overflows -> the input dtype's max)
from nvfp4.formats import quantize_fp8
fp8_cases = 0
for dtype in (torch.float32, torch.bfloat16):
    for fp8, code in kernels.FP8_CODES.items():
        for rows, cols, kind in ((64, 128, "randn"), (40, 72, "randn"), (48, 32, "zeros"), (32, 64, "tiny")):
            x = torch.randn(rows, cols, generator=g, device=device) * torch.logspace(-3, 3, cols, device=device)
            # tiny: 448 / amax overflows (normal values: the interpreter mishandles subnormal bf16)
            tiny = (1 + torch.rand(rows, cols, generator=g, device=device)) * x.sign() * 1e-37
            x = {{"randn": x, "zeros": x * 0, "tiny": tiny}}[kind].to(dtype)
            ref = quantize_fp8(x, fp8)
            values, values_t, scale_inv = torch.ops.nvfp4.quantize_fp8(x, code, True, True)
            expected = ref.values.to(fp8).view(torch.uint8)
            for got, want, copy in ((values, expected, "rowwise"), (values_t, expected.t(), "transposed")):
                bad = got.view(torch.uint8) != want
                assert not bad.any(), (copy, dtype, fp8, rows, cols, kind, bad.sum().item(),
                                       got.float()[bad][:4].tolist(), want.view(fp8).float()[bad][:4].tolist())
            assert bitwise(scale_inv, ref.scale_inv), (dtype, fp8, kind, scale_inv, ref.scale_inv)
            fp8_cases += 1
print("fp8", fp8_cases)

# the recipe's other options through the op the layers call, against formats.quantize_nvfp4:
# 4over6 (MAE / MSE, bound 256 / 448, 1x16 and 16x16), row-scaled amaxes (with and without RHT),
# and TE's dequantized rowwise copy
options = 0
for dtype in (torch.float32, torch.bfloat16):
    x = (torch.randn(48, 96, generator=g, device=device) * torch.logspace(-3, 3, 96, device=device)).to(dtype)
    x[0, :16] = 0
    x[5, :] *= 1e-3
    for mode, bound, tile, row_scaled, rht in [("MAE", 256, 1, False, False), ("MSE", 256, 1, False, False),
                                              ("MAE", 448, 1, False, False), ("MAE", 256, 16, False, False),
                                              ("MSE", 448, 16, False, False), (None, 448, 1, True, False),
                                              (None, 448, 1, True, True), ("MSE", 256, 1, True, False),
                                              (None, 448, 16, False, False)]:
        columnwise = tile == 1
        out = torch.ops.nvfp4.quantize(x, torch.empty(0, dtype=torch.int64, device=device), tile, PACKED | VALUES,
                                       (PACKED | VALUES) if columnwise else 0, rht, False,
                                       {{None: 0, "MAE": 1, "MSE": 2}}[mode], bound, row_scaled, True)
        row, col, amax, deq = out[1:3], out[4:6], out[6], out[7]
        assert same_values(out[0], values_of(row)) and (not columnwise or same_values(out[3].t(), values_of(col)))
        opts = dict(four_over_six=mode, e4m3_max=bound, row_scaled=row_scaled)
        ref = quantize_nvfp4(x, tile_rows=tile, **opts)
        assert same_bytes(row, ref), ("rowwise bytes", dtype, mode, bound, tile, row_scaled)
        assert bitwise(values_of(row), ref.values()), ("rowwise", dtype, mode, bound, tile, row_scaled)
        assert bitwise(deq, ref.dequantize().to(dtype)), ("dequantized", dtype, mode, bound, tile, row_scaled)
        amaxes = [ref.amax.reshape(-1)]
        # the RHT's 16 products summed on tensor cores: torch's matmul adds them in another order,
        # so on CUDA fp32 RHT values (and their amaxes) agree up to that (see "transposed" above)
        exact = device == "cpu" or not rht
        if columnwise:
            xt = x.t().contiguous()
            ref_t = quantize_nvfp4(random_hadamard_transform(xt) if rht else xt, **opts)
            agree = (values_of(col) == ref_t.values()).float().mean().item()
            assert bitwise(values_of(col), ref_t.values()) or (not exact and agree >= 0.99), ("columnwise", dtype, mode, rht, agree)
            assert not exact or same_bytes(col, ref_t), ("columnwise bytes", dtype, mode, rht)
            amaxes.append(ref_t.amax.reshape(-1))
        if row_scaled:
            got, want = amax[:len(amaxes[0]) + (len(amaxes[1]) if columnwise else 0)], torch.cat(amaxes)
            assert bitwise(got, want) or (not exact and torch.allclose(got, want, rtol=1e-6)), ("amax", dtype, rht)
        else:
            assert bitwise(amax[0], amaxes[0][0]), ("amax", mode)
        options += 1
# 4over6 ties with different candidates: blocks [6, v, 0, ...] in a tensor of amax 6 give
# map-to-6 v -> round(v) and map-to-4 v -> 1.5 round(v / 1.5), errors exact; for these v both
# errors are equal and the values differ: TE keeps map-to-6
tie = torch.zeros(7, 32, device=device)
tie[:, 0] = 6.0
tie[:, 1] = torch.tensor([0.625, 0.875, 1.25, 1.75, 2.125, 3.5, 4.25], device=device)
for mode in (1, 2):
    out = torch.ops.nvfp4.quantize(tie, torch.empty(0, dtype=torch.int64, device=device), 1, PACKED, 0,
                                   False, False, mode, 256, False, False)
    expected = quantize_nvfp4(tie, four_over_six=("MAE", "MSE")[mode - 1], e4m3_max=256).values()
    assert bitwise(values_of(out[1:3]), expected) and torch.equal(expected[:, 1].cpu(), torch.tensor([0.5, 1, 1, 2, 2, 4, 4]) * 256)
print("options", options)
# amaxes outside the range of the kernel's fast division (2^-64..2^64, _div_by_constant) take IEEE's
for factor, mode in itertools.product((2.0 ** 70, 2.0 ** -70, 1.0), (1, 2)):
    xs = torch.randn(32, 64, generator=g, device=device) * factor
    out = torch.ops.nvfp4.quantize(xs, torch.empty(0, dtype=torch.int64, device=device), 1, PACKED, PACKED,
                                   False, False, mode, 448, False, False)
    opts = dict(four_over_six=("MAE", "MSE")[mode - 1], e4m3_max=448)
    assert same_bytes(out[1:3], quantize_nvfp4(xs, **opts)), ("4over6 rowwise", factor, mode)
    assert same_bytes(out[4:6], quantize_nvfp4(xs.t().contiguous(), **opts)), ("4over6 columnwise", factor, mode)
print("4over6 range ok")

# stochastic rounding from an in-kernel seed, for each copy (columnwise: of x^T, whose copy
# is x's values): only the two neighbours (the reference with all bits 0 or 255), the same seed gives
# the same values, the mean over seeds is x's value, and the elements of a block round independently
for columnwise in (False, True):
    x = torch.randn(32, 64, generator=g, device=device)
    ref = quantize_nvfp4(x)
    neighbours = [quantize_nvfp4(x, stochastic=True, bits=torch.full(x.shape, b, dtype=torch.uint8, device=device)).values()
                  for b in (0, 255)]
    def draw(seed):
        out = empty(*x.shape)
        if columnwise:
            kernels.launch_quantize(x.t().contiguous(), ref.amax.repeat(2), col_out=out, seed=torch.tensor([seed], device=device))
        else:
            kernels.launch_quantize(x, ref.amax.repeat(2), out, seed=torch.tensor([seed], device=device))
        return values_of(out)
    runs = []
    for seed in range(64):
        runs.append(draw(seed))
        assert ((runs[-1] == neighbours[0]) | (runs[-1] == neighbours[1])).all()
    assert torch.equal(draw(63), runs[-1]) and not torch.equal(runs[0], runs[1])
    target = x.double() * 2688 / ref.amax.double()  # what code * scale approximates
    gap = neighbours[1].double() - neighbours[0].double()
    err = ((torch.stack(runs).double().mean(0) - target) / gap.clamp_min(1e-30))[gap > 0]
    assert err.abs().mean() < 0.1, err.abs().mean().item()  # round to nearest: ~0.25
    up = torch.stack([(run == neighbours[1]).double() for run in runs])  # each element its own draw
    up = up - up.mean(0)
    both = ((gap[:, :-1] > 0) & (gap[:, 1:] > 0))
    corr = torch.nn.functional.cosine_similarity(up[:, :, :-1], up[:, :, 1:], dim=0, eps=1e-12)[both]
    assert corr.mean().abs() < 0.1, (columnwise, corr.mean().item())
    print("seeded sr ok", columnwise, round(err.abs().mean().item(), 3), round(corr.mean().item(), 3))
"""


def interpreter_loops() -> bool:
    """Triton 3.6's interpreter cannot loop to a run-time bound under NumPy >= 2.3 (the GEMM's
    K loop); 3.7 and later can."""
    import triton
    return tuple(map(int, triton.__version__.split(".")[:2])) >= (3, 7)


def test_division_by_the_4over6_constants_is_exact_for_every_significand():
    """The quantize kernel's 4over6 error divides by 6 x E4M3_MAX as q = RN(a * RN(1/K)), then
    RN(q + RN(a - q K) * RN(1/K)) (FMAs; kernels._div_by_constant): equal to IEEE's RN(a / K) for
    every significand of a (a scaled by 2^k scales every step), emulated here exactly in float64."""
    np = pytest.importorskip("numpy")
    a = ((127 << 23) | np.arange(2 ** 23, dtype=np.int64)).astype(np.int32).view(np.float32)  # [1, 2)
    for K in (6.0 * 448, 6.0 * 256):
        recip = np.float64(np.float32(1) / np.float32(K))
        q = (a.astype(np.float64) * recip).astype(np.float32).astype(np.float64)  # a x recip is exact in float64
        r = (a.astype(np.float64) - q * K).astype(np.float32).astype(np.float64)  # the FMA's remainder (exact)
        s, p = q + r * recip, r * recip  # r x recip exact; q + it rounded twice unless mended:
        err = (q - (s - (s - q))) + (p - (s - q))  # TwoSum: s + err is q + p exactly
        f = s.astype(np.float32).astype(np.float64)
        other = np.where(s > f, np.nextafter(f.astype(np.float32), np.float32(np.inf)),
                         np.nextafter(f.astype(np.float32), np.float32(-np.inf))).astype(np.float64)
        tie = ((f + other) / 2 == s) & (err != 0)  # s on the midpoint: the sign of err decides
        got = np.where(tie & ((other > f) == (err > 0)), other, f).astype(np.float32)
        assert np.array_equal(got.view(np.int32), (a / np.float32(K)).view(np.int32)), K


def run_check(device: str, check_gemm: bool, env=None, halves=False):
    """Run CHECK in a fresh interpreter (halves: its checks in two at once, a CPU each: Triton's
    interpreter takes minutes); every check printed its line, or it failed."""
    code = CHECK.format(repo=str(REPO), device=device, check_gemm=check_gemm)
    helpers, checks = code.split("\ncases = 0\n", 1)
    first, second = checks.split("# both copies from one read", 1)
    codes = (helpers + "\ncases = 0\n" + first, helpers + "\n# both copies from one read" + second)
    stdout = run_python(*(codes if halves else (code,)), env=env)
    for line in ("bitwise 28", "transposed 32", "ties ok", "row tiles ok", "both copies ok", "op ok", "fp8 16",
                 "seeded sr ok False", "seeded sr ok True", "options 18", "4over6 range ok",
                 "gemm 40" if check_gemm else "gemm skipped"):
        assert line in stdout, line


def test_kernel_bitwise_in_triton_interpreter():
    pytest.importorskip("triton")
    run_check("cpu", interpreter_loops(), env=dict(os.environ, TRITON_INTERPRET="1"), halves=True)


@requires_cuda
def test_kernel_bitwise_on_gpu():
    run_check("cuda", check_gemm=True)


LAYER_CHECK = r"""
import sys, torch
sys.path.insert(0, {repo!r})
import nvfp4.linear as L
from nvfp4 import NVFP4Recipe, quantized_linear
reference_path = L._kernel_takes
L._gemm_dtype = lambda t: torch.bfloat16  # as on CUDA: both paths multiply bf16 values

def run(kernels, recipe):
    L._kernel_takes = (lambda *args: True) if kernels else reference_path
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g).bfloat16().float().requires_grad_()
    w, b = torch.randn(48, 32, generator=g).requires_grad_(), torch.randn(48, generator=g).requires_grad_()
    y = quantized_linear(x, w, b, recipe)
    y.backward(torch.randn(64, 48, generator=g) * 1e-3)
    return y.detach(), x.grad, w.grad, b.grad

for options in (dict(), dict(disable_rht=True), dict(disable_2d_quantization=True)):
    recipe = NVFP4Recipe(disable_stochastic_rounding=True, **options)
    assert all(torch.equal(a, b) for a, b in zip(run(False, recipe), run(True, recipe))), options
    print("layer ok", sorted(options))
"""


def test_layer_kernel_path_equals_reference_path_in_interpreter():
    """The layer's GPU path (nvfp4::quantize writing each copy in its form, nvfp4::unpack of the
    kept copies) gives the reference path's Y, dX, dW and db bit for bit, run on the CPU through
    Triton's interpreter (the CUDA-only checks of the layer need a GPU)."""
    pytest.importorskip("triton")
    stdout = run_python(LAYER_CHECK.format(repo=str(REPO)), env=dict(os.environ, TRITON_INTERPRET="1"))
    assert stdout.count("layer ok") == 3
