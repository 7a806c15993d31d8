"""Run folders and the files in them: atomic writes, strict JSON, the folder lock that keeps two
runs out of one folder, and where checkpoints are. Nothing here writes outside --out-dir."""
from __future__ import annotations

import fcntl
import fnmatch
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

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

