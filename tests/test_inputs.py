"""Hostile and mistaken inputs: nothing is written or deleted outside --out-dir, every bad input
is one line and exit 2 before the data loads, and runs keep their books straight (disk full,
kills, resumes)."""
import json
import shutil
from pathlib import Path

import pytest

import asmae_minimal
from conftest import cli, fails, metrics
import workbench.evaluate
from workbench import cli as workbench_cli, files

NO_DATA = ["--dataset", "folder", "--data-root", "/nonexistent"]  # checks that wait for the data fail on this


@pytest.fixture
def tree(tmp_path):
    """parent/{out/, precious.txt}, victim/data.txt: what a run must never touch."""
    (tmp_path / "parent" / "out").mkdir(parents=True)
    (tmp_path / "parent" / "precious.txt").write_text("keep")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "data.txt").write_text("keep")
    return tmp_path


def untouched(tree):
    return (tree / "parent" / "precious.txt").read_text() == "keep" == (tree / "victim" / "data.txt").read_text()


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/../../x", "", "a//b", "{victim}"])
def test_run_name_stays_inside_out_dir(tree, capsys, name):
    name = name.replace("{victim}", str(tree / "victim"))
    fails(capsys, ["--out-dir", str(tree / "parent" / "out"), "--run-name", name, "--overwrite", *NO_DATA],
          "--run-name")
    assert untouched(tree) and not (tree / "parent" / "x").exists() and not (tree / "x").exists()


def test_overwrite_deletes_only_run_folders_of_this_program(tree, images, capsys):
    out = tree / "parent" / "out"
    (out / "victim").mkdir()
    (out / "victim" / "data.txt").write_text("keep")
    fails(capsys, ["--out-dir", str(out), "--run-name", "victim", "--overwrite", *NO_DATA], "holds no config.json")
    assert (out / "victim" / "data.txt").exists()
    cli(tree, "--dataset", "folder", "--data-root", str(images), "--epochs", "1", run_name="mine")
    capsys.readouterr()
    shutil.move(tree / "runs" / "mine", out / "mine")
    (out / "mine" / "notes.txt").write_text("mine, not the program's")
    fails(capsys, ["--out-dir", str(out), "--run-name", "mine", "--overwrite", *NO_DATA], "holds notes.txt")
    (out / "mine" / "notes.txt").unlink()
    (out / "link").symlink_to(tree / "victim")  # a name inside --out-dir that leads out of it
    fails(capsys, ["--out-dir", str(out), "--run-name", "link", "--overwrite", *NO_DATA], "leads out of --out-dir")
    assert untouched(tree)
    cli(tree, "--dataset", "folder", "--data-root", str(images), "--epochs", "1", "--out-dir", str(out),
        "--overwrite", run_name="mine")  # the program's own folder: replaced
    assert not (out / "mine" / "notes.txt").exists() and (out / "mine" / "config.json").exists()


