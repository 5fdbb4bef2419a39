"""The results job: rows as real pipeline runs (tiny models, GLUE slices, real Ray) sharing
teachers and caches; the table, CSV and PNG; a rerun recomputes nothing; bad rows fail early."""
from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_tiny_teacher
from pipeline.config import load
from pipeline.errors import ConfigError
from pipeline.results import plan_runs

REPO = Path(__file__).resolve().parents[1]
TINY = {"data": {"tasks": ["sst2", "stsb"], "train_limit": 48, "dev_limit": 24, "max_len": 32},
        "teacher": {"optim": {"epochs": 1, "batch_size": 16}}}
SMALL_STUDENT = ["student.layers=2", "student.hidden=32", "student.heads=4", "student.ffn=64", "run.latency_min_s=0.2"]


def results_config(tmp_path: Path, glue_dir: Path, rows: list[dict], **results) -> Path:
    base = make_tiny_teacher(tmp_path / "base", {"sst2": 2})
    tree = {"run": {"name": "res", "output_dir": str(tmp_path / "runs")},
            "cache": {"root": str(tmp_path / "cache")},
            "data": {**TINY["data"], "glue_dir": str(glue_dir)},
            "teacher": {**TINY["teacher"], "model": str(base)},
            "results": {"output": str(tmp_path / "RESULTS.md"), "rows": rows, **results}}
    path = tmp_path / "results.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_each_task_stage_expands_per_task():
    cfg = load(REPO / "jobs/configs/mkd_transformer.yaml", ["data.tasks=[sst2,rte]"])
    names = [(s.name, s.tasks, s.from_stage) for s in cfg.distill.stages]
    assert names == [("multitask", (), ""), ("finetune_sst2", ("sst2",), "multitask"),
                     ("finetune_rte", ("rte",), "multitask")]


def test_rows_share_the_data_but_keep_their_recipes_augmentation(tmp_path):
    rows = [{"name": "aug", "recipe": "jobs/configs/kd_augmented.yaml"},
            {"name": "kd", "recipe": "jobs/configs/kd.yaml"}]
    cfg = load(None, {"results.rows": rows, "run.output_dir": str(tmp_path), "data.train_limit": 77,
                      "data.tasks": ["sst2"]})
    aug, kd = plan_runs(cfg)
    assert aug.cfg.data.train_limit == kd.cfg.data.train_limit == 77  # the table's data
    assert aug.cfg.data.augment.copies == 4 and kd.cfg.data.augment.copies == 0  # the recipes'


def test_multitask_rows_run_as_many_seeds_as_the_task_with_the_most(tmp_path):
    rows = [{"name": "kd", "recipe": "jobs/configs/kd.yaml"},
            {"name": "mkd", "recipe": "jobs/configs/mkd_transformer.yaml", "per_task": False},
            {"name": "mkd1", "recipe": "jobs/configs/mkd_transformer.yaml", "per_task": False, "seeds": 1},
            {"name": "kd2", "recipe": "jobs/configs/kd.yaml", "seeds": 2}]
    cfg = load(None, {"results.rows": rows, "run.output_dir": str(tmp_path), "data.tasks": ["sst2", "rte"],
                      "results.seeds": {"rte": 3}})
    plan = {(r.row.name, r.tasks, r.seed) for r in plan_runs(cfg)}
    assert plan == {("kd", ("sst2",), 0), *{("kd", ("rte",), s) for s in range(3)},
                    *{("mkd", ("sst2", "rte"), s) for s in range(3)}, ("mkd1", ("sst2", "rte"), 0),
                    *{("kd2", (t,), s) for t in ("sst2", "rte") for s in range(2)}}
    assert {r.cfg.run.seed for r in plan_runs(cfg) if r.row.name == "mkd"} == {0, 1, 2}
    with pytest.raises(ConfigError, match="seeds must be >= 0"):
        load(None, {"results.rows": [{"name": "x", "seeds": -1}]})


def test_bad_rows_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="results.rows is empty"):
        plan_runs(load(None, [f"run.output_dir={tmp_path}"]))
    cfg = load(None, {"results.rows": [{"name": "x", "recipe": "jobs/configs/mlkd.yaml",
                                        "overrides": ["student.heds=3"]}]})
    with pytest.raises(ConfigError, match=r"results.rows.0 \(x\).*did you mean student.heads"):
        plan_runs(cfg)
    with pytest.raises(ConfigError, match="results.seeds names"):
        plan_runs(load(None, {"results.rows": [{"name": "x"}], "results.seeds": {"rte": 2}}))


