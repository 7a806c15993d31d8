"""Runs that survive (the script's loop and outputs, workbench/files.py): bitwise resume, signals,
atomic checkpoints, corrupt inputs, the NaN guard, the folder lock, the precision schedule, W&B."""
import os
import json
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import asmae_minimal
from conftest import REPO, cli, metrics, stop_after, write_image_folder
from workbench import cli as workbench_cli, errors, files


def run(tmp_path, images, *argv, run_name="run"):
    return cli(tmp_path, "--dataset", "folder", "--data-root", str(images), *argv, run_name=run_name)


def final_weights(run_dir: Path):
    return torch.load(sorted(run_dir.glob("checkpoint_step*.pt"))[-1], weights_only=True)["model"]


@pytest.mark.parametrize("stop_at", [4, 6], ids=["at-epoch-end", "mid-epoch"])
def test_resume_is_bitwise(tmp_path, images, monkeypatch, capsys, stop_at):
    _, straight = run(tmp_path, images, "--epochs", "2", run_name="straight")
    with monkeypatch.context() as patch:
        stop_after(patch, stop_at)
        with pytest.raises(SystemExit) as exit_info:
            run(tmp_path, images, "--epochs", "2", run_name="stopped")
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    stopped = tmp_path / "runs" / "stopped"
    assert len(metrics(stopped)) < len(metrics(straight))
    cli(tmp_path, "--resume", str(stopped), run_name=None)
    a, b = final_weights(straight), final_weights(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(stopped) == metrics(straight)


def test_resume_allows_more_epochs_and_refuses_conflicts(tmp_path, images, capsys):
    _, run_dir = run(tmp_path, images, "--epochs", "1")
    cli(tmp_path, "--resume", str(run_dir), "--epochs", "2", run_name=None)
    out = capsys.readouterr().out
    assert "[resume] epochs 1 -> 2" in out
    assert [l["epoch"] for l in metrics(run_dir) if l["type"] == "epoch"] == [1, 2]
    with pytest.raises(SystemExit) as exit_info:
        cli(tmp_path, "--resume", str(run_dir), "--patch-size", "8", run_name=None)
    assert exit_info.value.code == 2 and "--patch-size 8 conflicts with the checkpoint (patch_size=4)" in capsys.readouterr().err


def test_checkpoints_every_n_epochs_keep_last(tmp_path, images):
    _, run_dir = run(tmp_path, images, "--epochs", "3", "--save-every", "1", "--keep-last", "2")
    names = sorted(p.name for p in run_dir.glob("checkpoint_step*.pt"))
    assert names == ["checkpoint_step00000008.pt", "checkpoint_step00000012.pt"]
    assert not list(run_dir.glob("*.tmp"))


def test_sigkill_during_checkpoint_write_leaves_previous_loadable(tmp_path):
    path = tmp_path / "checkpoint.pt"
    script = f"""
import sys, time, torch
sys.path.insert(0, {str(REPO)!r})
from workbench.files import atomic_save
atomic_save({{"w": torch.ones(1000)}}, __import__("pathlib").Path({str(path)!r}))
def stalled_save(obj, f):
    f.write(b"PK\\x03\\x04" + b"x" * 4096)  # a zip archive cut short
    f.flush()
    print("writing", flush=True)
    time.sleep(120)
torch.save = stalled_save
atomic_save({{"w": torch.zeros(1000)}}, __import__("pathlib").Path({str(path)!r}))
"""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(1000))
    partial = path.with_name(path.name + ".tmp")
    assert partial.exists()
    with pytest.raises(errors.UsageError, match="corrupt, truncated"):
        asmae_minimal.load_checkpoint(partial)