def test_unwritable_outputs_and_bad_numbers_fail_before_the_data_loads(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("")
    cases = {
        "out-dir is a file": (["--out-dir", str(tmp_path / "afile")], "is a file, not a folder"),
        "out-dir under a file": (["--out-dir", str(tmp_path / "afile" / "runs")], "is a file, not a folder"),
        "out-dir not writable": (["--out-dir", "/proc/asmae-runs"], "cannot write in /proc"),  # even for root
        "300-character run name": (["--run-name", "a" * 300], "a folder name takes at most 255 bytes"),
        "negative seed": (["--seed", "-1"], "--seed must be in [0, 2^32), got -1"),
        "huge seed": (["--seed", "1" + "0" * 23], "--seed must be in [0, 2^32)"),
        "huge images": (["--img-size", "100000"], "one batch's images and masking noise alone take"),
        **{f"{flag} inf": ([flag, "inf"], f"argument {flag}: takes a finite number, got 'inf'")
           for flag in ("--lr", "--blr", "--weight-decay", "--warmup-epochs", "--mask-ratio")},
        "full-width digit": (["--epochs", "\uff11"], "argument --epochs: takes an integer"),
        "full-width seed": (["--compare", "fp32", "--seeds", "\uff11"], "--seeds takes comma-separated integers"),
        # issue 33 item 10
        "cpu index": (["--device", "cpu:7"], "the CPU is one device"),
        "empty out-dir": (["--out-dir", ""], "--out-dir is empty"),
        "one patch": (["--img-size", "32", "--patch-size", "32"], "gives 1 patch"),
        "500 workers": (["--num-workers", "500"], "--num-workers must be in [0,"),
        "same variant twice": (["--compare", "fp32,fp32:no-amp"], "'fp32' and 'fp32:no-amp' are the same configuration"),
    }
    for case, (argv, message) in cases.items():
        fails(capsys, ["--out-dir", str(tmp_path / "runs"), *argv, *NO_DATA], message)
    assert not (tmp_path / "runs").exists()


def test_wandb_without_a_login_says_how_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(workbench_cli.importlib.util, "find_spec", lambda name: object())
    for variable in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    fails(capsys, ["--out-dir", str(tmp_path / "runs"), "--use-wandb", *NO_DATA], "WANDB_MODE=offline")
    (tmp_path / "no-netrc").write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert workbench_cli.wandb_can_log()  # what `wandb login` writes
    assert not (tmp_path / "runs").exists()


def test_compare_refuses_a_bad_variant_list_before_training(tmp_path, capsys):
    for variants, message in (("fp32,fp32", "--compare takes"), (",", "--compare takes"),
                              ("bf16,int8", "'int8' is not a precision"), ("nvfp4:no-rht=3", "unrecognized arguments: 3")):
        fails(capsys, ["--out-dir", str(tmp_path / "runs"), "--compare", variants, *NO_DATA], message)
    assert not (tmp_path / "runs").exists()


def test_full_disk_during_a_checkpoint_is_one_line_and_resume_works(tmp_path, images, capsys, monkeypatch):
    """The second checkpoint's temp file is /dev/full, which fails every write with ENOSPC."""
    run_dir = tmp_path / "runs" / "full"
    real_step = asmae_minimal.TrainStep.__call__

    def step(self, imgs, noise, lr, number):
        if number == 5:
            (run_dir / "checkpoint_step00000008.pt.tmp").symlink_to("/dev/full")
        return real_step(self, imgs, noise, lr, number)
    with monkeypatch.context() as patch:
        patch.setattr(asmae_minimal.TrainStep, "__call__", step)
        with pytest.raises(SystemExit) as exit_info:
            cli(tmp_path, "--dataset", "folder", "--data-root", str(images), "--epochs", "2", "--save-every", "1",
                run_name="full")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.endswith(f"no space left on device writing {run_dir / 'checkpoint_step00000008.pt'}; the last good "
                        f"checkpoint is {run_dir / 'checkpoint_step00000004.pt'} (--resume {run_dir})")
    assert not list(run_dir.glob("*.tmp"))
    cli(tmp_path, "--resume", str(run_dir), run_name=None)
    assert [p.name for p in sorted(run_dir.glob("checkpoint_step*.pt"))] == ["checkpoint_step00000004.pt",
                                                                              "checkpoint_step00000008.pt"]
    assert [(l["type"], l["step"]) for l in metrics(run_dir)] == [
        ("step", 2), ("step", 4), ("epoch", 4), ("step", 6), ("step", 8), ("epoch", 8)]  # no record twice


def test_resume_after_a_kill_logs_no_step_twice(tmp_path, images):
    """A run killed after logging steps past its last checkpoint: the resumed run logs them once."""
    _, straight = cli(tmp_path, "--dataset", "folder", "--data-root", str(images), "--epochs", "2", run_name="straight")
    _, killed = cli(tmp_path, "--dataset", "folder", "--data-root", str(images), "--epochs", "2", "--save-every", "1",
                    run_name="killed")
    (killed / "checkpoint_step00000008.pt").unlink()  # as if killed after step 8's records, before its checkpoint
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"type": "step", "step": 9, "lo')  # and one line cut short
    cli(tmp_path, "--resume", str(killed), run_name=None)
    assert metrics(killed) == metrics(straight)


def test_resume_and_eval_bookkeeping(tmp_path, images, capsys):
    _, run_dir = cli(tmp_path, "--dataset", "folder", "--data-root", str(images), "--epochs", "1")
    capsys.readouterr()
    fails(capsys, ["--resume", str(run_dir), "--run-name", "elsewhere"], "stay in the checkpoint's own folder")
    fails(capsys, ["--resume", str(run_dir), "--out-dir", str(tmp_path / "other")], "drop --out-dir")
    fails(capsys, ["--resume", str(run_dir), "--compare", "fp32"], "--compare and --resume do not go together")
    (tmp_path / "empty").mkdir()
    fails(capsys, ["--eval", str(tmp_path / "empty")], "--eval ")
    before = (run_dir / "metrics.jsonl").read_text()
    summary = asmae_minimal.main(["--resume", str(run_dir), "--device", "cpu"])
    assert "is complete (1 of 1 epoch); pass --epochs N" in capsys.readouterr().out
    assert (run_dir / "metrics.jsonl").read_text() == before and "checkpoint" not in summary


def test_first_run_rough_edges(tmp_path, images, capsys):
    summary, run_dir = cli(tmp_path, "--dataset", "folder", "--data-root", str(images), "--epochs", "1",
                           "--log-every", "1000", run_name=None)
    out, err = capsys.readouterr()
    assert "never reaches its peak" in out  # warmup 5 of 1 epochs
    assert "loss=" in err and "lr=" in err  # the bar shows them from the first step
    assert "lr=0.00e+00" not in err.replace("\r", "\n").splitlines()[-2]  # its lr moves with every step
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "config.json").read_text())["run"]["run_name"] == run_dir.name
    assert (tmp_path / "runs" / "recons" / f"{run_dir.name}_final_recon_ep0001.png").exists()
    fails(capsys, ["--precision", "nvfp4", "--keep-high-precision", "patch_embd", "--dataset", "fake",
                   "--batch-size", "16", "--out-dir", str(tmp_path / "runs")], "'patch_embd' matches no layer")
    with pytest.raises(SystemExit):
        asmae_minimal.main(["--help"])
    assert "seeds data order, augmentation, masking and weights (default: 0)" in " ".join(capsys.readouterr().out.split())


def test_a_full_disk_without_a_file_name_and_eval_on_a_read_only_folder_are_one_line(tmp_path, images, capsys,
                                                                                      monkeypatch):
    """Issue 33 item 10: a disk filling while the grid was written said 'No space left on device:
    None'; --eval on a read-only folder evaluated fully before it failed to write."""
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(asmae_minimal, "save_reconstructions", full)
        with pytest.raises(SystemExit) as exit_info:
            cli(tmp_path, "--dataset", "folder", "--data-root", str(images), "--epochs", "1", run_name="full")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "No space left on device (writing the run's outputs)" in err and "None" not in err
    _, run_dir = cli(tmp_path, "--dataset", "folder", "--data-root", str(images), "--epochs", "1")
    capsys.readouterr()
    monkeypatch.setattr(workbench.evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking the folder"))
    monkeypatch.setattr(files.tempfile, "TemporaryFile",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    fails(capsys, ["--eval", str(run_dir)], "cannot write in")
