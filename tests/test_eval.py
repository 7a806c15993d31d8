"""Measuring FP4's cost: folder datasets, held-out loss and PSNR, linear probe and kNN, the
precision comparison report, FP4 diagnostics and W&B logging."""
import csv
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import asmae_minimal
from test_cli import cli, metrics, write_image_folder


def test_folder_dataset_skips_unreadable_files(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", classes=2, per_class=10, size=40)
    (root / "class0" / "broken.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("ignored: not an image extension")
    images, labels = asmae_minimal.folder_images(str(root), train=True, size=32)
    assert "skipped 1 unreadable file" in capsys.readouterr().out
    assert images.shape == (18, 3, 32, 32) and images.dtype == torch.uint8  # 21 files: every 10th held out
    assert sorted(labels.unique().tolist()) == [0, 1]
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(flat / "a.png")
    images, labels = asmae_minimal.folder_images(str(flat), train=True, size=32)
    assert images.shape == (1, 3, 32, 32) and labels is None  # no class subfolders: no labels
    bad = tmp_path / "bad"
    (bad / "x").mkdir(parents=True)
    (bad / "x" / "a.png").write_bytes(b"garbage")
    with pytest.raises(asmae_minimal.UsageError, match="none of the 1 image files could be read"):
        asmae_minimal.folder_images(str(bad), train=True, size=32)


def test_psnr_against_float64_formula():
    for mse in (1e-4, 0.01, 0.25):
        assert abs(asmae_minimal.psnr(mse) - 10 * math.log10(1 / mse)) < 1e-12
    assert asmae_minimal.psnr(0.01) == pytest.approx(20.0)


def test_heldout_psnr_is_masked_pixel_mse(tmp_path):
    _, config = asmae_minimal.parse_config(["--device", "cpu", "--dataset", "fake", "--model", "tiny"])
    torch.manual_seed(0)
    model, precision = asmae_minimal.build_model(config, torch.device("cpu"), config.optim.batch_size)
    model.eval()
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    result = asmae_minimal.heldout_metrics(model, images, precision, "fake", config.run.seed, batch=8)
    # recompute in float64 from the same reconstructions
    g = torch.Generator().manual_seed(asmae_minimal.seed_for(config.run.seed, 7))
    sq, n = 0.0, 0.0
    for start in range(0, 20, 8):
        imgs = asmae_minimal.plain_images(images[start:start + 8], "fake", 32)
        noise = torch.rand(len(imgs), 64, generator=g)
        _, originals, _, recon, mask = asmae_minimal.reconstruct(model, imgs, noise, precision, "fake")
        pixel_mask = mask.double().repeat_interleave(16 * 3, 1).view(len(imgs), 8, 8, 4, 4, 3)
        pixel_mask = pixel_mask.permute(0, 5, 1, 3, 2, 4).reshape(len(imgs), 3, 32, 32)
        sq += ((recon.double() - originals.double()) ** 2 * pixel_mask).sum().item()
        n += pixel_mask.sum().item()
    assert result["psnr_masked"] == pytest.approx(10 * math.log10(n / sq), rel=1e-5)


def test_linear_probe_and_knn_separate_classes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=g) * 3
    def sample(n):
        y = torch.randint(0, 4, (n,), generator=g)
        return centers[y] + torch.randn(n, 32, generator=g), y
    (train_x, train_y), (test_x, test_y) = sample(400), sample(200)
    assert asmae_minimal.linear_probe(train_x, train_y, test_x, test_y, epochs=20) > 0.9
    assert asmae_minimal.knn_accuracy(train_x, train_y, test_x, test_y) > 0.9
    shuffled = train_y[torch.randperm(400, generator=g)]
    assert asmae_minimal.knn_accuracy(train_x, shuffled, test_x, test_y) < 0.5  # chance is 0.25


def test_compare_sweep_reports_means_paired_cis_and_figures(tmp_path):
    data = write_image_folder(tmp_path / "images", classes=3, per_class=24)
    report = cli(tmp_path, "--dataset", "folder", "--data-root", str(data), "--epochs", "2", "--fp4-stats",
                 "--compare", "fp32,nvfp4,nvfp4:no-rht:no-2d-weights", "--seeds", "0,1", run_name="cmp")[0]
    root = tmp_path / "runs" / "cmp"
    folder = root / "compare"
    assert report["reference"] == "fp32" and report["seeds"] == [0, 1]
    assert sorted(p.name for p in root.iterdir() if p.name not in ("compare", "recons") and p.is_dir()) == [
        "fp32-seed0", "fp32-seed1", "nvfp4+no-rht+no-2d-weights-seed0", "nvfp4+no-rht+no-2d-weights-seed1",
        "nvfp4-seed0", "nvfp4-seed1"]
    cells = {(row["variant"], int(row["seed"])): row for row in csv.DictReader((folder / "cells.csv").open())}
    assert len(cells) == 6
    # the same seed: the same initial weights, data and masks in every variant (fp32's first logged
    # loss is the same for both nvfp4 variants only up to quantization, so compare seeds instead)
    assert cells[("fp32", 0)]["final_loss"] != cells[("fp32", 1)]["final_loss"]
    # the paired CI, recomputed from the cells: t(0.975, 1) = 12.7062
    for label in ("nvfp4", "nvfp4:no-rht:no-2d-weights"):
        for key in ("final_loss", "heldout_loss", "linear_probe_acc"):
            d = [float(cells[(label, s)][key]) - float(cells[("fp32", s)][key]) for s in (0, 1)]
            mean, half = sum(d) / 2, 12.7062 * abs(d[0] - d[1]) / math.sqrt(2) / math.sqrt(2)
            entry = report["differences"][label][key]
            assert entry["mean"] == pytest.approx(mean) and entry["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-4)
            assert entry["excludes_zero"] == (abs(mean) > half)
            values = [float(cells[(label, s)][key]) for s in (0, 1)]
            assert report["variants"][label][key]["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    gaps = {label: abs(report["differences"][label]["final_loss"]["mean"]) for label in ("nvfp4", "nvfp4:no-rht:no-2d-weights")}
    closest = min(gaps, key=gaps.get)
    assert report["closest"] == {"nvfp4": {"variant": closest, "final_loss": report["differences"][closest]["final_loss"]}}
    assert f"Closest nvfp4 variant to fp32 in final loss: {closest}, " in (folder / "table.md").read_text()
    for (label, seed), row in cells.items():  # img/s: the median epoch's (one epoch compiles), per cell
        epochs = [json.loads(line) for line in (root / asmae_minimal.cell_folder(label, seed) / "metrics.jsonl").open()]
        speeds = sorted(r["img_per_s"] for r in epochs if r["type"] == "epoch")
        assert len(speeds) == 2 and float(row["img_per_s"]) == pytest.approx((speeds[0] + speeds[1]) / 2)
        assert float(row["cell_wall_s"]) > 0
    for label in ("fp32", "nvfp4"):  # --compare's default fine-tuning (5 epochs, bf16): colours separate
        assert all(cells[(label, s)]["finetune_acc"] and float(cells[(label, s)]["finetune_acc"]) > 0.5 for s in (0, 1))
    table = (folder / "table.md").read_text()
    assert "fine-tune acc" in table and "| nvfp4:no-rht:no-2d-weights | " in table and " ± " in table and "Paired differences to fp32" in table
    assert "[" in table.split("Paired differences")[1]
    with Image.open(folder / "recons.png") as grid:  # 3 variants: a 16 px label strip over a 3x grid each
        assert grid.size == (3 * (7 * 34 + 2), 3 * (16 + 3 * (3 * 34 + 2)))
    for name in ("loss_curves.png", "fp4_stats.png"):
        with Image.open(folder / name) as png:
            assert png.size[0] > 600
    saved = json.loads((folder / "results.json").read_text())
    assert saved["cells"]["nvfp4"]["0"]["backend"].startswith("emulated NVFP4") and "fp4_stats" in saved["cells"]["nvfp4"]["0"]


def test_a_killed_sweep_goes_on_where_it_stopped(tmp_path, monkeypatch, capsys):
    """Rerun with the same arguments: finished cells are skipped, the interrupted one goes on from its
    checkpoint, and the results are those of the sweep that ran straight through."""
    from test_runs import stop_after
    data = write_image_folder(tmp_path / "images", classes=3, per_class=24)
    argv = ("--dataset", "folder", "--data-root", str(data), "--epochs", "2", "--save-every", "1",
            "--finetune-epochs", "0", "--compare", "fp32,nvfp4", "--seeds", "0,1")
    straight = cli(tmp_path, *argv, run_name="straight")[0]
    with monkeypatch.context() as patch:
        stop_after(patch, 8 + 8 + 6)  # two cells of 8 steps, then 6 steps into the third (nvfp4, seed 0)
        with pytest.raises(SystemExit):
            cli(tmp_path, *argv, run_name="killed")
    capsys.readouterr()
    resumed = cli(tmp_path, *argv, run_name="killed")[0]
    out = capsys.readouterr().out
    assert out.count("finished before, skipped") == 2 and "going on from" in out
    for label in ("fp32", "nvfp4"):
        for seed in ("0", "1"):
            a, b = straight["cells"][label][seed], resumed["cells"][label][seed]
            assert a["final_loss"] == b["final_loss"] and a["heldout_loss"] == b["heldout_loss"], (label, seed)
            cell = f"{label}-seed{seed}/cell.json"  # the whole run's curves, also of the resumed cell
            a, b = (json.loads((tmp_path / "runs" / run / cell).read_text()) for run in ("straight", "killed"))
            assert a["curve"] == b["curve"] and a["epoch_curve"] == b["epoch_curve"] and len(a["epoch_curve"]) == 2
    cli(tmp_path, *argv, run_name="killed")
    assert capsys.readouterr().out.count("finished before, skipped") == 4
    with pytest.raises(SystemExit) as exit_info:
        cli(tmp_path, *argv[:-1], "0,2", run_name="killed")
    assert exit_info.value.code == 2 and "holds another comparison" in capsys.readouterr().err


def test_fp4_stats_are_logged_and_summarized(tmp_path, capsys):
    data = write_image_folder(tmp_path / "images", classes=2, per_class=40)
    summary, run_dir = cli(tmp_path, "--dataset", "folder", "--data-root", str(data), "--epochs", "1",
                           "--precision", "nvfp4", "--fp4-stats")
    lines = metrics(run_dir)
    stats = [l for l in lines if l["type"] == "fp4_stats"]
    assert len(stats) == 2  # one per logged step
    layers = stats[0]["layers"]
    assert {"blocks.0.mlp.fc1.X", "blocks.0.mlp.fc1.W", "blocks.0.mlp.fc1.dY"} <= set(layers)
    assert not any(key.startswith(("patch_embed", "decoder_pred")) for key in layers)  # kept in BF16
    assert lines[-1]["type"] == "fp4_summary" and set(lines[-1]["layers"]) == set(layers)
    assert "[fp4-stats] mean over logged steps" in capsys.readouterr().out


def test_eval_writes_json(tmp_path):
    data = write_image_folder(tmp_path / "images", classes=2, per_class=30)
    summary, run_dir = cli(tmp_path, "--dataset", "folder", "--data-root", str(data), "--epochs", "1")
    results = asmae_minimal.main(["--eval", str(run_dir), "--device", "cpu"])
    written = json.loads(next(run_dir.glob("eval_checkpoint_step*.json")).read_text())
    assert written == json.loads(json.dumps(results))
    assert {"heldout_loss", "psnr_masked", "linear_probe_acc", "knn_acc", "chance_acc", "step"} <= set(written)


def test_eval_fine_tunes_in_the_precision_asked(tmp_path, monkeypatch):
    """--finetune-epochs N: the encoder and a head learn the classes (each its own colour, chance
    1/3); bf16 drops the quantization of a copy (the checkpoint's model keeps it), pretrain keeps it."""
    data = write_image_folder(tmp_path / "images", classes=3, per_class=32)
    _, run_dir = cli(tmp_path, "--dataset", "folder", "--data-root", str(data), "--epochs", "1", "--precision", "nvfp4")
    assert "finetune_acc" not in asmae_minimal.main(["--eval", str(run_dir), "--device", "cpu"])  # off by default
    dropped = []
    real = asmae_minimal.nvfp4.linear.drop_quantization
    monkeypatch.setattr(asmae_minimal.nvfp4.linear, "drop_quantization", lambda m: dropped.append(real(m)) or dropped[-1])
    for precision, drops in (("bf16", 1), ("pretrain", 0)):
        dropped.clear()
        results = asmae_minimal.main(["--eval", str(run_dir), "--device", "cpu", "--finetune-epochs", "6",
                                      "--finetune-precision", precision])
        assert results["finetune_acc"] > 0.6 and results["finetune"] == f"6 epochs, {precision}"
        assert len(dropped) == drops and (not drops or dropped[0] > 0)


def test_wandb_receives_the_metrics(tmp_path, monkeypatch):
    logged, inits = [], []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: inits.append(kwargs) or types.SimpleNamespace(
        log=lambda data, step=None: logged.append((step, data)), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(asmae_minimal.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setenv("WANDB_MODE", "offline")
    data = write_image_folder(tmp_path / "images", classes=2, per_class=20)
    cli(tmp_path, "--dataset", "folder", "--data-root", str(data), "--epochs", "1", "--use-wandb", run_name="wb")
    assert inits[0]["project"] == "nvfp4-mae" and inits[0]["config"]["dataset"] == "folder"
    assert any("step/loss" in data for _, data in logged) and any("epoch/loss" in data for _, data in logged)


@pytest.mark.parametrize("precision", ["fp32", "nvfp4"])
def test_memory_parts_of_the_benchmark_report(precision):
    """--benchmark's memory lines: parameters, gradients and AdamW's two moments (plus its step
    counters) make the static part; the linear layers' saved copies are those of one forward."""
    _, config = asmae_minimal.parse_config(["--device", "cpu", "--model", "tiny", "--precision", precision,
                                            "--batch-size", "16", "--no-compile"])
    step = asmae_minimal.TrainStep(config, torch.device("cpu"))
    m = config.model
    batch = (torch.randn(16, 3, m.img_size, m.img_size), torch.rand(16, m.num_patches))
    step(*batch, 1e-4, 1)  # the optimizer's state exists after its first step
    parts = asmae_minimal.memory_parts(step, batch)
    param_bytes = sum(p.numel() * 4 for p in step.model.parameters())
    assert parts["params_gib"] * 2 ** 30 == parts["grads_gib"] * 2 ** 30 == param_bytes
    counters = 4 * len(list(step.model.parameters()))
    assert parts["optimizer_gib"] * 2 ** 30 == 2 * param_bytes + counters
    assert parts["static_mem_gib"] == pytest.approx(parts["params_gib"] * 2 + parts["optimizer_gib"])
    # every linear layer's x copy: tokens x in elements, kept as copy_bytes says
    def tokens(name):  # the visible patches, then with the cls token; the decoder: every patch + cls
        return 16 * (m.num_visible if name == "patch_embed" else m.num_visible + 1 if name.startswith(
            ("blocks", "decoder_embed")) else m.num_patches + 1)
    def copy_bytes(elements, quantized):  # NVFP4: TE's bytes (codes, E4M3 scales, amax); else fp32
        return elements // 2 + elements // 16 + 4 if quantized else 4 * elements
    gemms = step.model.gemms
    assert parts["saved_x_gib"] * 2 ** 30 == sum(copy_bytes(tokens(name) * k, q) for name, k, _, q in gemms)
    # W for dX: every layer but patch_embed (the pixels need no gradient); W^T copies are W's size
    assert parts["saved_w_gib"] * 2 ** 30 == sum(copy_bytes(k * n, q) for name, k, n, q in gemms if name != "patch_embed")


def test_a_zero_reference_and_nan_weights_are_said_not_written_as_nan(tmp_path, capsys):
    """Issue 33 item 9: a reference metric of 0 gave '+nan%' and NaN in results.json (strict JSON
    parsers reject it); --eval of NaN weights reported accuracies of NaN features."""
    config = asmae_minimal.parse_config(["--device", "cpu", "--model", "tiny"])[1]
    variants = (asmae_minimal.Variant("fp32", config), asmae_minimal.Variant("nvfp4", config))
    results = {"fp32": {0: {"final_loss": 0.0}, 1: {"final_loss": 0.0}},
               "nvfp4": {0: {"final_loss": 0.1, "knn_acc": float("nan")}, 1: {"final_loss": 0.2, "knn_acc": 0.5}}}
    report = asmae_minimal.compare_report(results, variants, (0, 1))
    text = asmae_minimal.strict_json(report)
    def refuse(constant):
        raise ValueError(constant)
    parsed = json.loads(text, parse_constant=refuse)  # no NaN, Infinity
    assert parsed["differences"]["nvfp4"]["final_loss"]["relative"] is None
    assert parsed["cells"]["nvfp4"]["0"]["knn_acc"] is None
    asmae_minimal.write_compare_table(report, tmp_path / "table.md", config, (0, 1))
    table = (tmp_path / "table.md").read_text()
    assert "nan%" not in table and "n/a %: the reference is 0" in table
    data = write_image_folder(tmp_path / "images", classes=2, per_class=20)
    _, run_dir = cli(tmp_path, "--dataset", "folder", "--data-root", str(data), "--epochs", "1")
    good = sorted(run_dir.glob("checkpoint_step*.pt"))[-1]
    ckpt = torch.load(good, weights_only=True)
    next(v for v in ckpt["model"].values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli(tmp_path, "--eval", str(tmp_path / "nan.pt"), run_name=None)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "holds non-finite weights" in err and len(err.strip().splitlines()) == 1


def test_a_one_class_folder_says_why_it_has_no_accuracies(tmp_path, capsys):
    """Issue 33 item 9: probe, kNN and fine-tuning were dropped without a word."""
    data = write_image_folder(tmp_path / "images", classes=1, per_class=40)
    _, run_dir = cli(tmp_path, "--dataset", "folder", "--data-root", str(data), "--epochs", "1")
    capsys.readouterr()
    results = asmae_minimal.main(["--eval", str(run_dir), "--device", "cpu", "--finetune-epochs", "1"])
    assert "no linear probe, kNN or fine-tuning" in capsys.readouterr().out
    assert "linear_probe_acc" not in results and "no labels" in results["accuracy_skipped"]


def test_a_sweep_stopped_during_evaluation_keeps_its_finished_parts(tmp_path, monkeypatch, capsys):
    """Issue 33 item 5: SIGTERM during a cell's fine-tuning exited 143 without a line, and every
    rerun began the evaluation again; now the signal waits for the part, the finished parts are
    saved, and the rerun goes on with the next part."""
    import os
    import signal
    data = write_image_folder(tmp_path / "images", classes=2, per_class=30)
    argv = ("--dataset", "folder", "--data-root", str(data), "--epochs", "1", "--finetune-epochs", "1",
            "--compare", "fp32")
    real_finetune = asmae_minimal.finetune_accuracy

    def finetune_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the fine-tuning
        return real_finetune(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(asmae_minimal, "finetune_accuracy", finetune_then_signal)
        with pytest.raises(SystemExit) as exit_info:
            cli(tmp_path, *argv, run_name="sw")
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM; the evaluation's finished parts" in capsys.readouterr().err
    parts = json.loads((tmp_path / "runs" / "sw" / "fp32-seed0" / "cell_eval.json").read_text())
    assert {"heldout_loss", "knn_acc", "finetune_acc"} <= set(parts)  # the part under way finished first
    (tmp_path / "runs" / "sw" / "fp32-seed0" / "cell_eval.json").write_text(json.dumps(
        {k: v for k, v in parts.items() if not k.startswith("finetune")}))  # as if stopped before it
    with monkeypatch.context() as patch:
        patch.setattr(asmae_minimal, "linear_probe", lambda *a, **k: pytest.fail("the probe ran again"))
        report = cli(tmp_path, *argv, run_name="sw")[0]
    cell = report["cells"]["fp32"]["0"]
    assert cell["knn_acc"] == parts["knn_acc"] and cell["finetune_acc"] == parts["finetune_acc"]
