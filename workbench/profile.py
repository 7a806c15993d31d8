"""--benchmark N --profile: where a training step's GPU time goes.

torch.profiler records every kernel of a few steps (CUPTI sees the kernels inside a replayed
CUDA graph one by one); each kernel falls into one group by its name, and the report gives CUDA
time per step by group and the top kernels, plus a Chrome trace (chrome://tracing, Perfetto).
The groups name what a training step of this project runs: the GEMMs (cuBLAS, CUTLASS, the
Triton scaled GEMM), quantization (the nvfp4 Triton kernels: amax, quantize, unpack, FP8 cast),
attention (SDPA's flash / memory-efficient / cuDNN kernels), inductor's fused elementwise and
reduction kernels, the optimizer (fused AdamW, the gradient norm's foreach kernels), memory
copies and fills, and PyTorch's own elementwise kernels (eager code)."""
import re
from collections import defaultdict
from pathlib import Path

import torch

GROUPS = (  # (group, pattern on the kernel name), first match wins
    ("quantize", r"_quantize_kernel|_amax_kernel|_row_amax_kernel|_unpack_kernel|_fp8_kernel"),
    ("attention", r"flash|fmha|attention|attn|sdpa"),
    ("GEMM", r"_scaled_mm_kernel|gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_"),
    ("fused elementwise", r"^triton_"),  # inductor's generated kernels (pointwise, reductions)
    ("optimizer", r"adam|multi_tensor|foreach|lpnorm"),
    ("copy / fill", r"memcpy|memset|copy|fill"),
    ("eager elementwise", r"at::native|elementwise|vectorized|reduce"),
)


def kernel_group(name: str) -> str:
    """The group of a kernel, by its name (see GROUPS); 'other' if none matches."""
    for group, pattern in GROUPS:
        if re.search(pattern, name, re.IGNORECASE):
            return group
    return "other"


def summarize(kernels, steps: int, top: int = 12) -> dict:
    """kernels: (name, microseconds, calls) of the profiled steps -> CUDA ms per step by group,
    and the `top` kernels by time: (name, group, ms per step, calls per step)."""
    groups, by_name = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for name, us, calls in kernels:
        groups[kernel_group(name)] += us / 1e3 / steps
        by_name[name][0] += us / 1e3 / steps
        by_name[name][1] += calls / steps
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return {"total_ms": sum(groups.values()),
            "groups_ms": dict(sorted(groups.items(), key=lambda item: -item[1])),
            "top": [(name, kernel_group(name), ms, calls) for name, (ms, calls) in ranked]}


def report_lines(summary: dict, steps: int) -> list:
    total = summary["total_ms"] or float("nan")
    lines = [f"{steps} steps profiled: {summary['total_ms']:.3f} ms of kernels a step (CUDA time)",
             f"{'group':20s} {'ms/step':>9s} {'share':>7s}"]
    lines += [f"{group:20s} {ms:9.3f} {100 * ms / total:6.1f}%" for group, ms in summary["groups_ms"].items()]
    lines.append(f"top kernels: {'ms/step':>9s} {'share':>7s} {'calls':>6s}  group, name")
    lines += [f"             {ms:9.3f} {100 * ms / total:6.1f}% {calls:6.1f}  {group}, {name[:90]}"
              for name, group, ms, calls in summary["top"]]
    return lines


def profile_steps(run_step, steps: int, trace_path: Path) -> dict:
    """Profile `steps` calls of run_step() (CUDA); write the Chrome trace; return summarize()'s dict."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            run_step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace_path))
    kernels = [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    return summarize(kernels, steps)
