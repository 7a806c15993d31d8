"""Measuring FP4's cost: folder datasets, held-out loss and PSNR, linear probe and kNN, the
precision comparison report, FP4 diagnostics and W&B logging."""
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


def test_compare_writes_table_plot_and_grid(tmp_path):
    data = write_image_folder(tmp_path / "images", classes=3, per_class=24)
    results = cli(tmp_path, "--dataset", "folder", "--data-root", str(data), "--epochs", "2",
                  "--compare", "fp32,fp8,nvfp4", "--fp4-stats", run_name="cmp")[0]
    folder = tmp_path / "runs" / "cmp" / "compare"
    table = (folder / "table.md").read_text().splitlines()
    rows = {line.split("|")[1].strip(): line for line in table if line.startswith("| ") and "precision" not in line}
    assert set(rows) == {"fp32", "fp8", "nvfp4"} and "+0.00%" in rows["fp32"]
    for precision, summary in results.items():
        gap = 100 * (summary["final_loss"] - results["fp32"]["final_loss"]) / results["fp32"]["final_loss"]
        assert f"{gap:+.2f}%" in rows[precision]
        assert 0 < summary["heldout_loss"] < 10 and summary["psnr_masked"] > 0
        assert 0 <= summary["linear_probe_acc"] <= 1 and 0 <= summary["knn_acc"] <= 1
    assert "fp4_stats" in results["nvfp4"] and "fp4_stats" not in results["fp8"]
    with Image.open(folder / "recons.png") as grid:
        assert grid.size == (7 * 34 + 2, 3 * (3 * 34 + 2))  # 7 held-out images; a 3-row grid per precision
    with Image.open(folder / "loss_curves.png") as plot:
        assert plot.size[0] > 400
    saved = json.loads((folder / "results.json").read_text())
    assert saved["nvfp4"]["backend"].startswith("emulated NVFP4")


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
