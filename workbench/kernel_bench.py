"""Time the quantization kernels at a ViT MAE's GEMM shapes, with their achieved bandwidth.

    python -m workbench.kernel_bench --model small --batch 512     (a CUDA GPU)

For each quantized linear layer of the model (MAE's defaults: patch_embed and decoder_pred stay
high precision) it times what one training step runs: NVFP4 (TE's default recipe) quantizes X
(rowwise GEMM values, columnwise TE bytes kept for wgrad, RHT), W (16x16 tiles) and dY (both
copies as GEMM values, RHT, stochastic rounding), unpacks the kept copies before dgrad and wgrad;
FP8 (current scaling) casts X, W and dY with their transposes (amax and cast). Each
kernel's time is the median of triton.testing.do_bench_cudagraph (replays of a CUDA graph, as the
step runs) over inputs rotated through several buffers (a layer's operand may fit in L2, as it
often does in the step, where its producer has just written it). Bytes are the fewest a kernel
must move: its inputs read once, its outputs written once.
"""
import argparse

import torch
import triton

from nvfp4 import kernels
from nvfp4.kernels import PACKED, VALUES

PRESETS = {  # embed x depth, decoder embed x depth, MLP ratios (asmae_minimal.MODEL_PRESETS)
    "small": (384, 6, 192, 4, 4.0, 2.0), "base": (768, 12, 512, 8, 4.0, 4.0), "tiny": (192, 4, 128, 2, 4.0, 4.0)}


