"""Run folders and the files in them: atomic writes, strict JSON, the folder lock that keeps two
runs out of one folder; checkpoints (saved atomically, read as untrusted input: every field
checked) and loaded into a model of either backend; metrics.jsonl written (RunLog, with stdout
lines and W&B), cut back for a resume and read back as the run's summary. Nothing here writes
outside --out-dir."""
from __future__ import annotations

import errno
import fcntl
import fnmatch
import itertools
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import typing
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

import nvfp4
from workbench.errors import UsageError


def check_run_name(name: str, out_dir: str):
    """A run folder lies strictly inside --out-dir: plain folder names (a, or a/b), each one the
    filesystem takes."""
    parts = name.split("/")
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\0" in name:
        raise UsageError(f"--run-name {name!r} must be plain folder names (a or a/b) inside --out-dir, "
                         f"without '/' at the start, '.' or '..'")
    longest = max(parts, key=lambda part: len(os.fsencode(part)))
    if len(os.fsencode(longest)) > 255:
        raise UsageError(f"--run-name: a folder name takes at most 255 bytes, {longest[:20]}... has "
                         f"{len(os.fsencode(longest))}")
    length = len(os.fsencode(os.path.abspath(os.path.join(out_dir, name))))
    if length > 4096 - 64:  # PATH_MAX, less room for the run's own file names
        raise UsageError(f"--out-dir and --run-name make a path of {length} bytes; with the run's file names "
                         f"it must stay under 4,096")


class RecordingWriter:
    """A file for torch.save that keeps the OSError of a failed write: torch reports one as
    RuntimeError('unexpected pos'), which does not say why (e.g. a full disk)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.file.flush()


def atomic_write_text(path: Path, text: str):
    """path's new text, or its old one after a crash: written beside it, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save(obj, path: Path):
    """torch.save to a temp file, fsync, rename: a crash never leaves a truncated file. A failed
    write removes the temp file and raises the write's OSError."""
    tmp = path.with_name(path.name + ".tmp")
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = RecordingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, RuntimeError) and writer is not None and writer.error is not None:
            raise writer.error from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def checkpoints(run_dir: Path) -> list:
    """A run folder's checkpoints, oldest first."""
    return sorted(Path(run_dir).glob("checkpoint_step*.pt"))


def latest_checkpoint(run_dir) -> Optional[Path]:
    """A run folder's newest checkpoint, or None (also without a folder: DDP ranks > 0)."""
    found = checkpoints(run_dir) if run_dir else []
    return found[-1] if found else None


def find_checkpoint(path: str, flag: str) -> Path:
    """The checkpoint file, or a run folder's newest; flag (--resume, --eval) names the error."""
    p = Path(path)
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise UsageError(f"{flag} {path}: no checkpoint_step*.pt in this folder")
        return found
    if not p.is_file():
        raise UsageError(f"{flag} {path}: no such checkpoint file or run folder")
    return p


