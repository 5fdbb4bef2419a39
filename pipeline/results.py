"""The results table: every row of `cfg.results` run as ordinary pipeline runs that share their
teachers (teacher.dir) and caches (cache.root), then one table, CSV and PNG from their reports.

A row is a recipe plus overrides, run once per task and seed (`per_task`, single-task methods)
or once per seed on all tasks (multi-task methods; as many seeds as the task with the most).
A run whose report exists is not recomputed, so rebuilding the table after an interruption or
after adding a row only runs what is missing; a finished run whose config has changed since (a
row's overrides edited) is moved aside and rerun.
"""
from __future__ import annotations

import csv
import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline import data
from pipeline.config import Config, ResultRow, load, to_dict
from pipeline.errors import ConfigError, RaykdError

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    row: ResultRow
    tasks: tuple[str, ...]
    seed: int
    cfg: Config

    @property
    def folder(self) -> Path:
        return Path(self.cfg.run.output_dir) / self.cfg.run.name


def slug(name: str) -> str:
    """A row name as a folder name: `MLKD 3L h12` -> `mlkd-3l-h12`."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "row"


def runs_dir(cfg: Config) -> Path:
    return Path(cfg.run.output_dir).resolve() / cfg.run.name


def plan_runs(cfg: Config) -> list[Run]:
    """Every (row, tasks, seed) run with its full config; fails on a bad row before any work."""
    if not cfg.results.rows:
        raise ConfigError("results.rows is empty: list the rows of the table (see jobs/configs/results.yaml)")
    unknown = set(cfg.results.seeds) - set(cfg.data.tasks)
    if unknown:
        raise ConfigError(f"results.seeds names {sorted(unknown)}, which are not in data.tasks {list(cfg.data.tasks)}")
    for i, row in enumerate(cfg.results.rows):
        unknown = set(row.task_overrides) - set(cfg.data.tasks)
        if unknown:
            raise ConfigError(f"results.rows.{i} ({row.name}): task_overrides names {sorted(unknown)}, "
                              f"which are not in data.tasks {list(cfg.data.tasks)}")
    base = to_dict(cfg)
    root = runs_dir(cfg)
    # every row reads the same data; augmentation is the recipe's own (a method, not the data)
    data_keys = {k: v for k, v in base["data"].items() if k != "augment"}
    shared = {"ray": base["ray"], "cache": base["cache"], "data": data_keys,
              "teacher": {k: base["teacher"][k] for k in ("model", "dropout", "optim")}
              | {"dir": str(root / "teachers")}}
    out = []
    for i, row in enumerate(cfg.results.rows):
        recipe = REPO / row.recipe if row.recipe and not Path(row.recipe).is_absolute() else row.recipe
        task_groups = [(t,) for t in cfg.data.tasks] if row.per_task else [cfg.data.tasks]
        groups = [(tasks, s) for tasks in task_groups for s in range(row_seeds(cfg, row, tasks))]
        for tasks, seed in groups:
            name = f"{slug(row.name)}-{tasks[0] if row.per_task else 'all'}-s{seed}"
            sections = shared | {"run": {"name": name, "output_dir": str(root / "runs"), "seed": seed},
                                 "data": {**shared["data"], "tasks": list(tasks)}}
            try:
                extra = row.task_overrides.get(tasks[0], ()) if row.per_task else ()
                run_cfg = load(recipe or None, [*row.overrides, *extra], sections)
            except ConfigError as e:
                raise ConfigError(f"results.rows.{i} ({row.name}): {e}") from None
            out.append(Run(row, tuple(tasks), seed, run_cfg))
    return out


def row_seeds(cfg: Config, row: ResultRow, tasks: tuple[str, ...]) -> int:
    """How many seeds a row runs on `tasks` (one task for per-task rows, all for multi-task rows):
    the row's own `seeds`, else the largest `results.seeds` count among them."""
    return row.seeds or max((cfg.results.seeds.get(t, 1) for t in tasks), default=1)