def layer_shapes(model: str, batch: int, img: int, patch: int, mask_ratio: float = 0.75):
    """(name, count, M, K, N) of the quantized GEMMs: M tokens, K in, N out."""
    d, depth, dd, ddepth, mlp, dmlp = PRESETS[model]
    patches = (img // patch) ** 2
    m_enc, m_dec = batch * (int(patches * (1 - mask_ratio)) + 1), batch * (patches + 1)
    shapes = []
    for prefix, m, dim, count, ratio in (("enc", m_enc, d, depth, mlp), ("dec", m_dec, dd, ddepth, dmlp)):
        hidden = int(dim * ratio)
        shapes += [(f"{prefix}.qkv", count, m, dim, 3 * dim), (f"{prefix}.proj", count, m, dim, dim),
                   (f"{prefix}.fc1", count, m, dim, hidden), (f"{prefix}.fc2", count, m, hidden, dim)]
    return shapes + [("decoder_embed", 1, m_enc, d, dd)]


def bench(fn, rep_ms=100, graph=True):
    """Median ms of fn, replayed in a CUDA graph as the training step runs it (no launch gaps)."""
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def rotating(make, nbytes):
    """A callable yielding one of enough buffers (made by make()) to exceed 2x the L2 cache."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    buffers = [make() for _ in range(max(2, min(8, 2 * l2 // max(nbytes, 1) + 1)))]
    state = {"i": 0}

    def next_buffer():
        state["i"] = (state["i"] + 1) % len(buffers)
        return buffers[state["i"]]
    return next_buffer


def nvfp4_rows(name, m, k, n):
    """[(kernel, ms, bytes)] of one layer's NVFP4 quantization in a training step."""
    rows = []
    seed = torch.tensor([7], device="cuda")
    no_seed = torch.empty(0, dtype=torch.int64, device="cuda")
    for operand, (rows_, cols), row_form, col_form, rht, sr in (
            ("X", (m, k), VALUES, PACKED, True, False), ("dY", (m, n), VALUES, VALUES, True, True)):
        size = rows_ * cols
        x = rotating(lambda: torch.randn(rows_, cols, device="cuda", dtype=torch.bfloat16), 2 * size)
        amax = torch.zeros(2, device="cuda")
        rows.append((f"{name} {operand} amax", bench(lambda: kernels.launch_amax(x(), amax, rht)), 2 * size))
        kernels.launch_amax(x(), amax, rht)
        row_values = torch.empty(rows_, cols, dtype=torch.bfloat16, device="cuda")
        col_values = torch.empty(rows_, cols, dtype=torch.bfloat16, device="cuda") if col_form == VALUES else None
        col_out = kernels.packed_copy(cols, rows_, "cuda") if col_form == PACKED else None
        written = 2 * size + (2 * size if col_form == VALUES else size * 9 // 16)
        rows.append((f"{name} {operand} quantize", bench(lambda: kernels.launch_quantize(
            x(), amax, col_out=col_out, rht=rht, seed=seed if sr else None, row_values=row_values,
            col_values=col_values)), 2 * size + written))
        rows.append((f"{name} {operand} op", bench(lambda: torch.ops.nvfp4.quantize(
            x(), seed if sr else no_seed, 1, row_form, col_form, rht, sr)), 4 * size + written))
    w = rotating(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), 2 * n * k)
    rows.append((f"{name} W op", bench(lambda: torch.ops.nvfp4.quantize(w(), no_seed, 16, VALUES | PACKED, 0, False,
                                                                         False)), 4 * n * k + 2 * n * k + n * k * 9 // 16))
    data, scale = kernels.packed_copy(k, m, "cuda")
    data.random_(0, 256)
    scale.view(torch.uint8).random_(0, 120)
    rows.append((f"{name} X unpack", bench(lambda: torch.ops.nvfp4.unpack(data, scale)), m * k * 9 // 16 + 2 * m * k))
    return rows


def fp8_rows(name, m, k, n):
    rows = []
    for operand, (r, c), code in (("X", (m, k), 0), ("W", (n, k), 0), ("dY", (m, n), 1)):
        x = rotating(lambda: torch.randn(r, c, device="cuda", dtype=torch.bfloat16), 2 * r * c)
        rows.append((f"{name} {operand} fp8 op", bench(lambda: torch.ops.nvfp4.quantize_fp8(x(), code, True, True)),
                     4 * r * c + 2 * r * c))
    return rows


def eager_layer(m: int, k: int, n: int) -> dict:
    """ms of one linear layer's forward + backward run eagerly (as --no-compile runs and
    --fp4-stats passes do), bf16 and nvfp4 (TE's default recipe)."""
    from nvfp4 import NVFP4Recipe, quantized_linear
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", requires_grad=True)
    b = torch.zeros(n, device="cuda", requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, recipe in (("bf16", None), ("nvfp4", NVFP4Recipe())):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = quantized_linear(x, w, b, recipe)
            y.backward(dy)
        out[name] = bench(step, rep_ms=300, graph=False)  # eager: the host's launches are part of the time
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", choices=list(PRESETS))
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--format", default="nvfp4", choices=["nvfp4", "fp8"])
    parser.add_argument("--eager-layer", metavar="M,K,N", help="instead: time one linear layer's eager forward + "
                                                               "backward, bf16 and nvfp4")
    args = parser.parse_args(argv)
    if args.eager_layer:
        m, k, n = map(int, args.eager_layer.split(","))
        times = eager_layer(m, k, n)
        print(f"eager layer M {m}, K {k}, N {n}, forward + backward: " + ", ".join(
            f"{name} {ms:.3f} ms" for name, ms in times.items()) + f"; nvfp4 / bf16 {times['nvfp4'] / times['bf16']:.2f}x")
        return
    source, target = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda"), torch.empty(2 ** 30, dtype=torch.uint8,
                                                                                     device="cuda")
    copy_gbs = 2 * 2 ** 30 / bench(lambda: target.copy_(source)) / 1e6
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (bytes read + written)")
    del source, target
    per_step = {}
    print(f"{'kernel':34s} {'count':>5s} {'ms':>8s} {'GB/s':>7s} {'of copy':>8s}")
    for name, count, m, k, n in layer_shapes(args.model, args.batch, args.img_size, args.patch_size):
        for kernel, ms, nbytes in (nvfp4_rows if args.format == "nvfp4" else fp8_rows)(name, m, k, n):
            gbs = nbytes / ms / 1e6
            print(f"{kernel:34s} {count:5d} {ms:8.4f} {gbs:7.0f} {100 * gbs / copy_gbs:7.0f}%")
            kind = kernel.split(" ", 1)[1]
            per_step[kind] = per_step.get(kind, 0.0) + count * ms
    print("per step (ms): " + ", ".join(f"{kind} {ms:.3f}" for kind, ms in per_step.items()))


if __name__ == "__main__":
    main()
