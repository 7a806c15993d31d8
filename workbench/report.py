"""The sweep's report: per variant the mean and std over seeds of each metric, the paired
difference to the reference with its 95% confidence interval (scipy's paired t-test), the
markdown table, cells.csv, and the figures (loss curves with their gap, reconstructions,
--fp4-stats heat maps)."""
from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from scipy import stats

from workbench.files import strict_json


COMPARE_METRICS = {  # key -> (column, format spec)
    "final_loss": ("final loss", ".4f"), "heldout_loss": ("held-out loss", ".4f"),
    "psnr_masked": ("PSNR masked (dB)", ".2f"), "linear_probe_acc": ("probe acc", ".3f"),
    "knn_acc": ("kNN acc", ".3f"), "finetune_acc": ("fine-tune acc", ".3f"),
    "img_per_s": ("img/s", ".0f"), "peak_mem_gib": ("peak mem (GiB)", ".2f"),
}


# a cell's first 3 steps (its compile), and its wall time in the process that finished it
CELL_TIMES = ("warmup_s", "cell_wall_s")


def compare_report(results: dict, variants: tuple, seeds: tuple) -> dict:
    """Per variant and metric: mean and std over seeds; per variant against the reference (bf16
    when compared, else the first): the mean of the per-seed differences and its 95% CI (scipy's
    paired t-test: Student t over those differences, n - 1 degrees of freedom), and whether the
    CI excludes 0."""
    reference = next((label for label, _ in variants if label == "bf16"), variants[0].label)
    report = {"reference": reference, "seeds": list(seeds), "variants": {}, "differences": {},
              "cells": {label: {str(seed): {k: v for k, v in cell.items() if not k.endswith("curve")}
                                for seed, cell in cells.items()} for label, cells in results.items()}}
    for label, cells in results.items():
        row, diff = {}, {}
        for key in COMPARE_METRICS:
            values = [cells[seed][key] for seed in seeds if key in cells[seed]]
            if len(values) == len(seeds):
                row[key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1
                            else None, "n": len(values)}
            ref_values = [results[reference][seed].get(key) for seed in seeds]
            if label != reference and key in row and None not in ref_values:
                d = np.array(values) - np.array(ref_values)
                ref_mean = float(np.mean(ref_values))  # relative: None where the reference's mean is 0
                entry = {"mean": float(d.mean()), "relative": float(d.mean()) / ref_mean if ref_mean else None,
                         "n": len(d)}
                if len(d) > 1:
                    with warnings.catch_warnings():  # equal differences: scipy warns, the CI is that value
                        warnings.simplefilter("ignore", RuntimeWarning)
                        low, high = stats.ttest_rel(values, ref_values).confidence_interval(0.95)
                    entry.update(ci95=[float(low), float(high)], excludes_zero=bool(low > 0 or high < 0))
                diff[key] = entry
        report["variants"][label] = row
        if label != reference:
            report["differences"][label] = diff
    report["closest"] = closest_variants(report["differences"])
    return report


def closest_variants(differences: dict, key: str = "final_loss") -> dict:
    """Per precision with a variant other than the reference: the variant whose mean paired
    difference in `key` is smallest in size, with that difference (CI and whether it excludes 0)."""
    closest = {}
    for label, diff in differences.items():
        best = closest.get(label.split(":")[0])
        if key in diff and (best is None or abs(diff[key]["mean"]) < abs(best[key]["mean"])):
            closest[label.split(":")[0]] = {"variant": label, key: diff[key]}
    return closest


def percent(relative: Optional[float]) -> str:
    return "n/a %: the reference is 0" if relative is None else f"{relative:+.1%}"