def test_sigterm_in_a_subprocess_checkpoints_and_exits(tmp_path, images):
    out = tmp_path / "runs"
    child = subprocess.Popen([sys.executable, str(REPO / "asmae_minimal.py"), "--device", "cpu", "--model", "tiny",
                              "--dataset", "folder", "--data-root", str(images), "--batch-size", "16",
                              "--epochs", "1000", "--log-every", "1", "--out-dir", str(out), "--run-name", "long"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_file = out / "long" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics_file.exists() and metrics_file.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    ckpt, _ = asmae_minimal.load_checkpoint(sorted((out / "long").glob("checkpoint_step*.pt"))[-1])
    assert ckpt["progress"]["step"] >= 1
    assert list((out / "long" / "recons").glob("recon_step*.png"))  # an interrupt's grid, not a final one


def test_two_runs_one_folder_the_second_exits_2_naming_the_first(tmp_path, images):
    """Issue 33 item 1: a run claims its folder (flock on .lock) before its data loads; a second run
    or resume on that folder exits 2 naming the first, and the first's records stay its own. The
    kernel drops a killed run's lock: the folder can be claimed again."""
    out = tmp_path / "runs"
    argv = [sys.executable, str(REPO / "asmae_minimal.py"), "--device", "cpu", "--model", "tiny", "--dataset",
            "folder", "--data-root", str(images), "--batch-size", "16", "--log-every", "1", "--out-dir", str(out)]
    first = subprocess.Popen([*argv, "--epochs", "1000", "--save-every", "1", "--run-name", "same"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics_file = out / "same" / "metrics.jsonl"
    deadline = time.time() + 120
    while not list((out / "same").glob("checkpoint_step*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    try:
        for extra in (["--epochs", "1", "--run-name", "same"], ["--epochs", "1", "--run-name", "same", "--overwrite"],
                      ["--resume", str(out / "same")]):
            second = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=120)
            assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, (extra, second.stderr)
            assert f"is in use by pid {first.pid}" in second.stderr, second.stderr
    finally:
        first.kill()
        first.wait()
    steps = [r["step"] for r in map(json.loads, metrics_file.read_text().splitlines()) if r.get("type") == "step"]
    assert steps == list(range(1, len(steps) + 1))  # one run's steps, once each
    files.claim_folder(out / "same")  # the killed run's lock went with it
    files.release_folders()
    assert (out / "same" / "config.json").exists() and not (out / "same" / ".lock").exists()


def test_corrupt_truncated_and_foreign_checkpoints_exit_2(tmp_path, images, capsys):
    summary, run_dir = run(tmp_path, images, "--epochs", "1")
    capsys.readouterr()
    good = Path(summary["checkpoint"])
    cases = {"garbage.pt": os.urandom(1000), "truncated.pt": good.read_bytes()[: good.stat().st_size // 2]}
    ckpt = torch.load(good, weights_only=True)
    ckpt["model"]["blocks.0.attn_proj.weight"] = torch.zeros(3, 3)
    torch.save(ckpt, tmp_path / "foreign.pt")
    torch.save({"not": "a checkpoint"}, tmp_path / "other.pt")
    old = {k: v for k, v in ckpt.items() if k != "config"}
    torch.save({**old, "args": {"dataset": "folder"}}, tmp_path / "old.pt")  # before the config dataclasses
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    messages = {"garbage.pt": "corrupt, truncated", "truncated.pt": "corrupt, truncated",
                "foreign.pt": "holds a different model", "other.pt": "not from asmae_minimal.py",
                "old.pt": "written by an earlier asmae_minimal.py"}
    for name, message in messages.items():
        for flag in ("--resume", "--eval"):
            with pytest.raises(SystemExit) as exit_info:
                cli(tmp_path, flag, str(tmp_path / name), run_name=None)
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (name, flag, err)


def test_checkpoint_fields_are_validated_before_anything_is_written(tmp_path, images, capsys):
    """Issue 33 item 4: a checkpoint's config of the wrong type, a negative step, no rng: one line
    naming the field, exit 2, and the run folder as it was (an empty metrics.jsonl was left)."""
    import shutil
    _, run_dir = run(tmp_path, images, "--epochs", "1")
    good = sorted(run_dir.glob("checkpoint_step*.pt"))[-1]
    cases = {"epochs": (lambda c: c["config"]["optim"].update(epochs="many"), "config.optim.epochs is 'many'"),
             "lr": (lambda c: c["config"]["optim"].update(lr=float("inf")), "config.optim.lr is inf"),
             "seed": (lambda c: c["config"]["run"].update(seed=True), "config.run.seed is True; expected int"),
             "step": (lambda c: c["progress"].update(step=-1), "progress "),
             "rng": (lambda c: c.pop("rng"), "missing rng"),
             "guard": (lambda c: c["guard"].pop("streak"), "guard is not"),
             "sums": (lambda c: c["progress"]["sums"].update(epoch_loss="x"), "progress.sums"),
             "run name": (lambda c: c["config"]["run"].update(run_name="../../etc"), "config.run.run_name '../../etc'")}
    for case, (spoil, message) in cases.items():
        folder = tmp_path / "runs" / f"bad-{case}"
        shutil.copytree(run_dir, folder)
        ckpt = torch.load(good, weights_only=True)
        spoil(ckpt)
        torch.save(ckpt, folder / good.name)
        before = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli(tmp_path, "--resume", str(folder), "--epochs", "2", run_name=None)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (case, err)
        assert {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before, case


def test_pickled_objects_in_checkpoints_are_refused(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"model": {}, "optimizer": {}, "args": {}, "progress": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(SystemExit):
        cli(tmp_path, "--resume", str(tmp_path / "evil.pt"), run_name=None)
    assert "cannot be read" in capsys.readouterr().err


def nan_at(monkeypatch, steps):
    """Make the loss NaN at these (1-based) optimizer steps."""
    real_forward, count = asmae_minimal.MAE.forward, [0]

    def forward(self, imgs, noise):
        loss, pred, mask = real_forward(self, imgs, noise)
        if self.training and torch.is_grad_enabled():
            count[0] += 1
            if count[0] in steps:
                loss = loss * float("nan")
        return loss, pred, mask
    monkeypatch.setattr(asmae_minimal.MAE, "forward", forward)


def test_nan_loss_is_skipped_and_counted(tmp_path, images, monkeypatch):
    snapshots = []
    real_step = asmae_minimal.TrainStep.__call__

    def step(self, imgs, noise, lr, number):
        before = [p.detach().clone() for p in self.model.parameters()]
        out = real_step(self, imgs, noise, lr, number)
        snapshots.append((number, all(torch.equal(a, p) for a, p in zip(before, self.model.parameters()))))
        return out
    monkeypatch.setattr(asmae_minimal.TrainStep, "__call__", step)
    nan_at(monkeypatch, {3, 5})
    _, run_dir = run(tmp_path, images, "--epochs", "2")
    # only the NaN steps left the weights as they were (step 1 too: the warmup starts at lr = 0)
    assert [number for number, unchanged in snapshots if unchanged] == [1, 3, 5]
    epochs = [l for l in metrics(run_dir) if l["type"] == "epoch"]
    assert [e["skipped_steps"] for e in epochs] == [1, 2] and all(e["loss"] == e["loss"] for e in epochs)


def test_epoch_lines_count_their_own_skips_and_no_loss_or_speed_they_do_not_have(tmp_path, images, monkeypatch,
                                                                                  capsys):
    """Issue 33 item 7: an epoch whose steps were all skipped logged loss 0.0; "skipped N" was the
    run's count on a line that reads per epoch; an epoch resumed at its last step logged 0 img/s."""
    nan_at(monkeypatch, {5, 6, 7, 8})  # all of epoch 2 (4 steps an epoch)
    _, run_dir = run(tmp_path, images, "--epochs", "3", "--max-bad-steps", "10")
    out = capsys.readouterr().out
    assert "epoch 2/3  loss n/a (every step skipped)" in out and "skipped 4 steps" in out
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert "skipped" not in epoch_lines[0] and "skipped" not in epoch_lines[2]
    epochs = [l for l in metrics(run_dir) if l["type"] == "epoch"]
    assert [e["loss"] is None for e in epochs] == [False, True, False] and epochs[2]["skipped_steps"] == 4
    json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])  # strict JSON: null, not NaN
    monkeypatch.undo()
    with monkeypatch.context() as patch:
        stop_after(patch, 4)  # the last step of epoch 1: its record is written on resume
        with pytest.raises(SystemExit):
            run(tmp_path, images, "--epochs", "2", run_name="end")
    summary = cli(tmp_path, "--resume", str(tmp_path / "runs" / "end"), run_name=None)[0]
    first = [l for l in metrics(tmp_path / "runs" / "end", timing=True) if l["type"] == "epoch"][0]
    assert first["img_per_s"] is None and len(summary["epoch_img_per_s"]) == 1 and summary["img_per_s"] > 0


def test_consecutive_nan_losses_stop_the_run(tmp_path, images, monkeypatch, capsys):
    nan_at(monkeypatch, set(range(6, 100)))
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, images, "--epochs", "4", "--save-every", "1", "--max-bad-steps", "3")
    err = capsys.readouterr().err
    assert exit_info.value.code == 3 and "not finite at step 6 and the 2 steps after it" in err
    checkpoints = sorted((tmp_path / "runs" / "run").glob("checkpoint_step*.pt"))
    assert [p.name for p in checkpoints] == ["checkpoint_step00000004.pt"]  # the last good one, intact
    weights = asmae_minimal.load_checkpoint(checkpoints[0])[0]["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_run_folders_never_collide(tmp_path, images, capsys):
    run(tmp_path, images, "--epochs", "1", run_name="same")
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, images, "--epochs", "1", run_name="same")
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    run(tmp_path, images, "--epochs", "1", "--overwrite", run_name="same")
    assert len([l for l in metrics(tmp_path / "runs" / "same") if l["type"] == "epoch"]) == 1
    run(tmp_path, images, "--epochs", "1", run_name=None)
    run(tmp_path, images, "--epochs", "1", run_name=None)
    assert len([p for p in (tmp_path / "runs").iterdir() if p.name.startswith("folder-tiny")]) == 2


def test_compile_workers_stop_after_the_first_steps_and_after_the_switch_recompiles(tmp_path, images, monkeypatch):
    """The pool of compile workers slows every step while it lives (the speed table's row on
    stop_compile_workers), and a recompile starts it again: stopped 3 steps after the start and
    3 steps after --high-precision-from's switch. (Compiling is stubbed: this is the loop's logic.)"""
    stopped_at, real_step = [], asmae_minimal.TrainStep.__call__
    steps = [0]

    def step(self, *args):
        steps[0] = args[-1]
        return real_step(self, *args)
    monkeypatch.setattr(asmae_minimal.TrainStep, "__call__", step)
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: fn)
    monkeypatch.setattr(asmae_minimal, "compile_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(asmae_minimal, "stop_compile_workers", lambda: stopped_at.append(steps[0]))
    run(tmp_path, images, "--precision", "nvfp4", "--epochs", "2", "--compile", "--high-precision-from", "0.25")
    assert stopped_at == [3, 2 + 3]


def test_high_precision_from_switches_once_and_resumes_across_the_switch(tmp_path, images, monkeypatch, capsys):
    """--high-precision-from 0.5 over 8 steps: steps 1-4 quantized, 5-8 not; the first 4 steps are
    those of the plain nvfp4 run; the switch is logged and recorded once; a run stopped before or
    after the switch resumes to the same weights and metrics."""
    real_step, seen = asmae_minimal.TrainStep.__call__, []

    def step(self, *args):
        seen.append(self.unquantized)
        return real_step(self, *args)
    monkeypatch.setattr(asmae_minimal.TrainStep, "__call__", step)
    common = ("--precision", "nvfp4", "--epochs", "2", "--save-every", "1", "--keep-last", "2")
    run(tmp_path, images, *common, run_name="plain")
    seen.clear()
    _, straight = run(tmp_path, images, *common, "--high-precision-from", "0.5", run_name="straight")
    assert seen == [False] * 4 + [True] * 4
    assert "[precision] steps 5-8: linear layers unquantized in fp32 (--high-precision-from 0.5)" in capsys.readouterr().out
    records = [r for r in metrics(straight) if r["type"] == "precision"]
    assert records == [{"type": "precision", "step": 5, "gemm": "fp32"}]
    plain_epoch1 = torch.load(tmp_path / "runs" / "plain" / "checkpoint_step00000004.pt", weights_only=True)
    switched_epoch1 = torch.load(straight / "checkpoint_step00000004.pt", weights_only=True)
    assert all(torch.equal(plain_epoch1["model"][k], switched_epoch1["model"][k]) for k in plain_epoch1["model"])
    assert not switched_epoch1["unquantized"] and torch.load(straight / "checkpoint_step00000008.pt",
                                                             weights_only=True)["unquantized"]
    plain, switched = final_weights(tmp_path / "runs" / "plain"), final_weights(straight)
    assert not torch.equal(plain["blocks.0.mlp.fc1_weight"], switched["blocks.0.mlp.fc1_weight"])  # 5-8 differ
    for stop_at in (4, 6):
        with monkeypatch.context() as patch:
            stop_after(patch, stop_at)
            with pytest.raises(SystemExit):
                run(tmp_path, images, *common, "--high-precision-from", "0.5", run_name=f"stopped{stop_at}")
        stopped = tmp_path / "runs" / f"stopped{stop_at}"
        cli(tmp_path, "--resume", str(stopped), run_name=None)
        a, b = final_weights(straight), final_weights(stopped)
        assert all(torch.equal(a[k], b[k]) for k in a), stop_at
        assert metrics(stopped) == metrics(straight), stop_at


def test_sigterm_while_the_final_checkpoint_is_written_exits_with_everything_written(tmp_path, images, monkeypatch,
                                                                                    capsys):
    """Issue 33 item 5: a signal that arrives while the final checkpoint is saved is honoured once
    the checkpoint and the final grid are written (it was ignored: exit 0, a sweep went on)."""
    real_save = asmae_minimal.save_checkpoint

    def save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled between two bytecodes: during the save
        return real_save(*args, **kwargs)
    monkeypatch.setattr(asmae_minimal, "save_checkpoint", save)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, images, "--epochs", "1", run_name="term")
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM; checkpoint" in capsys.readouterr().err
    run_dir = tmp_path / "runs" / "term"
    assert list(run_dir.glob("checkpoint_step*.pt")) and (run_dir / "recons" / "final_recon_ep0001.png").exists()


def test_resume_of_a_complete_run_writes_a_missing_final_grid(tmp_path, images, capsys):
    """Issue 33 item 3: killed (or out of disk) between the final checkpoint and the final grid,
    a run's --resume said it was complete and wrote nothing; it writes the grid, and only that."""
    _, run_dir = run(tmp_path, images, "--epochs", "1")
    before = (run_dir / "metrics.jsonl").read_text()
    grids = [*(run_dir / "recons").glob("final_recon_*"), *(tmp_path / "runs" / "recons").glob("*final_recon_*")]
    assert len(grids) == 4  # .png and .pt, in the run and in <out-dir>/recons
    for grid in grids:
        grid.unlink()
    summary = cli(tmp_path, "--resume", str(run_dir), run_name=None)[0]
    assert "is complete" in capsys.readouterr().out
    assert all(grid.exists() for grid in grids) and summary["recon"] == str(run_dir / "recons" / "final_recon_ep0001.png")
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_a_sweep_killed_after_a_cells_final_checkpoint_finishes(tmp_path, images, capsys):
    """Issue 33 item 2: a sweep killed after a cell's final checkpoint (no grid, no cell.json yet)
    ended every rerun in KeyError 'recon'; it finishes, and a cell.json left without a grid by the
    old code leaves that variant out of recons.png with a line instead of a crash."""
    argv = ("--dataset", "folder", "--data-root", str(images), "--epochs", "1", "--finetune-epochs", "0",
            "--compare", "fp32,bf16")
    root = cli(tmp_path, *argv, run_name="sw")[1]
    cell = root / "fp32-seed0"
    for path in (cell / "cell.json", *(cell / "recons").glob("final_recon_*"), root / "compare" / "recons.png"):
        path.unlink()  # as a kill -9 right after the cell's final checkpoint left it
    cli(tmp_path, *argv, run_name="sw")
    assert (root / "compare" / "recons.png").exists() and (cell / "recons" / "final_recon_ep0001.png").exists()
    done = json.loads((cell / "cell.json").read_text())
    del done["recon"]
    (cell / "cell.json").write_text(json.dumps(done))
    capsys.readouterr()
    cli(tmp_path, *argv, run_name="sw")
    assert "fp32: no final reconstruction grid in its cells; left out of recons.png" in capsys.readouterr().out


def test_a_sweep_killed_at_a_cells_final_grid_resumes_to_the_same_results(tmp_path, images):
    """Issue 33 items 2 and 3 with a real kill -9, in a child process, at the first cell's final grid
    (right after its final checkpoint): the rerun writes the grid, finishes the sweep, and its
    weights and records equal a sweep that ran straight through."""
    argv = ["--device", "cpu", "--model", "tiny", "--batch-size", "16", "--log-every", "2", "--dataset", "folder",
            "--data-root", str(images), "--epochs", "1", "--finetune-epochs", "0", "--compare", "fp32",
            "--out-dir", str(tmp_path / "runs")]
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
import asmae_minimal
real = asmae_minimal.save_reconstructions
def save(*args):
    if args[-1].startswith("final_recon"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)
asmae_minimal.save_reconstructions = save
asmae_minimal.main({argv + ["--run-name", "killed"]!r})
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    killed = tmp_path / "runs" / "killed"
    assert list((killed / "fp32-seed0").glob("checkpoint_step*.pt")) and not (killed / "fp32-seed0" / "cell.json").exists()
    asmae_minimal.main(argv + ["--run-name", "killed"])
    asmae_minimal.main(argv + ["--run-name", "straight"])
    straight = tmp_path / "runs" / "straight"
    for cell in ("fp32-seed0",):
        a, b = final_weights(straight / cell), final_weights(killed / cell)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), cell
        assert metrics(straight / cell) == metrics(killed / cell), cell
        assert (killed / cell / "recons" / "final_recon_ep0001.png").exists()
    assert (killed / "compare" / "recons.png").exists() and (killed / "compare" / "table.md").exists()


def test_a_checkpoint_saved_before_the_precision_field_was_renamed_still_loads(tmp_path, images):
    """Issue 32 renamed config.precision.name to config.precision.precision; a checkpoint written
    before (its precision section holds 'name') loads to the same Config, and a bad value there is
    refused with one line naming the field."""
    _, run_dir = run(tmp_path, images, "--epochs", "1", "--precision", "nvfp4")
    path = files.latest_checkpoint(run_dir)
    ckpt = torch.load(path, weights_only=True)
    _, config = asmae_minimal.load_checkpoint(path)
    ckpt["config"]["precision"]["name"] = ckpt["config"]["precision"].pop("precision")
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    assert asmae_minimal.load_checkpoint(old)[1] == config and config.precision.precision == "nvfp4"
    ckpt["config"]["precision"]["name"] = "fp5"
    torch.save(ckpt, old)
    with pytest.raises(errors.UsageError, match="config.precision.precision is 'fp5'"):
        asmae_minimal.load_checkpoint(old)


def test_wandb_receives_the_metrics(tmp_path, monkeypatch):
    logged, inits = [], []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: inits.append(kwargs) or types.SimpleNamespace(
        log=lambda data, step=None: logged.append((step, data)), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(workbench_cli.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setenv("WANDB_MODE", "offline")
    data = write_image_folder(tmp_path / "images", classes=2, per_class=20)
    cli(tmp_path, "--dataset", "folder", "--data-root", str(data), "--epochs", "1", "--use-wandb", run_name="wb")
    assert inits[0]["project"] == "nvfp4-mae" and inits[0]["config"]["dataset"] == "folder"
    assert any("step/loss" in data for _, data in logged) and any("epoch/loss" in data for _, data in logged)
