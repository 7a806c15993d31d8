"""Tile / warps sweep of the quantize and amax kernels at the small step's shapes (CUDA graphs)."""
import sys, torch, triton, itertools
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from nvfp4 import kernels
bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")
seed = torch.tensor([7], device="cuda")
shapes = [("X enc", 8704, 384, "x"), ("X enc fc2", 8704, 1536, "x"), ("X dec", 33280, 192, "x"),
          ("dY enc fc1", 8704, 1536, "dy"), ("dY enc", 8704, 384, "dy"), ("dY dec qkv", 33280, 576, "dy"), ("dY dec", 33280, 192, "dy")]
for name, r, c, kind in shapes:
    xs = [torch.randn(r, c, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    it = itertools.cycle(xs)
    amax = torch.zeros(2, device="cuda"); kernels.launch_amax(xs[0], amax, True)
    res = []
    for block_r, row_tiles, warps in itertools.product((16, 32, 64), (1, 2, 4, 8), (2, 4, 8)):
        if triton.cdiv(r, block_r * row_tiles) < 8: continue
        try:
            t = bench(lambda: kernels.launch_amax(next(it), amax, True, block_r=block_r, row_tiles=row_tiles, num_warps=warps))
            res.append((t, f"amax block_r {block_r} row_tiles {row_tiles} warps {warps}"))
        except Exception as e:
            res.append((9e9, f"amax {block_r} {row_tiles} {warps} failed {type(e).__name__}"))
    res.sort(); default = bench(lambda: kernels.launch_amax(next(it), amax, True))
    print(f"{name} [{r}x{c}] amax default {default*1e3:.1f} us; best: " + "; ".join(f"{t*1e3:.1f} us {d}" for t, d in res[:3]), flush=True)
    res = []
    for block_c, warps in itertools.product((64, 128, 256), (2, 4, 8)):
        rv = torch.empty(r, c, dtype=torch.bfloat16, device="cuda")
        cv = torch.empty(r, c, dtype=torch.bfloat16, device="cuda") if kind == "dy" else None
        co = kernels.packed_copy(c, r, "cuda") if kind == "x" else None
        try:
            t = bench(lambda: kernels.launch_quantize(next(it), amax, col_out=co, rht=True, seed=seed if kind == "dy" else None,
                                                     row_values=rv, col_values=cv, block_c=block_c, num_warps=warps))
            res.append((t, f"quantize block_c {block_c} warps {warps}"))
        except Exception as e:
            res.append((9e9, f"quantize {block_c} {warps} failed {type(e).__name__}: {str(e)[:80]}"))
    res.sort()
    print(f"{name} [{r}x{c}] quantize: " + "; ".join(f"{t*1e3:.1f} us {d}" for t, d in res), flush=True)