def strict_json(obj, **kwargs) -> str:
    """json.dumps with NaN and infinities written as null, as strict JSON parsers require (Python
    writes NaN, which they reject)."""
    def finite(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


# What this program writes in a run folder; a compare folder also holds run folders.
RUN_FILES = (LOCK_FILE := ".lock", "config.json", "metrics.jsonl", "checkpoint_step*.pt", "checkpoint_step*.pt.tmp",
             "eval_*.json", "recons", "compare", "wandb", "cell.json", "cell_eval.json", "cell*.json.tmp")


def plan_run_dir(config, what: Optional[str] = None) -> Path:
    """The run folder, claimed (claim_folder) before any data loads: OUT_DIR/RUN_NAME, which must
    be empty or, with --overwrite, a run folder of this program's; or a new OUT_DIR/dataset-model-
    WHAT-timestamp (WHAT: the precision, or 'compare'). Its parent must take new folders."""
    r, out = config.run, Path(config.run.out_dir)
    if not r.run_name:
        what = what or config.precision.precision
        base = out / f"{config.data.dataset}-{config.model.preset}-{what}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_writable(base)
        for n in itertools.count(1):  # an exclusive mkdir: two runs in one second take two names
            run_dir = base if n == 1 else base.with_name(f"{base.name}-{n}")
            if claim_folder(run_dir, exclusive=True):
                return run_dir
    run_dir = out / r.run_name
    if run_dir.resolve() == out.resolve() or not run_dir.resolve().is_relative_to(out.resolve()):
        raise UsageError(f"--run-name {r.run_name} leads out of --out-dir {out} (through a link)")
    check_writable(run_dir)
    claim_folder(run_dir)
    if any(entry.name != LOCK_FILE for entry in run_dir.iterdir()):
        if not r.overwrite:
            raise UsageError(f"{run_dir} exists; pass --overwrite to replace it, another --run-name, "
                             f"or --resume {run_dir} to continue it")
        foreign = foreign_entry(run_dir)
        if foreign:
            raise UsageError(f"--overwrite deletes only run folders of asmae_minimal.py, and {run_dir} holds "
                             f"{foreign}; move it, or choose another --run-name")
    return run_dir


CLAIMED = {}  # resolved run folder -> (its open lock file, the folders claim_folder made for it)


def claim_folder(folder: Path, exclusive: bool = False) -> bool:
    """Make `folder` (and missing parents) and hold an exclusive lock on folder/.lock until
    release_folders, so that two runs never share a folder: a second run (or resume, or sweep)
    exits 2 naming the first. The lock is the kernel's (flock), so a killed run leaves none
    behind. exclusive: False, instead of claiming, if the folder already exists."""
    key = folder.resolve()
    if key in CLAIMED:
        return True
    made = [p for p in (folder, *folder.absolute().parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=not exclusive)
    except FileExistsError:
        return False
    while True:
        lock = open(folder / LOCK_FILE, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise UsageError(f"{folder} is in use by {holder}; wait for it to end, or choose another "
                             f"--run-name") from None
        try:  # a run that ended unlinked the file it held: a lock on that one would claim nothing
            if os.stat(folder / LOCK_FILE).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} ({' '.join(sys.argv[:1] + sys.argv[1:6])}...)\n")
    lock.flush()
    CLAIMED[key] = (lock, made)
    return True


def release_folders():
    """Release every claimed folder: the lock file goes, and a folder that holds nothing else
    (a run that failed before it started) goes with the parents claim_folder made for it."""
    for folder, (lock, made) in list(CLAIMED.items()):
        (folder / LOCK_FILE).unlink(missing_ok=True)
        lock.close()
        for path in reversed(made):
            try:
                path.rmdir()  # only if empty
            except OSError:
                break
        del CLAIMED[folder]


def foreign_entry(folder: Path) -> Optional[str]:
    """What in `folder` this program did not write ('no config.json' if it is no run folder), or None."""
    if not (folder / "config.json").is_file():
        return "no config.json"
    for entry in sorted(folder.iterdir()):
        ours = any(fnmatch.fnmatch(entry.name, pattern) for pattern in RUN_FILES)
        if not ours and not (entry.is_dir() and not entry.is_symlink() and foreign_entry(entry) is None):
            return entry.name
    return None


def check_writable(path: Path):
    """path (a file or folder to make) can be made: its nearest existing ancestor is a folder
    this process may write in."""
    ancestor = next(a for a in (path, *path.absolute().parents) if a.exists())
    if not ancestor.is_dir():
        raise UsageError(f"{ancestor} is a file, not a folder; choose another --out-dir or --run-name")
    try:
        tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as error:
        raise UsageError(f"cannot write in {ancestor} ({error.strerror}); choose another --out-dir") from None


def make_run_dir(run_dir: Path, overwrite: bool):
    """Empty the folder plan_run_dir claimed for --overwrite (after the data loaded: a failed
    start deletes nothing), keeping its lock."""
    if overwrite:
        for entry in run_dir.iterdir():
            if entry.name != LOCK_FILE:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def rng_state(device):
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    algorithm, keys, *rest = state["numpy"]
    np.random.set_state((algorithm, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(train_step, config, run_dir: Path, progress: dict) -> Path:
    """model, optimizer, scaler, loss guard, progress (epoch, batch, step, running sums), config, RNG,
    and whether the precision schedule has switched the linear layers to high precision."""
    t = train_step
    state = {"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
             "scaler": t.scaler.state_dict() if t.scaler else None, "guard": t.guard.state_dict(),
             "progress": progress, "config": asdict(config), "rng": rng_state(t.device),
             "unquantized": t.unquantized}
    path = run_dir / f"checkpoint_step{progress['step']:08d}.pt"
    try:
        atomic_save(state, path)
    except OSError as error:
        last = latest_checkpoint(run_dir)  # path itself was not written
        why = "no space left on device" if error.errno in (errno.ENOSPC, errno.EDQUOT) else error.strerror
        raise UsageError(f"{why} writing {path}; the last good checkpoint is {last or 'none'}"
                         f"{f' (--resume {run_dir})' if last else ''}") from None
    for old in checkpoints(run_dir)[:-config.run.keep_last]:
        old.unlink()
    return path


def metrics_records(path: Path):
    """(line, record) of each line of a metrics.jsonl; a line cut short by a kill is skipped."""
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            yield line, json.loads(line)
        except json.JSONDecodeError:
            continue


def truncate_metrics(path: Path, step: int):
    """Drop metrics.jsonl's records after `step`, where a resumed run starts: a run killed after
    its last checkpoint had logged them, and the resumed run logs them again."""
    if path.exists():  # fp4_summary (the run's end) has no step
        atomic_write_text(path, "".join(line + "\n" for line, record in metrics_records(path)
                                        if record.get("step", math.inf) <= step))


def read_summary(path: Path) -> dict:
    """A run's record read back from its metrics.jsonl: the loss curves by logged step and by
    epoch, the last epoch's loss, the median epoch's img/s (an epoch that compiles, or the one a
    precision switch recompiles in, is an outlier; an epoch resumed at its end has none), the
    step the precision schedule switched at, and the FP4 statistics' summary. A line cut short by
    a kill is skipped."""
    summary = {"curve": [], "epoch_curve": [], "epoch_img_per_s": []}
    for _, record in metrics_records(path):
        record_type = record.get("type")
        if record_type == "step" and record["loss"] is not None:  # None: the guard skipped every step since the last
            summary["curve"].append((record["step"], record["loss"]))
        elif record_type == "epoch":
            if record["loss"] is not None:
                summary["epoch_curve"].append((record["step"], record["loss"]))
                summary["final_loss"] = record["loss"]
            if record.get("img_per_s") is not None:
                summary["epoch_img_per_s"].append(record["img_per_s"])
        elif record_type == "precision":
            summary["high_precision_from_step"] = record["step"]
        elif record_type == "fp4_summary":
            summary["fp4_stats"] = record["layers"]
    if summary["epoch_img_per_s"]:
        summary["img_per_s"] = statistics.median(summary["epoch_img_per_s"])
    return summary


def rename_legacy_fields(config) -> None:
    """A config saved (checkpoint, sweep plan) before the precision field was named precision,
    when it was name: renamed in place; anything else is left for the checks that follow."""
    section = config.get("precision") if isinstance(config, dict) else None
    if isinstance(section, dict) and "name" in section:
        section["precision"] = section.pop("name")


def load_checkpoint(path: Path, config_cls, loss_sums) -> tuple:
    """(checkpoint dict, its Config: the script's config_cls). A checkpoint is untrusted input:
    weights_only=True unpickles tensors and plain data only, and every field is checked
    (checkpoint_problem; loss_sums: the names of the running loss sums its progress may hold)."""
    try:
        with warnings.catch_warnings():  # torch's own lines about legacy formats: the refusal below says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"checkpoint {path} cannot be read: corrupt, truncated or not a checkpoint "
                         f"({type(error).__name__})") from None
    if isinstance(ckpt, dict) and "args" in ckpt and "config" not in ckpt:
        raise UsageError(f"checkpoint {path} was written by an earlier asmae_minimal.py (flat 'args', not a "
                         f"'config'); resume or evaluate it with that version")
    missing = CHECKPOINT_KEYS - set(ckpt) if isinstance(ckpt, dict) else {"all"}
    if missing:
        raise UsageError(f"checkpoint {path} is not from asmae_minimal.py (missing {', '.join(sorted(missing))})")
    rename_legacy_fields(ckpt["config"])
    problem = checkpoint_problem(ckpt, config_cls, loss_sums)
    if problem:
        raise UsageError(f"checkpoint {path}: {problem}")
    try:
        return ckpt, config_cls.from_dict(ckpt["config"])
    except (TypeError, KeyError, AttributeError) as error:
        raise UsageError(f"checkpoint {path} holds a config this version cannot read ({error})") from None


CHECKPOINT_KEYS = {"model", "optimizer", "config", "progress", "rng", "guard", "scaler"}


def checkpoint_problem(ckpt: dict, config_cls, loss_sums) -> Optional[str]:
    """What in a checkpoint (untrusted input) has the wrong type, range or shape of what
    save_checkpoint writes, naming the field; None if nothing: checked before a run writes anything."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    is_number = lambda v: (is_int(v) or isinstance(v, float)) and math.isfinite(v)
    fits = {type(None): lambda v: v is None, bool: lambda v: isinstance(v, bool), int: is_int, float: is_number,
            str: lambda v: isinstance(v, str),
            tuple: lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)}
    if not isinstance(ckpt["config"], dict):
        return "config is not a table of sections"
    for section, cls in config_cls.SECTIONS.items():
        values = ckpt["config"].get(section)
        if not isinstance(values, dict):
            return f"config.{section} is missing"
        for f in fields(cls):
            types = typing.get_args(f.type) or (f.type,)
            if f.name in values and not any(fits.get(t, lambda v: True)(values[f.name]) for t in types):
                expected = " or ".join("None" if t is type(None) else t.__name__ for t in types)
                return f"config.{section}.{f.name} is {values[f.name]!r}; expected {expected}"
    precision = ckpt["config"]["precision"].get("precision")
    if precision not in (None, *nvfp4.PRECISIONS):
        return f"config.precision.precision is {precision!r}; expected one of {', '.join(nvfp4.PRECISIONS)}"
    run = ckpt["config"]["run"]
    try:
        check_run_name(run.get("run_name") or "run", run.get("out_dir") or "runs")
    except UsageError:
        return f"config.run.run_name {run.get('run_name')!r} is not a plain folder name inside its --out-dir"
    progress = ckpt["progress"]
    if not isinstance(progress, dict) or not all(is_int(progress.get(k)) and progress[k] >= 0
                                                 for k in ("epoch", "batch", "step")):
        return f"progress {progress!r} is not epoch, batch and step counts (integers >= 0)"
    sums = progress.get("sums", {})
    if not isinstance(sums, dict) or not all(k in loss_sums and is_number(v) for k, v in sums.items()):
        return "progress.sums is not a table of finite loss sums"
    rng = ckpt["rng"]
    if not (isinstance(rng, dict) and {"python", "numpy", "torch"} <= set(rng) and torch.is_tensor(rng["torch"])
            and rng["torch"].dtype == torch.uint8 and (rng.get("cuda") is None or torch.is_tensor(rng["cuda"]))):
        return "rng is not the random generators' states"
    guard = ckpt["guard"]
    if not (isinstance(guard, dict) and all(torch.is_tensor(guard.get(k)) and guard[k].numel() == 1
                                            for k in ("skipped", "streak", "trigger_step"))):
        return "guard is not the loss guard's three counters"
    if not isinstance(ckpt["model"], dict) or not all(torch.is_tensor(v) for v in ckpt["model"].values()):
        return "model is not a table of tensors"
    if not isinstance(ckpt["optimizer"], dict) or not {"state", "param_groups"} <= set(ckpt["optimizer"]):
        return "optimizer is not an optimizer's state"
    return None


def load_model_state(model, state: dict, source: str):
    """Load weights from either backend: TE's `_extra_state` entries carry no weights."""
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    wrong = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if wrong:
        raise UsageError(f"{source} holds a different model ({len(wrong)} mismatched tensors, e.g. {wrong[0]})")
    model.load_state_dict(state, strict=False)


class RunLog:
    """metrics.jsonl (appended), stdout lines and optional W&B, written by rank 0 only."""

    def __init__(self, run_dir: Path, config, active: bool):  # config: the run's Config
        self.active, self.wandb = active, None
        self.file = open(run_dir / "metrics.jsonl", "a") if active else None
        if active and config.run.use_wandb:
            import wandb
            self.wandb = wandb.init(project=config.run.wandb_project, name=run_dir.name, dir=str(run_dir),
                                    config=config.flat(), resume="allow")

    def metrics(self, record: dict):
        if not self.active:
            return
        self.file.write(strict_json(record) + "\n")
        self.file.flush()
        if self.wandb:
            self.wandb.log({f"{record['type']}/{k}": v for k, v in record.items()
                            if isinstance(v, (int, float)) and k != "type"}, step=record.get("step"))

    def print(self, line: str):
        if self.active:
            tqdm.write(line)

    def close(self):
        if self.file:
            self.file.close()
        if self.wandb:
            self.wandb.finish()
