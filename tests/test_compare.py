"""workbench/compare.py and report.py: the variants x seeds sweep (resume after a kill or a stop
during evaluation), its means and paired CIs, the table, cells.csv and the figures."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import asmae_minimal
from conftest import cli, fails, stop_after, write_image_folder
from workbench import cli as workbench_cli, compare, evaluate, files, report


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
        epochs = [json.loads(line) for line in (root / compare.cell_folder(label, seed) / "metrics.jsonl").open()]
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


def test_a_zero_reference_and_nan_weights_are_said_not_written_as_nan(tmp_path, capsys):
    """Issue 33 item 9: a reference metric of 0 gave '+nan%' and NaN in results.json (strict JSON
    parsers reject it); --eval of NaN weights reported accuracies of NaN features."""
    config = asmae_minimal.parse_config(["--device", "cpu", "--model", "tiny"])[1]
    variants = (workbench_cli.Variant("fp32", config), workbench_cli.Variant("nvfp4", config))
    results = {"fp32": {0: {"final_loss": 0.0}, 1: {"final_loss": 0.0}},
               "nvfp4": {0: {"final_loss": 0.1, "knn_acc": float("nan")}, 1: {"final_loss": 0.2, "knn_acc": 0.5}}}
    summary = report.compare_report(results, variants, (0, 1))
    text = files.strict_json(summary)
    def refuse(constant):
        raise ValueError(constant)
    parsed = json.loads(text, parse_constant=refuse)  # no NaN, Infinity
    assert parsed["differences"]["nvfp4"]["final_loss"]["relative"] is None
    assert parsed["cells"]["nvfp4"]["0"]["knn_acc"] is None
    report.write_compare_table(summary, tmp_path / "table.md", config, (0, 1))
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


def test_a_sweep_stopped_during_evaluation_keeps_its_finished_parts(tmp_path, monkeypatch, capsys):
    """Issue 33 item 5: SIGTERM during a cell's fine-tuning exited 143 without a line, and every
    rerun began the evaluation again; now the signal waits for the part, the finished parts are
    saved, and the rerun goes on with the next part."""
    import os
    import signal
    data = write_image_folder(tmp_path / "images", classes=2, per_class=30)
    argv = ("--dataset", "folder", "--data-root", str(data), "--epochs", "1", "--finetune-epochs", "1",
            "--compare", "fp32")
    real_finetune = evaluate.finetune_accuracy

    def finetune_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the fine-tuning
        return real_finetune(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "finetune_accuracy", finetune_then_signal)
        with pytest.raises(SystemExit) as exit_info:
            cli(tmp_path, *argv, run_name="sw")
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM; the evaluation's finished parts" in capsys.readouterr().err
    parts = json.loads((tmp_path / "runs" / "sw" / "fp32-seed0" / "cell_eval.json").read_text())
    assert {"heldout_loss", "knn_acc", "finetune_acc"} <= set(parts)  # the part under way finished first
    (tmp_path / "runs" / "sw" / "fp32-seed0" / "cell_eval.json").write_text(json.dumps(
        {k: v for k, v in parts.items() if not k.startswith("finetune")}))  # as if stopped before it
    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "linear_probe", lambda *a, **k: pytest.fail("the probe ran again"))
        report = cli(tmp_path, *argv, run_name="sw")[0]
    cell = report["cells"]["fp32"]["0"]
    assert cell["knn_acc"] == parts["knn_acc"] and cell["finetune_acc"] == parts["finetune_acc"]


def test_loss_curves_plot_epoch_means_of_short_runs(tmp_path):
    results = {"bf16": {0: {"curve": [], "epoch_curve": [(4, 0.9), (8, 0.7)]}},
               "nvfp4": {0: {"curve": [(2, 1.0)], "epoch_curve": [(4, 1.0), (8, 0.8)]}}}
    report.plot_loss_curves(results, "bf16", tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as png:
        pixels = np.asarray(png.convert("RGB")).reshape(-1, 3).astype(int)
    for color in ((31, 119, 180), (255, 127, 14)):  # matplotlib's first two line colours: both lines drawn
        assert (np.abs(pixels - color).sum(1) < 30).sum() > 50


def test_compare_onto_a_training_runs_folder_says_so(tmp_path, images, capsys):
    """Issue 33 item 10: it said the folder 'holds another comparison'."""
    cli(tmp_path, "--dataset", "folder", "--data-root", str(images), "--epochs", "1", run_name="plain")
    capsys.readouterr()
    fails(capsys, ["--out-dir", str(tmp_path / "runs"), "--run-name", "plain", "--dataset", "folder", "--data-root",
                   str(images), "--compare", "fp32", "--finetune-epochs", "0"], "is a training run's folder, not a comparison's")


def test_a_sweep_planned_before_the_precision_field_was_renamed_goes_on(tmp_path, capsys):
    """Issue 32 renamed config.precision.name to precision; a sweep folder whose saved plan has
    'name' is the same comparison (it goes on), not 'another comparison'."""
    data = write_image_folder(tmp_path / "images", classes=2, per_class=10)
    argv = ("--dataset", "folder", "--data-root", str(data), "--epochs", "1", "--finetune-epochs", "0",
            "--compare", "fp32")
    cli(tmp_path, *argv, run_name="sweep")
    plan_path = tmp_path / "runs" / "sweep" / "config.json"
    plan = json.loads(plan_path.read_text())
    for cell in plan["compare"]:
        cell["config"]["precision"]["name"] = cell["config"]["precision"].pop("precision")
    plan_path.write_text(json.dumps(plan))
    capsys.readouterr()
    cli(tmp_path, *argv, run_name="sweep")
    out = capsys.readouterr().out
    assert "going on with" in out and "finished before, skipped" in out