def run_all(cfg: Config, pipeline_run: Callable[[Config], None], only: tuple[str, ...] = ()) -> list[str]:
    """Run every missing run (in row order); returns the runs that failed (they are retried on
    the next call). `only`: row names to run (default: all)."""
    plan = [r for r in plan_runs(cfg) if not only or r.row.name in only]
    finished = {r.cfg.run.name for r in plan if (r.folder / "report.json").is_file()}
    stale = {r.cfg.run.name: keys for r in plan if r.cfg.run.name in finished and (keys := changed_keys(r))}
    todo = [r for r in plan if r.cfg.run.name not in finished or r.cfg.run.name in stale]
    print(f"[raykd results] {len(plan)} runs, {len(plan) - len(todo)} finished earlier, "
          f"{len(todo)} to run" + (f" ({len(stale)} of them changed since they ran)" if stale else ""),
          flush=True)
    for run in todo:
        if run.cfg.run.name in stale:  # its finished stages must not be resumed: move it aside
            old = run.folder.with_name(f"{run.folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            print(f"[raykd results] {run.cfg.run.name}: config changed since it ran "
                  f"({'; '.join(stale[run.cfg.run.name])}); the old run moves to {old.name}", flush=True)
            run.folder.rename(old)
    failed = []
    for i, run in enumerate(todo):
        print(f"[raykd results] run {i + 1}/{len(todo)}: {run.cfg.run.name} "
              f"(recipe {run.row.recipe or 'default'}, tasks {list(run.tasks)})", flush=True)
        t0 = time.perf_counter()
        try:
            pipeline_run(run.cfg)
        except RaykdError as e:
            print(f"[raykd results] {run.cfg.run.name} failed: {e}", flush=True)
            failed.append(run.cfg.run.name)
            continue
        print(f"[raykd results] {run.cfg.run.name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return failed


# Keys that say where a run reads and writes or which Ray it uses, not what it computes: a
# finished run whose saved config differs only in these is still current.
WHERE_KEYS = ("run.output_dir", "run.storage_path", "run.keep_checkpoints", "cache.root",
              "data.glue_dir", "ray.address", "ray.num_cpus")


def changed_keys(run: Run) -> list[str]:
    """How a finished run's saved config differs from the one planned now ("key: old -> new"),
    except WHERE_KEYS; [] when it is current (or has no saved config)."""
    saved = run.folder / "config.yaml"
    if not saved.is_file():
        return []
    before, now = _flat(to_dict(load(saved))), _flat(to_dict(run.cfg))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
            if k not in WHERE_KEYS and before.get(k) != now.get(k)]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):  # stages: by index
            v = {str(i): x for i, x in enumerate(v)} | {"count": len(v)}
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


# ------------------------------------------------------------------ the table


def glue_score(metrics: dict[str, float]) -> float:
    """The task's GLUE number: the mean of its metrics (MRPC acc/F1, STS-B Pearson/Spearman)."""
    return metrics.get("combined", next(iter(metrics.values())))


def collect(cfg: Config) -> list[dict]:
    """One record per finished run and task (rows not run yet are absent)."""
    records = []
    for run in plan_runs(cfg):
        path = run.folder / "report.json"
        if not path.is_file():
            continue
        if changed := changed_keys(run):
            print(f"[raykd results] {run.cfg.run.name} left out of the table: its config changed since it "
                  f"ran ({'; '.join(changed)}); rerun the rows to include it", flush=True)
            continue
        report = json.loads(path.read_text())
        lat = report["latency_ms"]
        prec = "bf16" if "bs1_bf16_ms" in lat["student"] else "fp32"  # bf16 only where native
        for task in run.tasks:
            r = report["tasks"][task]
            records.append({
                "row": run.row.name, "task": task, "seed": run.seed, "run": run.cfg.run.name,
                "student": glue_score(r["student"]), "teacher": glue_score(r["teacher"]),
                "teacher_path": report["teacher"]["path"], "params": report["student"]["params"],
                "teacher_params": report["teacher"]["params"],
                "precision": prec, "bs1_ms": lat["student"][f"bs1_{prec}_ms"],
                "bs64_ms": lat["student"][f"bs64_{prec}_ms"],
                "teacher_bs1_ms": lat["teacher"][f"bs1_{prec}_ms"],
                "teacher_bs64_ms": lat["teacher"][f"bs64_{prec}_ms"],
                "wall_time_s": report.get("wall_time_s", 0.0) / len(run.tasks),
                "config": str(run.folder / "config.yaml")})
    return records


