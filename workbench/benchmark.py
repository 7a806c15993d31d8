"""--benchmark N [--profile]: a training step's speed and memory on a GPU: img/s, step ms, peak
memory split into its static part and activations, what the linear layers save for backward,
the data loader's share, MFU against a measured bf16 peak; --profile adds where the GPU time
goes (workbench.profile)."""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

import nvfp4
from workbench.data import TensorLoader, load_images, make_loader
from workbench.errors import UsageError
from workbench.files import check_writable, strict_json


def flops_per_image(cfg) -> float:
    """Training FLOPs per image: 3 x forward (forward + backward), matmuls and attention only."""
    p2c, te, td = cfg.patch_size ** 2 * 3, cfg.num_visible + 1, cfg.num_patches + 1
    d, dd = cfg.embed_dim, cfg.decoder_embed_dim
    enc = cfg.depth * (2 * te * (4 * d * d + 2 * d * int(d * cfg.mlp_ratio)) + 4 * te * te * d)
    dec = cfg.decoder_depth * (2 * td * (4 * dd * dd + 2 * dd * int(dd * cfg.decoder_mlp_ratio)) + 4 * td * td * dd)
    return 3 * (enc + dec + 2 * cfg.num_visible * p2c * d + 2 * te * d * dd + 2 * td * dd * p2c)


def gpu_mark() -> torch.cuda.Event:
    """A timing event recorded now on the current stream."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def measure_bf16_peak(device) -> float:
    """Dense bf16 matmul rate of this GPU (TFLOP/s), the MFU denominator."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start = gpu_mark()
    for _ in range(10):
        a @ b
    end = gpu_mark()
    torch.cuda.synchronize(device)
    return 10 * 2 * 8192 ** 3 / (start.elapsed_time(end) / 1e3) / 1e12


def benchmark_batches(config, synthetic: bool):
    """(endless batches, the loader or None): one fixed batch on the device, or the real loader."""
    device, o, m = torch.device(config.run.device), config.optim, config.model
    if synthetic:
        g = torch.Generator().manual_seed(config.run.seed)
        batch = (torch.randn(o.batch_size, 3, m.img_size, m.img_size, generator=g).to(device),
                 torch.rand(o.batch_size, m.num_patches, generator=g).to(device))
        return itertools.repeat(batch), None
    loader = make_loader(config, load_images(config, train=True))
    return (b for epoch in itertools.count() for b in loader.epoch(epoch)), loader


def time_steps(train_step, batches, loader, steps: int, first: int, lr: float) -> dict:
    """Run `steps` steps from step number `first`: wall and GPU ms, and the GPU time the data took
    (tensor loader: from the end of a step to the batch's last kernel, host waits included;
    torchvision: host waits on the workers, while the GPU runs dry)."""
    tensor_loader = isinstance(loader, TensorLoader)
    if loader is not None and not tensor_loader:
        loader.wait_s = 0.0
    data_spans = []  # (before, after) each batch's loader work, on the training stream
    start, t0 = gpu_mark(), time.perf_counter()
    for n in range(steps):
        before = gpu_mark() if tensor_loader else None
        batch = next(batches)
        if tensor_loader:
            data_spans.append((before, gpu_mark()))
        train_step(*batch, lr, first + n)
    end = gpu_mark()
    torch.cuda.synchronize(train_step.device)
    data_ms = (sum(b.elapsed_time(a) for b, a in data_spans) if tensor_loader else
               loader.wait_s * 1e3 if loader is not None else 0.0)
    return {"wall_ms": (time.perf_counter() - t0) * 1e3, "gpu_ms": start.elapsed_time(end), "data_ms": data_ms}