def test_results_table_end_to_end_and_resume(tmp_path, glue_dir):
    rows = [{"name": "no-distill", "recipe": "jobs/configs/sst2_nodistill.yaml",
             "overrides": [*SMALL_STUDENT, "distill.stages.0.optim.epochs=1"]},
            {"name": "MKD T", "recipe": "jobs/configs/mkd_transformer.yaml", "per_task": False, "seeds": 1,
             "overrides": [*SMALL_STUDENT, "distill.stages.0.optim.epochs=1",
                           "distill.stages.1.optim.epochs=1"]}]
    config = results_config(tmp_path, glue_dir, rows, seeds={"sst2": 2})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "jobs.results", "--config", str(config)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    assert "4 runs, 0 finished earlier, 4 to run" in r.stdout

    # Teachers are trained once and shared: one per task plus the multi-task one.
    teachers = tmp_path / "runs/res/teachers"
    assert sorted(p.name for p in teachers.iterdir() if not p.name.startswith(".")) == ["multitask", "sst2", "stsb"]

    table = (tmp_path / "RESULTS.md").read_text()
    for name in ("teacher (single-task)", "teacher (multitask)", "no-distill", "MKD T"):
        assert f"| {name} |" in table, table
    assert "±" in table  # two seeds on sst2 for the per-task row
    assert (tmp_path / "RESULTS.png").stat().st_size > 1000
    with open(tmp_path / "RESULTS.csv") as f:
        records = list(csv.DictReader(f))
    assert sorted((r["row"], r["task"], r["seed"]) for r in records) == [
        ("MKD T", "sst2", "0"), ("MKD T", "stsb", "0"), ("no-distill", "sst2", "0"),
        ("no-distill", "sst2", "1"), ("no-distill", "stsb", "0")]
    assert all(0 <= float(r["student"]) <= 100 for r in records if r["task"] == "sst2")

    # A rerun recomputes nothing (and rewrites the same table).
    r2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "4 runs, 4 finished earlier, 0 to run" in r2.stdout
    assert "training teacher" not in r2.stdout
    assert (tmp_path / "RESULTS.md").read_text() == table

    # The table's regenerate command is one a shell runs as given (row names have spaces).
    r3 = subprocess.run([*cmd, "--rows", "no-distill,MKD T", "--table-only"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
    assert r3.returncode == 0, r3.stderr[-3000:]
    line = next(l for l in (tmp_path / "RESULTS.md").read_text().splitlines() if l.startswith("Regenerate"))
    assert shlex.split(line.split("`")[1]) == ["python", "-m", "jobs.results", *cmd[3:], "--rows", "no-distill,MKD T"]


def test_run_clock_sums_a_resumed_runs_invocations(tmp_path):
    import json
    import time

    from pipeline.report import RunClock

    with RunClock(tmp_path, every_s=0.05) as first:
        time.sleep(0.3)
        written = json.loads((tmp_path / RunClock.FILE).read_text())["invocations_s"]
        assert len(written) == 1 and written[0] >= 0.1  # recorded while running: a kill loses little
    assert first.invocations == 1
    one = json.loads((tmp_path / RunClock.FILE).read_text())["invocations_s"]
    with RunClock(tmp_path) as second:  # the rerun after a crash, or a report-only rebuild
        time.sleep(0.2)
        total = second.lap()
    assert second.invocations == 2 and total >= one[0] + 0.2
    both = json.loads((tmp_path / RunClock.FILE).read_text())["invocations_s"]
    assert both[0] == one[0] and len(both) == 2 and both[1] >= 0.2


def test_task_overrides_and_a_changed_run_is_moved_aside_and_rerun(tmp_path, capsys):
    """A row's task_overrides reach only that task's runs; a finished run whose config changed
    since it ran is moved aside and rerun (its finished stages must not be resumed), and the
    others are kept. `pipeline_run` here writes what jobs.pipeline leaves: config and report."""
    from pipeline.config import save
    from pipeline.results import changed_keys, run_all

    def planned(lr: str):
        rows = [{"name": "nd", "recipe": "jobs/configs/sst2_nodistill.yaml",
                 "task_overrides": {"stsb": [f"distill.stages.0.optim.lr={lr}"]}}]
        return load(None, {"run.output_dir": str(tmp_path), "data.tasks": ["sst2", "stsb"],
                           "results.rows": rows})

    ran = []

    def pipeline_run(cfg):
        folder = Path(cfg.run.output_dir) / cfg.run.name
        folder.mkdir(parents=True)
        save(cfg, folder / "config.yaml")
        (folder / "report.json").write_text("{}")
        ran.append(cfg.run.name)

    runs = {r.tasks[0]: r for r in plan_runs(planned("2e-4"))}
    assert runs["stsb"].cfg.distill.stages[0].optim.lr == 2e-4
    assert runs["sst2"].cfg.distill.stages[0].optim.lr == 5e-5  # the recipe's own
    assert run_all(planned("2e-4"), pipeline_run) == [] and ran == ["nd-sst2-s0", "nd-stsb-s0"]
    assert run_all(planned("2e-4"), pipeline_run) == [] and len(ran) == 2  # nothing changed
    assert changed_keys(plan_runs(planned("3e-4"))[1]) == ["distill.stages.0.optim.lr: 0.0002 -> 0.0003"]
    run_all(planned("3e-4"), pipeline_run)
    assert ran[2:] == ["nd-stsb-s0"]
    out = capsys.readouterr().out
    assert "2 runs, 1 finished earlier, 1 to run (1 of them changed since they ran)" in out
    assert len(list(tmp_path.glob("*/runs/nd-stsb-s0.replaced-*"))) == 1
    with pytest.raises(ConfigError, match=r"task_overrides names \['cola'\]"):
        plan_runs(load(None, {"data.tasks": ["sst2"], "results.rows": [
            {"name": "x", "task_overrides": {"cola": ["student.heads=6"]}}]}))
    with pytest.raises(ConfigError, match="task_overrides need per_task"):
        load(None, {"results.rows": [{"name": "x", "per_task": False, "task_overrides": {"sst2": []}}]})

