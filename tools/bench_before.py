"""The kernels of an earlier tree at the small model's shapes, in CUDA graphs: amax + quantize (both
copies in TE bytes) and the compiled expansion of packed operands its layers ran before each GEMM.

    git archive e63415d nvfp4 | tar x -C /tmp/before && PYTHONPATH=/tmp/before python tools/bench_before.py
"""
import sys, torch, triton
from nvfp4 import kernels   # the earlier tree, first on PYTHONPATH
from nvfp4.formats import unpack_e2m1
assert "_nvfp4_kernel" in open(kernels.__file__).read(), kernels.__file__
SHAPES = [("enc.qkv", 6, 8704, 384, 1152), ("enc.proj", 6, 8704, 384, 384), ("enc.fc1", 6, 8704, 384, 1536),
          ("enc.fc2", 6, 8704, 1536, 384), ("dec.qkv", 4, 33280, 192, 576), ("dec.proj", 4, 33280, 192, 192),
          ("dec.fc1", 4, 33280, 192, 384), ("dec.fc2", 4, 33280, 384, 192), ("decoder_embed", 1, 8704, 384, 192)]
bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
def rotating(make, n=4):
    bufs = [make() for _ in range(n)]; i = [0]
    def nxt():
        i[0] = (i[0] + 1) % n; return bufs[i[0]]
    return nxt
@torch.compile
def expand(data, scale):
    return (unpack_e2m1(data, data.shape[1] * 2) * scale.float().repeat_interleave(16, 1)).bfloat16()
per_step = {}
seed = torch.tensor([7], device="cuda"); no_seed = torch.empty(0, dtype=torch.int64, device="cuda")
for name, count, m, k, n in SHAPES:
    for operand, (r, c), rht, sr in (("X", (m, k), True, False), ("dY", (m, n), True, True)):
        x = rotating(lambda: torch.randn(r, c, device="cuda", dtype=torch.bfloat16))
        amax = torch.zeros(2, device="cuda")
        kernels.launch_amax(x(), amax, rht)
        row, col = kernels.packed_copy(r, c, "cuda"), kernels.packed_copy(c, r, "cuda")
        t_amax = bench(lambda: kernels.launch_amax(x(), amax, rht))
        t_q = bench(lambda: kernels.launch_quantize(x(), amax, row, col, rht=rht, seed=seed if sr else None))
        t_op = bench(lambda: torch.ops.nvfp4.quantize(x(), seed if sr else no_seed, 1, True, True, rht, sr))
        expand(*row); expand(*col)
        t_exp = bench(lambda: expand(*row)) + bench(lambda: expand(*col))
        for kind, t in (("amax", t_amax), ("quantize", t_q), ("op", t_op), ("expand", t_exp)):
            print(f"{name} {operand} {kind:10s} {count} {t:.4f} ms")
            per_step[f"{operand} {kind}"] = per_step.get(f"{operand} {kind}", 0) + count * t
print("per step (ms, old kernels, CUDA graphs): " + ", ".join(f"{k} {v:.3f}" for k, v in per_step.items()))