def summarize(cfg: Config, records: list[dict]) -> list[dict]:
    """Table rows: the teachers (one per teacher folder kind), then every configured row."""
    tasks = cfg.data.tasks
    teacher_root = runs_dir(cfg) / "teachers"
    kinds: dict[str, dict[str, list]] = {}
    for r in records:  # a teacher's dev score appears in every report that used it: keep one per task
        rel = Path(r["teacher_path"]).relative_to(teacher_root) if r["teacher_path"].startswith(
            str(teacher_root)) else Path(r["teacher_path"])
        kind = ("teacher (single-task)" if len(rel.parts) == 1 and rel.name in tasks else
                f"teacher ({rel.parts[0]}{', ' + rel.name if len(rel.parts) > 1 else ''})")
        kinds.setdefault(kind, {}).setdefault(r["task"], []).append(
            {**r, "student": r["teacher"], "params": r["teacher_params"], "bs1_ms": r["teacher_bs1_ms"],
             "bs64_ms": r["teacher_bs64_ms"], "wall_time_s": 0.0, "seed": 0})
    rows = [_row(kind, {t: v[:1] for t, v in by_task.items()}, tasks, is_teacher=True)
            for kind, by_task in sorted(kinds.items(), key=lambda kv: kv[0] != "teacher (single-task)")]
    for row in cfg.results.rows:
        by_task: dict[str, list] = {}
        for r in records:
            if r["row"] == row.name:
                by_task.setdefault(r["task"], []).append(r)
        if by_task:
            rows.append(_row(row.name, by_task, tasks, is_teacher=False))
    ref = next((r for r in rows if r["name"] == "teacher (single-task)"), None)
    for r in rows:
        if ref and r["avg"] is not None and ref["avg"]:
            r["pct_teacher"] = 100.0 * r["avg"] / ref["avg"]
            r["speedup_bs1"] = ref["bs1_ms"] / r["bs1_ms"]
            r["speedup_bs64"] = ref["bs64_ms"] / r["bs64_ms"]
    return rows


def _row(name: str, by_task: dict[str, list], tasks: tuple[str, ...], is_teacher: bool) -> dict:
    cells = {}
    for t in tasks:
        scores = [r["student"] for r in by_task.get(t, [])]
        if scores:
            cells[t] = {"mean": statistics.fmean(scores), "std": statistics.pstdev(scores) if len(scores) > 1
                        else None, "n": len(scores)}
    flat = [r for v in by_task.values() for r in v]
    complete = len(cells) == len(tasks)
    return {"name": name, "teacher": is_teacher, "cells": cells,
            "avg": statistics.fmean(c["mean"] for c in cells.values()) if complete else None,
            "params": statistics.median(r["params"] for r in flat),
            "bs1_ms": statistics.median(r["bs1_ms"] for r in flat),
            "bs64_ms": statistics.median(r["bs64_ms"] for r in flat),
            "minutes": sum(r["wall_time_s"] for r in flat) / 60.0,
            "configs": sorted({r["config"] for r in flat}), "pct_teacher": None,
            "speedup_bs1": None, "speedup_bs64": None}