def write_compare_table(report: dict, path: Path, config, seeds: tuple):
    """Two markdown tables: mean +- std per variant; the paired differences to the reference."""
    keys = [k for k in COMPARE_METRICS if any(k in row for row in report["variants"].values())]
    cell = lambda stat, spec: "n/a" if stat is None else format(stat["mean"], spec) + (
        f" ± {stat['std']:{spec}}" if stat.get("std") is not None else "")
    lines = ["| variant | " + " | ".join(COMPARE_METRICS[k][0] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, row in report["variants"].items():
        lines.append(f"| {label} | " + " | ".join(cell(row.get(k), COMPARE_METRICS[k][1]) for k in keys) + " |")
    ref = report["reference"]
    lines += ["", f"Paired differences to {ref} (variant - {ref}, mean over seeds [95% CI]; * where the CI "
                  f"excludes 0):", "", "| variant | " + " | ".join(COMPARE_METRICS[k][0] for k in keys) + " |",
              "|---" * (len(keys) + 1) + "|"]
    for label, diff in report["differences"].items():
        out = []
        for k in keys:
            d, signed = diff.get(k), "+" + COMPARE_METRICS[k][1]
            if d is None:
                out.append("n/a")
            elif "ci95" not in d:
                out.append(f"{d['mean']:{signed}} ({percent(d['relative'])}; 1 seed)")
            else:
                lo, hi = (format(v, signed) for v in d["ci95"])
                out.append(f"{d['mean']:{signed}} ({percent(d['relative'])}) [{lo}, {hi}]{' *' if d['excludes_zero'] else ''}")
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    for precision, best in report["closest"].items():
        d = best["final_loss"]
        if "ci95" in d:
            ci = " [{:+.4f}, {:+.4f}]".format(*d["ci95"])
            verdict = "significant (the CI excludes 0)" if d["excludes_zero"] else "not significant (the CI includes 0)"
        else:
            ci, verdict = "", "1 seed, no CI"
        lines.append(f"\nClosest {precision} variant to {ref} in final loss: {best['variant']}, "
                     f"{d['mean']:+.4f} ({percent(d['relative'])}){ci}: {verdict}.")
    d, m, o = config.data, config.model, config.optim
    lines.append(f"\n{d.dataset}, model {m.preset}, {m.img_size}px/patch {m.patch_size}, {o.epochs} epochs, batch "
                 f"{o.batch_size}, seeds {', '.join(map(str, seeds))}; loss = mean masked MSE of the last epoch; "
                 f"std over seeds (n - 1).")
    path.write_text("\n".join(lines) + "\n")


def write_cells_csv(results: dict, path: Path):
    """One row per (variant, seed) with every metric: the numbers behind the table."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", *COMPARE_METRICS, *CELL_TIMES, "backend"])
        for label, cells in results.items():
            for seed, c in cells.items():
                writer.writerow([label, seed, *(c.get(k, "") for k in (*COMPARE_METRICS, *CELL_TIMES)),
                                 c.get("backend", "")])


def mean_curves(cells: dict) -> tuple:
    """(steps, mean, std) of the cells' loss curves over seeds (epoch means for runs shorter
    than two --log-every intervals); the seeds share their steps."""
    key = "curve" if all(len(c["curve"]) >= 2 for c in cells.values()) else "epoch_curve"
    curves = [np.array(c[key], dtype=float) for c in cells.values()]
    length = min(len(c) for c in curves)
    losses = np.stack([c[:length, 1] for c in curves])
    return curves[0][:length, 0], losses, key


def plot_loss_curves(results: dict, reference: str, path: Path):
    """Left: each variant's loss over steps, mean over seeds with a +-std band. Right: the
    relative gap to the reference, per seed then averaged, with its band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = min(3, len(results))  # of the legend under both panels
    legend_rows = math.ceil(len(results) / columns)
    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(12, 4.5 + 0.3 * legend_rows))
    ref_steps, ref_losses, key = mean_curves(results[reference])
    for label, cells in results.items():
        steps, losses, _ = mean_curves(cells)
        mean, std = losses.mean(0), losses.std(0, ddof=1) if len(losses) > 1 else np.zeros(losses.shape[1])
        (line,) = ax.plot(steps, mean, label=label, marker="o" if key == "epoch_curve" else None)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        if label == reference:  # its gap is the zero line
            continue
        n = min(len(steps), len(ref_steps))
        rel = 100 * (losses[:, :n] - ref_losses[:, :n]) / ref_losses[:, :n]
        rel_std = rel.std(0, ddof=1) if len(rel) > 1 else np.zeros(n)
        gap_ax.plot(steps[:n], rel.mean(0), color=line.get_color(), label=label)
        gap_ax.fill_between(steps[:n], rel.mean(0) - rel_std, rel.mean(0) + rel_std, color=line.get_color(), alpha=0.2)
    seeds = len(next(iter(results.values())))
    ax.set(xlabel="step", ylabel=f"train loss (masked MSE{', epoch mean' if key == 'epoch_curve' else ''})",
           yscale="log", title=f"MAE pretraining loss, mean ± std over {seeds} seed{'s' * (seeds > 1)}")
    gap_ax.axhline(0, color="black", linewidth=0.8)
    gap_ax.set(xlabel="step", ylabel=f"loss gap to {reference} (%)", title=f"relative gap to {reference}, paired by seed")
    # one legend under both panels (the variant strings are long; inside, they hide the curves)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=columns, frameon=False)
    fig.tight_layout(rect=(0, 0.055 * legend_rows, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_labelled_recons(results: dict, path: Path, scale: int = 3):
    """The first seed's final reconstruction grid of each variant, one below the other, each
    upscaled (nearest, so 32 px images stay sharp) under a strip with the variant's name."""
    from PIL import ImageDraw
    grids = []
    for label, cells in results.items():
        recon = next((c["recon"] for c in cells.values() if Path(c.get("recon", "")).is_file()), None)
        if recon is None:  # a cell.json written without its grid (before a grid was made on resume)
            print(f"[compare] {label}: no final reconstruction grid in its cells; left out of {path.name}")
            continue
        grid = Image.open(recon).convert("RGB")
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
        strip = Image.new("RGB", (grid.width, 16), "white")
        ImageDraw.Draw(strip).text((4, 2), f"{label} (rows: original | visible | reconstruction)", fill="black")
        grids += [strip, grid]
    if not grids:
        return
    canvas = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), "white")
    top = 0
    for g in grids:
        canvas.paste(g, (0, top))
        top += g.height
    canvas.save(path)


