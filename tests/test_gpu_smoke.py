"""GPU smoke runs (skipped without CUDA; run on the device): every precision trains a few steps
with compile on and off, and the loss is finite."""
import json

import pytest

import asmae_minimal
from conftest import requires_cuda, write_image_folder
from workbench import data


@requires_cuda
@pytest.mark.parametrize("compile_flag", ["--no-compile", "--compile"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8", "nvfp4"])
def test_each_precision_trains_on_gpu(tmp_path, precision, compile_flag):
    data = write_image_folder(tmp_path / "images", classes=2, per_class=48)
    amp = ["--no-amp"] if precision == "fp32" else ["--amp"]
    summary = asmae_minimal.main(["--dataset", "folder", "--data-root", str(data), "--model", "tiny",
                                  "--precision", precision, compile_flag, *amp, "--batch-size", "32",
                                  "--epochs", "2", "--log-every", "1", "--out-dir", str(tmp_path / "runs"),
                                  "--run-name", "smoke"])
    lines = [json.loads(l) for l in (tmp_path / "runs" / "smoke" / "metrics.jsonl").read_text().splitlines()]
    losses = [l["loss"] for l in lines if l["type"] == "step"]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)
    assert summary["peak_mem_gib"] > 0 and "cuda" in open(tmp_path / "runs" / "smoke" / "config.json").read()


@requires_cuda
@pytest.mark.parametrize("recipe", [["--nvfp4-4over6", "all", "--no-rht"], ["--row-scaled-activation"],
                                    ["--backward-override", "dequantized"], ["--high-precision-from", "0.5"]],
                         ids=lambda r: r[0])
def test_recipe_options_train_compiled_on_gpu(tmp_path, recipe):
    """The recipe switches and the precision schedule in the compiled, CUDA-graphed step (the
    schedule recompiles and captures the step again halfway)."""
    data = write_image_folder(tmp_path / "images", classes=2, per_class=48)
    summary = asmae_minimal.main(["--dataset", "folder", "--data-root", str(data), "--model", "tiny",
                                  "--precision", "nvfp4", "--compile", "--amp", *recipe, "--batch-size", "32",
                                  "--epochs", "4", "--log-every", "1", "--out-dir", str(tmp_path / "runs"),
                                  "--run-name", "smoke"])
    lines = [json.loads(l) for l in (tmp_path / "runs" / "smoke" / "metrics.jsonl").read_text().splitlines()]
    losses = [l["loss"] for l in lines if l["type"] == "step"]
    assert len(losses) == 8 and all(0 < loss < 10 for loss in losses)
    if "--high-precision-from" in recipe:
        assert summary["high_precision_from_step"] == 5
        assert [l for l in lines if l["type"] == "precision"] == [{"type": "precision", "step": 5, "gemm": "bf16"}]


@requires_cuda
def test_whole_step_cuda_graph_trains_as_the_ungraphed_step():
    """Warm-up, capture and replays of the graphed step give the losses and weights of the same
    compiled step run without a graph, with a learning rate that changes every step (the graph
    must read it, the guard's step and the inputs from the device, not bake them in)."""
    import torch
    torch._dynamo.reset()
    _, config = asmae_minimal.parse_config(["--dataset", "fake", "--model", "tiny", "--precision", "bf16",
                                            "--batch-size", "32", "--compile", "--amp"])
    trainers = []
    for graphed in (True, False):
        torch.manual_seed(0)
        trainer = asmae_minimal.TrainStep(config, torch.device("cuda"))
        trainer.graphed = graphed
        trainers.append(trainer)
    g = torch.Generator().manual_seed(0)
    losses = {True: [], False: []}
    for step in range(1, 7):
        imgs = torch.randn(32, 3, config.model.img_size, config.model.img_size, generator=g).cuda()
        noise = torch.rand(32, trainers[0].model.cfg.num_patches, generator=g).cuda()
        for trainer in trainers:
            loss, grad_norm, skipped = trainer(imgs, noise, 1e-3 * step, step)
            losses[trainer.graphed].append((loss.item(), grad_norm.item(), skipped.item()))
    assert trainers[0].graph.captured and not trainers[1].graph.captured
    assert len({l for l, _, _ in losses[True]}) == 6  # the weights moved every step
    for (a, na, sa), (b, nb, sb) in zip(losses[True], losses[False]):
        assert a == pytest.approx(b, rel=1e-5) and na == pytest.approx(nb, rel=1e-5) and sa == sb == 0
    for p, q in zip(trainers[0].model.parameters(), trainers[1].model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@requires_cuda
@pytest.mark.parametrize("randaugment", [[], ["--randaugment"]])
def test_gpu_tensor_loader_draws_the_cpu_loaders_batches(randaugment):
    """On the GPU (dataset on the device, permutation and parameters copied without a sync,
    the Triton augmentation kernel, RandAugment compiled) the loader yields the CPU loader's
    batches across an epoch boundary: the same masking noise, and the same augmented images up
    to float rounding (RandAugment's posterize, solarize and equalize step at 8-bit levels, so
    there a rounding difference may move a rare pixel by a level)."""
    import torch
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batches = {}
    for device, compile_flag in (("cpu", "--no-compile"), ("cuda", "--compile")):
        _, config = asmae_minimal.parse_config(["--device", device, "--dataset", "fake", "--batch-size", "32",
                                                compile_flag, *randaugment])
        loader = data.TensorLoader(images, config)
        assert loader.kernel == (device == "cuda")
        batches[device] = [tuple(t.cpu() for t in batch) for epoch in (0, 1) for batch in loader.epoch(epoch)]
    assert len(batches["cuda"]) == len(batches["cpu"]) == 6
    for (x_cpu, noise_cpu), (x_gpu, noise_gpu) in zip(batches["cpu"], batches["cuda"]):
        assert torch.equal(noise_gpu, noise_cpu)
        if randaugment:
            assert ((x_gpu - x_cpu).abs() <= 1e-4).float().mean() > 0.999
        else:
            torch.testing.assert_close(x_gpu, x_cpu, atol=1e-4, rtol=0)


@requires_cuda
def test_benchmark_reports_memory_parts_and_fp8_saves_one_byte_copies(tmp_path, capsys):
    """--benchmark's memory report on the GPU: peak = static + activations, and native FP8's saved
    x copies (one byte a value) at about half of bf16's (two bytes)."""
    results = {}
    for precision in ("bf16", "fp8"):
        results[precision] = asmae_minimal.main([
            "--dataset", "fake", "--model", "tiny", "--precision", precision, "--amp", "--no-compile",
            "--batch-size", "64", "--benchmark", "3", "--benchmark-synthetic", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("[benchmark] memory: peak") == 2 and "torch._scaled_mm" in out
    for r in results.values():
        assert r["activation_mem_gib"] > 0 and r["peak_mem_gib"] == pytest.approx(r["static_mem_gib"] + r["activation_mem_gib"])
    assert 0.45 < results["fp8"]["saved_x_gib"] / results["bf16"]["saved_x_gib"] < 0.55
