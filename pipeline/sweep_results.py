"""A finished (or interrupted) sweep's results: the table of trials, its Pareto front as a PNG,
and the best student under each constraint exported in HF format. No Ray here: the inputs are
plain per-trial records (see `sweep.trial_record`).

Table columns: trial_id, status (finished | stopped early | diverged | error | not started), one column
per searched key, the sweep metric (best epoch), epochs, params, latency_bs1_ms, time_s,
startup_s (trial start to the first optimizer step), train_s (first step to last report, per
stage, summed), cache_sets_written (must be 0), pareto, student (the final student's folder).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import models
from pipeline.errors import ConfigError
from pipeline.export import export_student

COST_COLUMNS = ("latency_bs1_ms", "params", "time_s")  # what sweep.constraints may bound


def check_constraints(constraints: dict[str, float]) -> None:
    for key, limit in constraints.items():
        if key not in COST_COLUMNS:
            raise ConfigError(f"sweep.constraints: unknown column {key!r}; bound one of "
                              f"{list(COST_COLUMNS)}, e.g. {{latency_bs1_ms: 10}}")
        if not limit > 0:
            raise ConfigError(f"sweep.constraints.{key}={limit} must be > 0")


def trials_table(records: list[dict], metric: str, mode: str, cost: str) -> pd.DataFrame:
    """One row per trial, sorted best first; `pareto` marks the finished trials on the front."""
    table = pd.DataFrame(records)
    if table.empty:
        return table
    table["pareto"] = pareto_mask(table, metric, mode, cost)
    return table.sort_values(metric, ascending=mode == "min", na_position="last").reset_index(drop=True)


def pareto_mask(table: pd.DataFrame, metric: str, mode: str, cost: str) -> np.ndarray:
    """Finished trials no other finished trial beats on both metric and cost."""
    ok = (table["status"] == "finished") & table[metric].notna() & table[cost].notna()
    score = table[metric].to_numpy(float) * (1 if mode == "max" else -1)
    c = table[cost].to_numpy(float)
    mask = np.zeros(len(table), dtype=bool)
    for i in np.flatnonzero(ok):
        others = np.flatnonzero(ok)
        beaten = ((score[others] >= score[i]) & (c[others] <= c[i])
                  & ((score[others] > score[i]) | (c[others] < c[i])))
        mask[i] = not beaten.any()
    return mask


def plot_pareto(table: pd.DataFrame, metric: str, cost: str, path: Path) -> None:
    """metric vs cost: finished trials, early-stopped ones (hollow), the front highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    done = table[table["status"] == "finished"]
    stopped = table[table["status"] == "stopped early"]
    front = done[done["pareto"]].sort_values(cost)
    ax.scatter(done[cost], done[metric], s=28, color="tab:blue", label=f"finished ({len(done)})")
    if len(stopped):
        ax.scatter(stopped[cost], stopped[metric], s=28, facecolors="none", edgecolors="gray",
                   label=f"stopped early by ASHA ({len(stopped)}; metric at stop)")
    ax.plot(front[cost], front[metric], "-o", color="tab:red", ms=7,
            label=f"Pareto front ({len(front)})")
    for _, row in front.iterrows():
        ax.annotate(_short(row), (row[cost], row[metric]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_xlabel({"latency_bs1_ms": "latency at batch 1 (ms, lower is better)",
                   "params": "parameters (lower is better)"}.get(cost, cost))
    ax.set_ylabel(metric)
    if cost == "params":
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"sweep: {len(table)} trials, {metric} vs {cost}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _short(row: pd.Series) -> str:
    """A front point's label: its size keys when searched (layers, hidden, heads)."""
    keys = [k for k in ("student.layers", "student.hidden", "student.heads")
            if k in row and not _isnan(row[k])]
    return " ".join(f"{k.split('.')[-1]}={row[k]}" for k in keys) or str(row["trial_id"])


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def export_best(table: pd.DataFrame, metric: str, mode: str, cost: str,
                constraints: dict[str, float], tasks: list, out: Path) -> dict[str, dict]:
    """Export the best finished student overall and under each constraint to out/<name>/<task>.

    Returns {name: {"trial_id", "metric", "path"} or {"none": reason}}."""
    finished = table[(table["status"] == "finished") & table["student"].notna()]
    choices = {"best": (finished, "")}
    for key, limit in constraints.items():
        smallest = f" (smallest: {finished[key].min():g})" if len(finished) else ""
        choices[f"{key}_le_{limit:g}"] = (finished[finished[key] <= limit],
                                          f"no finished trial has {key} <= {limit:g}{smallest}")
    exports = {}
    for name, (rows, why_none) in choices.items():
        if rows.empty:
            exports[name] = {"none": why_none or "no trial finished"}
            continue
        row = rows.sort_values([metric, cost], ascending=[mode == "min", True]).iloc[0]  # ties: cheaper
        folder = Path(row["student"])
        model = models.load_model(folder / "model")
        export_student(model, tasks, folder / "model", out / name)
        exports[name] = {"trial_id": row["trial_id"], metric: float(row[metric]),
                         **{k: float(row[k]) for k in COST_COLUMNS if not _isnan(row[k])},
                         "path": str(out / name)}
    return exports


def write_tables(table: pd.DataFrame, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table.to_parquet(folder / "trials.parquet", index=False)
    table.to_csv(folder / "trials.csv", index=False)


def write_summary(summary: dict, table: pd.DataFrame, metric: str, folder: Path) -> str:
    """summary.json and a few readable lines (returned, for printing)."""
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    keys = summary["space_keys"]
    cols = ["trial_id", "status", *keys, metric, "epochs", "params", "latency_bs1_ms", "time_s", "pareto"]
    lines = [f"sweep {summary['name']}: {summary['trials']} trials ({summary['finished']} finished, "
             f"{summary['stopped_early']} stopped early, {summary.get('diverged', 0)} diverged, "
             f"{summary['errors']} errors) "
             f"in {summary['wall_s']:.0f} s, {summary['concurrency']} at a time",
             f"teacher loads during trials: {summary['teacher_loads_in_trials']} "
             f"(cache shard sets written while trials ran; trials read a weightless teacher view)",
             f"cache built up front: {summary['cache_sets_built_up_front']} new shard set(s); "
             f"draws rejected by constraints: {summary['rejected_draws']}; placement groups "
             f"still held: {summary['placement_groups_held_after']}",
             table[[c for c in cols if c in table]].to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    for name, e in summary["exports"].items():
        lines.append(f"export {name}: " + (e["none"] if "none" in e else f"trial {e['trial_id']} "
                                           f"{metric}={e[metric]:.4g} -> {e['path']}"))
    lines.append(f"results: {folder}")
    return "\n".join(lines)