def plot_fp4_stats(results: dict, path: Path) -> bool:
    """Heat maps of the --fp4-stats summary (layer x operand: share of nonzeros flushed to zero,
    relative error) for each variant that has one; False if none has."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stats = {label: next(iter(cells.values()))["fp4_stats"] for label, cells in results.items()
             if "fp4_stats" in next(iter(cells.values()))}
    if not stats:
        return False
    operands = ["X", "W", "dY"]
    fig, axes = plt.subplots(len(stats), 2, figsize=(10, 0.25 * max(len(s) for s in stats.values()) / 3 * len(stats) + 2),
                             squeeze=False)
    for row, (label, summary) in zip(axes, stats.items()):
        layers = list(dict.fromkeys(key.rsplit(".", 1)[0] for key in summary))
        for ax, (metric, title) in zip(row, (("flushed_to_zero", "nonzeros flushed to zero"),
                                             ("rel_error", "relative error"))):
            grid = np.array([[summary.get(f"{layer}.{op}", {}).get(metric, np.nan) for op in operands]
                             for layer in layers])
            image = ax.imshow(grid, aspect="auto", cmap="viridis")
            ax.set(xticks=range(3), xticklabels=operands, yticks=range(len(layers)), title=f"{label}: {title}")
            ax.set_yticklabels(layers, fontsize=6)
            fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True



def write_report(results: dict, variants: tuple, seeds: tuple, folder: Path) -> dict:
    """compare/: table.md (means, stds, paired CIs), results.json, cells.csv and the figures;
    prints the table. results: variant label -> seed -> the cell's summary and evaluation."""
    folder.mkdir(exist_ok=True)
    report = compare_report(results, variants, seeds)
    write_compare_table(report, folder / "table.md", variants[0].config, seeds)
    write_cells_csv(results, folder / "cells.csv")
    (folder / "results.json").write_text(strict_json(report, indent=2, default=str))
    plot_loss_curves(results, report["reference"], folder / "loss_curves.png")
    save_labelled_recons(results, folder / "recons.png")
    if plot_fp4_stats(results, folder / "fp4_stats.png"):
        print(f"[compare] {folder / 'fp4_stats.png'}: --fp4-stats per layer and operand")
    walls = [c.get("cell_wall_s", 0.0) for cells in results.values() for c in cells.values()]
    print(f"\n{(folder / 'table.md').read_text()}\n[compare] {len(walls)} cells, {sum(walls):.0f} s of cell time "
          f"(cells.csv has each cell's time and compile warm-up)\n[compare] {folder}: table.md, results.json, "
          f"cells.csv, loss_curves.png, recons.png")
    return report
