"""One eager layer's forward + backward (M 8704, K 384, N 1152), A/B in one process, 4 interleaved
rounds: the ops called through the dispatcher or as their Python functions, PDL on or off (run at
commit d7258cb, which had kernels.op; docs/RESULTS.md)."""
import sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from nvfp4 import kernels, NVFP4Recipe, quantized_linear
m, k, n = 8704, 384, 1152
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = torch.randn(n, k, device="cuda", requires_grad=True)
b = torch.zeros(n, device="cuda", requires_grad=True)
dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
def step(recipe):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = quantized_linear(x, w, b, recipe)
    y.backward(dy)
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