@torch.compiler.set_stance("force_eager")
def memory_parts(train_step, batch) -> dict:
    """GiB of the static part of a step's memory (parameters, their gradients, optimizer state)
    and of what the linear layers save for backward in one forward pass of `batch`, by operand
    (x: the inputs' copies, w: the weights'); an eager pass, where the layers count it (a
    compiled step can save less: its partitioner may recompute a cheap producer, such as a
    LayerNorm or a cast, in backward rather than keep its output)."""
    gib = lambda tensors: sum(t.numel() * t.element_size() for t in tensors) / 2 ** 30
    params = list(train_step.model.parameters())
    state = [v for s in train_step.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    devices = [train_step.device] if train_step.device.type == "cuda" else []
    parts = {"params_gib": gib(params), "grads_gib": gib(p for p in params if p.requires_grad),
             "optimizer_gib": gib(state)}
    try:
        with torch.random.fork_rng(devices=devices), nvfp4.count_saved_bytes() as saved:
            with train_step.precision.autocast():
                train_step.model(*batch)  # the graph (and what it saved) is freed on return
    except torch.OutOfMemoryError:  # beside a captured step's pool, at the largest batches
        torch.cuda.empty_cache()
        return {"static_mem_gib": sum(parts.values()), **parts, "saved_x_gib": None, "saved_w_gib": None}
    return {"static_mem_gib": sum(parts.values()), **parts,
            "saved_x_gib": saved["x"] / 2 ** 30, "saved_w_gib": saved["w"] / 2 ** 30}


def run_benchmark(config, make_step, steps: int, synthetic: bool, profile: bool = False, after_warmup=None,
                  warmup_steps=20, profile_steps=20) -> dict:
    """--benchmark N: warm up (compile), time N steps; img/s, step ms, peak memory, data wait, MFU;
    with profile, where 20 more steps' GPU time goes (workbench.profile). make_step(): the
    script's train step of `config`; after_warmup(): called once the warm-up steps have run."""
    device, o, m = torch.device(config.run.device), config.optim, config.model
    if device.type != "cuda":
        raise UsageError("--benchmark measures GPU time; run it on a CUDA device")
    check_writable(Path(config.run.out_dir))
    peak_tflops = measure_bf16_peak(device)  # before the step's memory: it fits beside any batch
    train_step = make_step()
    batches, loader = benchmark_batches(config, synthetic)
    # The peak is reset after the first two steps (the compile, with its autotuning's buffers) and
    # covers the rest of the warm-up: a CUDA-graphed step allocates its activations once, in its
    # capture (the third step), and its replays take them from the graph's pool unseen.
    t0 = time.perf_counter()
    for n in range(warmup_steps):
        if n == 2:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        train_step(*next(batches), o.peak_lr, n)
    torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t0
    if after_warmup is not None:
        after_warmup()
    t = time_steps(train_step, batches, loader, steps, warmup_steps, o.peak_lr)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    memory = memory_parts(train_step, next(batches))
    flops = flops_per_image(m)
    img_s = o.batch_size * steps / (t["wall_ms"] / 1e3)
    result = {"precision": config.precision.precision, "backend": train_step.precision.backend_name,
              "mode": "model only (synthetic batch)" if synthetic else f"end to end ({config.data.loader} loader)",
              "batch": o.batch_size, "img_size": m.img_size, "patch_size": m.patch_size, "model": m.preset,
              "compile": config.run.compile, "img_per_s": img_s, "step_ms": t["wall_ms"] / steps,
              "gpu_step_ms": t["gpu_ms"] / steps, "peak_mem_gib": peak, **memory,
              "activation_mem_gib": peak - memory["static_mem_gib"],
              "data_wait_pct": 100 * t["data_ms"] / t["gpu_ms"], "warmup_s": warmup_s, "gflop_per_img": flops / 1e9,
              "bf16_peak_tflops": peak_tflops, "mfu_pct": 100 * flops * img_s / (peak_tflops * 1e12)}
    print(f"[benchmark] FLOPs/img = 3 x (enc: depth x (2 T_e (4 D^2 + 2 D H) + 4 T_e^2 D) + dec: same with "
          f"T_d, D_d, H_d + embed/pred matmuls), T_e = visible + 1, T_d = patches + 1 -> {flops / 1e9:.3f} GFLOP")
    for key, value in result.items():
        print(f"[benchmark] {key:18s} {value:.3f}" if isinstance(value, float) else f"[benchmark] {key:18s} {value}")
    r = result
    print(f"[benchmark] memory: peak {peak:.3f} GiB = static {r['static_mem_gib']:.3f} (parameters "
          f"{r['params_gib']:.3f}, gradients {r['grads_gib']:.3f}, optimizer state {r['optimizer_gib']:.3f}) + "
          f"activations {r['activation_mem_gib']:.3f}; " + (
              f"the linear layers save {r['saved_x_gib']:.3f} GiB of x copies and {r['saved_w_gib']:.3f} GiB of w "
              f"copies for backward" if r["saved_x_gib"] is not None else
              "what the linear layers save was not counted: an eager pass does not fit beside the captured step"))
    out = Path(config.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)  # check_writable ran before the warm-up
    if profile:
        result.update(profile_benchmark(config, train_step, batches, warmup_steps + steps, profile_steps))
    with open(out / "benchmarks.jsonl", "a") as f:
        f.write(strict_json(result) + "\n")
    return result


def profile_benchmark(config, train_step, batches, first: int, steps: int) -> dict:
    """--profile: `steps` more steps under torch.profiler; prints CUDA time per step by kernel
    group and the top kernels, writes the Chrome trace to the out dir; the summary's numbers."""
    from workbench.profile import profile_steps, report_lines
    o, m = config.optim, config.model
    trace = Path(config.run.out_dir) / f"profile_{config.precision.precision}_{m.preset}_b{o.batch_size}.json"
    summary = profile_steps(lambda: train_step(*next(batches), o.peak_lr, first), steps, trace)
    for line in report_lines(summary, steps):
        print(f"[profile] {line}")
    print(f"[profile] Chrome trace: {trace}")
    return {"profile_ms": summary["groups_ms"], "profile_top": summary["top"]}