def write_outputs(cfg: Config, records: list[dict], rows: list[dict], command: str) -> Path:
    """RESULTS.md (the table), results.csv (every run and task) and results.png beside it."""
    md = Path(cfg.results.output)
    md.parent.mkdir(parents=True, exist_ok=True)
    with open(md.with_suffix(".csv"), "w", newline="") as f:
        if records:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)
    png = md.with_suffix(".png")
    precision = " and ".join(sorted({r["precision"] for r in records})) or "bf16 where native, else fp32"
    plot(rows, png, precision)
    md.write_text(render(cfg, rows, command, png.name, precision))
    print(md.read_text(), flush=True)
    return md


def render(cfg: Config, rows: list[dict], command: str, png_name: str, precision: str) -> str:
    tasks = cfg.data.tasks
    metric = {t: "/".join(data.task_of(cfg.data, t).metrics) for t in tasks}
    head = ["row", *[f"{t} ({metric[t]})" for t in tasks], "avg", "% teacher", "params (M)",
            "bs1 ms", "bs64 ms", "speed-up bs1/bs64", "run time (min)"]
    lines = ["# Results", "", f"Regenerate (finished runs are reused): `{command}`", "",
             f"Data: GLUE dev sets; train rows capped at {cfg.data.train_limit or 'none'}; max_len "
             f"{cfg.data.max_len}. Teacher: {cfg.teacher.model or 'all-MiniLM-L6-v2 (packaged)'}. "
             f"Seeds per task: {dict(cfg.results.seeds) or 'one'} (multi-task rows: the largest count, "
             "each seed one run on all tasks); cells with several seeds show mean ± std. Latency: "
             f"{precision} on this machine's CPU, seq_len 64. Teacher rows: the dev "
             "score of the teacher the runs distilled from. '—' = not run yet.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = []
        for t in tasks:
            c = r["cells"].get(t)
            cells.append("—" if c is None else f"{c['mean']:.1f}" + (f" ± {c['std']:.1f}" if c["std"] is not None else ""))
        speed = (f"{r['speedup_bs1']:.2f}x / {r['speedup_bs64']:.2f}x" if r["speedup_bs1"] else "—")
        lines.append("| " + " | ".join([
            r["name"], *cells, _f(r["avg"]), _f(r["pct_teacher"]), f"{r['params'] / 1e6:.1f}",
            f"{r['bs1_ms']:.2f}", f"{r['bs64_ms']:.1f}", speed,
            "—" if r["teacher"] else f"{r['minutes']:.1f}"]) + " |")
    lines += ["", f"![average metric vs latency]({png_name})", "", "## Rows", ""]
    for row in cfg.results.rows:
        lines.append(f"- **{row.name}**: recipe `{row.recipe or '(built-in default)'}`"
                     + (f" with `{' '.join(row.overrides)}`" if row.overrides else "")
                     + (", one run per task and seed" if row.per_task else ", one run on all tasks per seed")
                     + "".join(f"; {task} runs also `{' '.join(extra)}`"
                               for task, extra in row.task_overrides.items()))
    root = runs_dir(cfg)
    lines += ["", f"Each run's exact config is `<run>/config.yaml` under `{root}`; rerun one with "
              "`python -m jobs.pipeline --config <run>/config.yaml`. Runs:", ""]
    for r in rows:
        if not r["teacher"]:
            lines.append(f"- {r['name']}: " + ", ".join(
                f"`{Path(c).relative_to(root) if c.startswith(str(root)) else c}`" for c in r["configs"]))
    return "\n".join(lines) + "\n"


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def plot(rows: list[dict], path: Path, precision: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.get_cmap("tab20").colors  # a legend, not labels: close points' labels overprint
    for i, r in enumerate(r for r in rows if r["avg"] is not None):
        ax.scatter(r["bs1_ms"], r["avg"], marker="*" if r["teacher"] else "o", s=110 if r["teacher"] else 45,
                   color=colors[i % len(colors)], label=r["name"], edgecolors="black", linewidths=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    ax.set_xlabel(f"latency at batch 1, {precision} (ms)")
    ax.set_ylabel("average GLUE dev metric")
    ax.set_title("every row: average metric vs latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
