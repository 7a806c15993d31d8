"""workbench/evaluate.py: held-out loss and PSNR, linear probe and kNN, fine-tuning, --eval of a
checkpoint, a folder without labels; and the --fp4-stats records it reads."""
import json
import math

import pytest
import torch

import asmae_minimal
import nvfp4
from conftest import cli, metrics, write_image_folder
from workbench import data, evaluate


def test_psnr_against_float64_formula():
    for mse in (1e-4, 0.01, 0.25):
        assert abs(evaluate.psnr(mse) - 10 * math.log10(1 / mse)) < 1e-12
    assert evaluate.psnr(0.01) == pytest.approx(20.0)


def test_heldout_psnr_is_masked_pixel_mse(tmp_path):
    _, config = asmae_minimal.parse_config(["--device", "cpu", "--dataset", "fake", "--model", "tiny"])
    torch.manual_seed(0)
    model, precision = asmae_minimal.build_model(config, torch.device("cpu"), config.optim.batch_size)
    model.eval()
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    result = evaluate.heldout_metrics(model, images, precision, "fake", config.run.seed, batch=8)
    # recompute in float64 from the same reconstructions
    g = torch.Generator().manual_seed(data.seed_for(config.run.seed, 7))
    sq, n = 0.0, 0.0
    for start in range(0, 20, 8):
        imgs = data.plain_images(images[start:start + 8], "fake", 32)
        noise = torch.rand(len(imgs), 64, generator=g)
        _, originals, _, recon, mask = evaluate.reconstruct(model, imgs, noise, precision, "fake")
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
    assert evaluate.linear_probe(train_x, train_y, test_x, test_y, epochs=20) > 0.9
    assert evaluate.knn_accuracy(train_x, train_y, test_x, test_y) > 0.9
    shuffled = train_y[torch.randperm(400, generator=g)]
    assert evaluate.knn_accuracy(train_x, shuffled, test_x, test_y) < 0.5  # chance is 0.25


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
    real = nvfp4.precision.drop_quantization  # what Precision.unquantize calls
    monkeypatch.setattr(nvfp4.precision, "drop_quantization", lambda m: dropped.append(real(m)) or dropped[-1])
    for precision, drops in (("bf16", 1), ("pretrain", 0)):
        dropped.clear()
        results = asmae_minimal.main(["--eval", str(run_dir), "--device", "cpu", "--finetune-epochs", "6",
                                      "--finetune-precision", precision])
        assert results["finetune_acc"] > 0.6 and results["finetune"] == f"6 epochs, {precision}"
        assert len(dropped) == drops and (not drops or dropped[0] > 0)


def test_a_one_class_folder_says_why_it_has_no_accuracies(tmp_path, capsys):
    """Issue 33 item 9: probe, kNN and fine-tuning were dropped without a word."""
    data = write_image_folder(tmp_path / "images", classes=1, per_class=40)
    _, run_dir = cli(tmp_path, "--dataset", "folder", "--data-root", str(data), "--epochs", "1")
    capsys.readouterr()
    results = asmae_minimal.main(["--eval", str(run_dir), "--device", "cpu", "--finetune-epochs", "1"])
    assert "no linear probe, kNN or fine-tuning" in capsys.readouterr().out
    assert "linear_probe_acc" not in results and "no labels" in results["accuracy_skipped"]
