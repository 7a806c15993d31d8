"""--compare: the variants x seeds sweep. Every cell (a variant's config with one seed: the same
init, data order and masks across variants) trains in its own folder of one compare root and is
evaluated; a rerun with the same arguments skips finished cells and resumes an interrupted one.
The report (workbench.report) is written once every cell is done."""
from __future__ import annotations

import gc
import json
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch

from workbench import report
from workbench.errors import Interrupted, StopRequest, UsageError
from workbench.evaluate import Finetune, evaluate
from workbench.files import (atomic_write_text, claim_folder, make_run_dir, plan_run_dir, rename_legacy_fields,
                             strict_json)


def run_compare(variants: tuple, seeds: tuple, finetune: Finetune, train) -> dict:
    """Train every (variant, seed) cell in its folder of one compare root (train(config, run_dir):
    the script's training run of a cell, new or resumed, not yet trained), evaluate it, then write
    compare/ (workbench.report). A rerun with the same arguments and --run-name skips the
    finished cells and resumes an interrupted one."""
    root = compare_root(variants, seeds, finetune)
    results = {}
    for label, config in variants:
        for seed in seeds:
            results.setdefault(label, {})[seed] = run_cell(root, label, config.replace(seed=seed), finetune, train)
            gc.collect()  # the finished cell's model and optimizer state, before the next measures its peak
        torch._dynamo.reset()  # graphs are kept across the seeds of one variant, not across variants
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return report.write_report(results, variants, seeds, root / "compare")


def compare_root(variants: tuple, seeds: tuple, finetune: Finetune) -> Path:
    """The comparison's folder: a new one, or (the same --run-name, the same variants, seeds and
    flags) the one a killed sweep left, to go on with."""
    first = variants[0].config
    plan = {"compare": [{"variant": label, "config": asdict(c)} for label, c in variants], "seeds": list(seeds),
            "finetune": list(finetune)}
    if first.run.run_name and not first.run.overwrite:
        root = Path(first.run.out_dir) / first.run.run_name
        saved = root / "config.json"
        if saved.is_file():
            claim_folder(root)
            saved_plan = json.loads(saved.read_text())
            for cell in saved_plan.get("compare", []) if isinstance(saved_plan, dict) else []:
                rename_legacy_fields(cell.get("config") if isinstance(cell, dict) else None)
            if "compare" not in saved_plan:
                raise UsageError(f"{root} is a training run's folder, not a comparison's; choose another "
                                 f"--run-name")
            if saved_plan != json.loads(json.dumps(plan)):
                raise UsageError(f"{root} holds another comparison (other variants, seeds or flags); pass "
                                 f"--overwrite to replace it, or another --run-name")
            print(f"[compare] going on with {root}")
            return root
    root = plan_run_dir(first, what="compare")
    make_run_dir(root, first.run.overwrite)
    (root / "config.json").write_text(json.dumps(plan, indent=2))
    return root


def cell_folder(label: str, seed: int) -> str:
    """'nvfp4:nvfp4-4over6=all', 0 -> 'nvfp4+nvfp4-4over6_all-seed0' (a plain folder name)."""
    return re.sub(r"[^A-Za-z0-9.+-]", "_", label.replace(":", "+")) + f"-seed{seed}"


def run_cell(root: Path, label: str, config, finetune: Finetune, train) -> dict:
    """Train and evaluate one cell, or read a finished cell's cell.json; an interrupted cell goes
    on from its last checkpoint (one without a checkpoint starts again)."""
    run_dir = root / cell_folder(label, config.run.seed)
    done = run_dir / "cell.json"
    if done.is_file():
        print(f"[compare] {label}, seed {config.run.seed}: finished before, skipped ({done})")
        return json.loads(done.read_text())
    print(f"\n===== {label}, seed {config.run.seed} =====")
    start = time.perf_counter()
    config = config.replace(out_dir=str(root), run_name=run_dir.name, overwrite=True)
    loop = train(config, run_dir)
    summary = loop.train()
    parts = run_dir / "cell_eval.json"  # the evaluation's finished parts, kept across a stop
    stop = StopRequest("finishing this part of the evaluation, then save it and exit")
    stop.install()

    def finished(results):
        atomic_write_text(parts, strict_json(results))
        if stop.signal is not None:
            raise Interrupted(stop.signal, parts, "the evaluation's finished parts")
    try:
        summary.update(evaluate(loop.train_step.model, loop.train_step.precision, config, loop.train_split,
                                loop.heldout_split, finetune, json.loads(parts.read_text()) if parts.is_file() else {},
                                finished))
    finally:
        stop.restore()
    summary.update(variant=label, seed=config.run.seed, cell_wall_s=time.perf_counter() - start)
    atomic_write_text(done, strict_json(summary, default=str))  # a kill mid-write leaves no half cell.json
    return json.loads(done.read_text())
