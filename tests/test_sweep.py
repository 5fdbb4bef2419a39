"""Sweeps: the search space and its constraints (no Ray), then real sweeps end to end.

The end-to-end test runs `python -m jobs.sweep` (real Ray Tune, Ray Train and the Arrow cache)
on a tiny random teacher and a synthetic task in GLUE's SST-2 format: a sentence is positive
when it holds "great", negative when it holds "awful", among filler words. A good learning rate
learns that within one epoch and a tiny one does not, so ASHA has something to stop. The sweep
is interrupted after two trials, the teacher's weights are deleted, and the same command
resumes it: finished trials are not rerun and no trial ever loads the teacher. A second, smaller
sweep keeps its Tune storage on S3 (moto on 127.0.0.1) and exports from checkpoints fetched back.
"""
from __future__ import annotations

import csv
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.config import load, to_dict
from pipeline.errors import ConfigError
from pipeline.sweep_space import ConstrainedSearch, Constraints, check_satisfiable, make_space
from tests.conftest import make_tiny_teacher

REPO = Path(__file__).resolve().parents[1]
RECIPE = "jobs/configs/sweep_tiny.yaml"  # 4 trials: heads [2, 3] x lr [1e-2, 1e-6], 2 epochs
GOOD_LR, BAD_LR = 1e-2, 1e-6
LR_KEY = "distill.stages.0.optim.lr"
FILLER = ("the movie film story plot actors music scenes ending script was is a an and with very "
          "quite rather really").split()


def write_toy_glue(folder: Path, n_train: int = 512, n_dev: int = 32) -> Path:
    """<folder>/sst2/{train,dev}.tsv in GLUE's format: the label is which cue word is present.
    With 512 rows (32 steps of 16) the recipe's good lr reaches 100% dev accuracy in one epoch."""
    for split, n, seed in (("train", n_train, 0), ("dev", n_dev, 1)):
        rng = random.Random(seed)
        path = folder / "sst2" / f"{split}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            out = csv.writer(f, delimiter="\t")
            out.writerow(["sentence", "label"])
            for i in range(n):
                words = rng.sample(FILLER, 2)
                words.insert(rng.randrange(3), "great" if i % 2 else "awful")
                out.writerow([" ".join(words), str(i % 2)])
    return folder


def path_overrides(toy: dict) -> list[str]:
    root = toy["root"]
    return [f"teacher.path={toy['teacher']}", f"teacher.model={toy['base']}",
            f"data.glue_dir={root}/glue", f"cache.root={root}/cache", f"run.output_dir={root}/runs"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    write_toy_glue(root / "glue")
    teacher = make_tiny_teacher(root / "teacher", {"sst2": 2}, seed=0)
    base = make_tiny_teacher(root / "base", {}, seed=1)  # the "pretrained" encoder students start from
    return {"root": root, "teacher": teacher, "base": base}


def toy_cfg(toy: dict, *extra: str):
    return load(REPO / RECIPE, path_overrides(toy) + list(extra))


def constraints_for(cfg) -> Constraints:
    return Constraints(to_dict(cfg), teacher_heads=4, teacher_width=32)  # the tiny teacher


# ------------------------------------------------------------------------ space (no Ray)


@pytest.mark.parametrize("space, message", [
    ("{}", "sweep.space is empty"),
    ("{student.layer: [1, 2]}", "did you mean student.layers"),
    ("{student.layers: []}", "empty list"),
    ("{student.layers: {low: 4, high: 1}}", "low=4 > high=1"),
    ("{distill.stages.0.optim.lr: {low: 0, high: 1, log: true}}", "log ranges need low > 0"),
    ("{student.arch: {low: 1, high: 2}}", "str field; give a list"),
    ("{student.layers: {low: 1.5, high: 3}}", "int field"),
    ("{student: [1]}", "is a section"),
    ("{distill.stages.x.optim.lr: [1]}", "use an index"),
    ("{student.layers: 3}", "give a list of choices"),
])
def test_bad_space_is_a_clear_error(toy, space, message):
    with pytest.raises(ConfigError, match=message):
        make_space(toy_cfg(toy, f"sweep.space={space}"))


def test_space_types_follow_the_config_fields(toy):
    space = make_space(toy_cfg(toy, "sweep.space={student.layers: {low: 1, high: 4}, "
                                    f"{LR_KEY}: {{low: 1.0e-5, high: 1.0e-3, log: true}}}}"))
    import numpy as np
    draws = [{k: d.sample(random_state=np.random.default_rng(i)) for k, d in space.items()} for i in range(200)]
    layers = {int(d["student.layers"]) for d in draws}
    assert layers == {1, 2, 3, 4}  # high is inclusive for ints
    assert all(1e-5 <= d[LR_KEY] <= 1e-3 for d in draws)


def test_constraints_resample_and_record_rejections(toy, tmp_path):
    cfg = toy_cfg(toy)
    log = tmp_path / "rejected.jsonl"
    search = ConstrainedSearch(make_space(cfg), constraints_for(cfg), "dev_main", "max", 0, str(log))
    picks = [search.suggest(f"t{i}") for i in range(20)]
    assert all(p["student.heads"] == 2 for p in picks)
    rejected = [json.loads(line) for line in log.read_text().splitlines()]
    assert rejected and all(r["config"]["student.heads"] == 3 for r in rejected)
    assert "heads=3 must divide hidden=32" in rejected[0]["problems"][0]


def test_optuna_multi_objective_learns_from_valid_trials_only(toy, tmp_path):
    """TPE over (metric up, latency down): finished trials are told to Optuna with both values;
    rejected draws as finished at the worst values seen so far (so TPE learns to avoid them)."""
    import optuna

    from pipeline.sweep_space import make_searcher

    cfg = toy_cfg(toy, "sweep.searcher=optuna", "sweep.latency_objective=true")
    goals = [("dev_main", "max"), ("latency_bs1_ms", "min")]
    search = make_searcher(cfg, make_space(cfg), constraints_for(cfg), str(tmp_path / "rej.jsonl"), goals)
    for i in range(6):
        params = search.suggest(f"t{i}")
        assert params["student.heads"] == 2
        search.on_trial_complete(f"t{i}", {"dev_main": 50 + i, "latency_bs1_ms": 1.0 + i})
    study = search.inner._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    rejected = (tmp_path / "rej.jsonl").read_text().splitlines()
    assert len(study.trials) == 6 + len(rejected) and rejected
    values = {tid: study.trials[t.number].values for tid, t in search.inner._ot_trials.items()}
    assert [values[search.inner_ids[f"t{i}"]] for i in range(6)] == [[50.0 + i, 1.0 + i] for i in range(6)]
    told = [v for tid, v in values.items() if tid not in search.inner_ids.values()]
    assert len(told) == len(rejected)  # before any finished trial: far off; then the worst seen
    assert all(v == [-1e6, 1e6] or (v[0] == 50.0 and 1.0 <= v[1] <= 6.0) for v in told), told


def test_a_diverged_trial_is_told_to_optuna_as_the_worst_seen(toy, tmp_path):
    """A trial whose loss went non-finite reports its metric as NaN (Tune wants the key): the
    searcher tells TPE it was as bad as the worst finished trial, and the NaN stays out of it."""
    from pipeline.sweep_space import make_searcher

    cfg = toy_cfg(toy, "sweep.searcher=optuna")
    search = make_searcher(cfg, make_space(cfg), constraints_for(cfg), str(tmp_path / "rej.jsonl"),
                           [("dev_main", "max")])
    for i, value in enumerate([60.0, 50.0]):
        search.suggest(f"t{i}")
        search.on_trial_complete(f"t{i}", {"dev_main": value})
    search.suggest("t2")
    diverged = {"dev_main": math.nan, "final": 1, "diverged": 1, "nonfinite": "step 2: loss nan"}
    search.on_trial_result("t2", diverged)
    search.on_trial_complete("t2", diverged)
    trial = search.inner._ot_study.trials[search.inner._ot_trials[search.inner_ids["t2"]].number]
    assert trial.values == [50.0] and search.worst == {"dev_main": 50.0}


def test_mlkd_relation_splits_must_divide_teacher_heads(toy):
    """8 student heads divide the width 32 but cannot group the teacher's 4 heads."""
    cfg = toy_cfg(toy, "distill.stages=[{name: f, losses: {mha_relation: 1.0}}]",
                  "sweep.space={student.heads: [2, 8]}")
    c = constraints_for(cfg)
    assert c.problems({"student.heads": 2}) == []
    assert "must divide the teacher's 4 heads" in c.problems({"student.heads": 8})[0]
    with pytest.raises(ConfigError, match="none of 1000 sampled configurations can run.*teacher's 4 heads"):
        check_satisfiable(make_space(toy_cfg(toy, "distill.stages=[{name: f, losses: {mha_relation: 1.0}}]",
                                             "sweep.space={student.heads: [8]}")), c, seed=0)


def test_a_sweep_never_loads_the_teacher_in_trials(toy):
    c = constraints_for(toy_cfg(toy))
    assert "init_from=base" in c.problems({"student.init_from": "teacher"})[0]
    assert "reads the cache" in c.problems({"distill.online": True})[0]


def test_unreported_metric_and_bad_constraints_fail_up_front(toy):
    from pipeline.sweep import objectives
    from pipeline.sweep_results import check_constraints

    with pytest.raises(ConfigError, match=r"sweep.metric='sst2/f1' is not reported.*sst2/accuracy"):
        objectives(toy_cfg(toy, "sweep.metric=sst2/f1"))
    with pytest.raises(ConfigError, match="needs sweep.searcher=optuna"):
        objectives(toy_cfg(toy, "sweep.latency_objective=true"))
    assert objectives(toy_cfg(toy, "sweep.metric=sst2/accuracy", "sweep.searcher=optuna",
                              "sweep.latency_objective=true")) == [("sst2/accuracy", "max"),
                                                                   ("latency_bs1_ms", "min")]
    with pytest.raises(ConfigError, match="unknown column 'latency'"):
        check_constraints({"latency": 5.0})


def test_asha_needs_epochs_after_the_grace_period(toy):
    from pipeline.sweep import make_scheduler

    cfg = toy_cfg(toy, "sweep.grace_period=3")
    with pytest.raises(ConfigError, match="grace_period=3 leaves ASHA nothing to stop"):
        make_scheduler(cfg, [cfg])


def test_missing_cache_names_the_cache_and_the_command(toy):
    from pipeline.cache.store import CacheError
    from pipeline.sweep import prepare_cache

    cfg = toy_cfg(toy, f"cache.root={toy['root']}/empty_cache")
    with pytest.raises(CacheError, match=r"cache sst2-train-\w+ under .*python -m jobs.cache "
                                         r"--config sweep.yaml cache.logits=true"):
        prepare_cache(cfg, {"sst2": [toy["teacher"]]}, ["logits"], build=False, config_path="sweep.yaml")


def test_concurrency_leaves_room_for_ray_data(toy):
    from pipeline.sweep import trial_concurrency

    cfg = toy_cfg(toy)  # 1 worker x 0.5 CPU + driver + a share for Ray Data per trial
    assert trial_concurrency(cfg, {"CPU": 2.0}) == 1
    assert trial_concurrency(cfg, {"CPU": 8.0}) == 7
    assert trial_concurrency(toy_cfg(toy, "sweep.max_concurrent=3"), {"CPU": 2.0}) == 3


def test_pareto_front_keeps_only_unbeaten_finished_trials():
    from pipeline.sweep_results import pareto_mask

    t = pd.DataFrame({"status": ["finished"] * 4 + ["stopped early"],
                      "dev_main": [80, 85, 70, 85, 99], "latency_bs1_ms": [1.0, 2.0, 3.0, 2.5, 0.1]})
    assert pareto_mask(t, "dev_main", "max", "latency_bs1_ms").tolist() == [True, True, False, False, False]


def test_trials_side_by_side_share_the_cores(toy):
    from pipeline.sweep import share_threads

    cfg = toy_cfg(toy, "ray.num_workers=2")
    assert share_threads(cfg, 2, {"CPU": 16}).ray.threads_per_worker == 4  # 16 cores / (2 trials x 2)
    assert share_threads(cfg, 3, {"CPU": 4}).ray.threads_per_worker == 1  # never 0
    assert share_threads(cfg, 1, {"CPU": 16}) is cfg  # one trial: all of the node's cores
    assert share_threads(toy_cfg(toy, "ray.threads_per_worker=3"), 2, {"CPU": 16}).ray.threads_per_worker == 3


def test_asha_rungs_survive_a_restore(toy):
    """A restored sweep gets a fresh scheduler from tuner.pkl plus the callbacks' saved state:
    with KeepSchedulerState a bad first trial after the resume is stopped against a rung value
    recorded before the interruption; a scheduler restored alone (what Tune does) lets it run."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from pipeline.sweep import KeepSchedulerState, make_scheduler

    cfg = toy_cfg(toy)
    before = make_scheduler(cfg, [cfg])
    good = Trial("run_trial", stub=True, trial_id="good")
    before.on_trial_add(None, good)
    assert before.on_trial_result(None, good, {"epochs_done": 1, "dev_main": 0.9}) == TrialScheduler.CONTINUE
    saved = pickle.loads(pickle.dumps(KeepSchedulerState(before).get_state()))  # to disk and back

    for keep_state, expected in ((True, TrialScheduler.STOP), (False, TrialScheduler.CONTINUE)):
        restored = make_scheduler(cfg, [cfg])
        if keep_state:
            KeepSchedulerState(restored).set_state(saved)
        bad = Trial("run_trial", stub=True, trial_id="bad")
        restored.on_trial_add(None, bad)
        assert restored.on_trial_result(None, bad, {"epochs_done": 1, "dev_main": 0.5}) == expected


def test_a_resumed_sweep_must_have_the_same_config_but_may_lack_newer_keys(toy, tmp_path):
    from pipeline.config import replace
    from pipeline.sweep import check_same_sweep

    cfg, experiment, results = toy_cfg(toy), tmp_path / "exp", tmp_path / "results"
    check_same_sweep(cfg, str(experiment), results)  # a new experiment: its config is recorded
    experiment.mkdir()
    (experiment / "tuner.pkl").touch()  # what Tuner.can_restore looks for
    check_same_sweep(cfg, str(experiment), results)
    with pytest.raises(ConfigError, match=r"different config \(sections \['distill'\]"):
        check_same_sweep(replace(cfg, {LR_KEY: 0.5}), str(experiment), results)
    saved = json.loads((results / "sweep_config.json").read_text())
    del saved["sweep"]["max_failures"]  # recorded by a version without the key: its default holds
    (results / "sweep_config.json").write_text(json.dumps(saved))
    check_same_sweep(cfg, str(experiment), results)
    with pytest.raises(ConfigError, match="sections \\['sweep'\\]"):
        check_same_sweep(replace(cfg, {"sweep.max_failures": 3}), str(experiment), results)


# ---------------------------------------------------------------- one real sweep (Ray)


def sweep_cli(toy: dict, seed: int, *extra: str, popen: bool = False, creds: dict | None = None):
    """`python -m jobs.sweep` on the toy recipe (extra overrides last; creds: more env vars)."""
    # its own Ray, which the job itself must keep on 127.0.0.1 (no loopback variables given)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env |= {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            **(creds or {})}
    cmd = [sys.executable, "-m", "jobs.sweep", "--config", RECIPE, *path_overrides(toy),
           f"run.seed={seed}", "sweep.constraints={latency_bs1_ms: 1000, params: 1}", *extra]
    kw = dict(cwd=REPO, env=env, text=True, start_new_session=True)
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
    return subprocess.run(cmd, capture_output=True, timeout=900, **kw)


def seed_good_then_bad(toy) -> int:
    """A seed whose first two trials take the good, then the bad learning rate: ASHA then has a
    trial to stop before the interruption (and later trials have a rung value to meet)."""
    return seed_drawing(toy_cfg(toy), [GOOD_LR, BAD_LR])


def seed_drawing(cfg, lrs: list[float]) -> int:
    """A seed whose first trials draw these learning rates, in this order."""
    for seed in range(100):
        search = ConstrainedSearch(make_space(cfg), constraints_for(cfg), "dev_main", "max", seed, os.devnull)
        if [search.suggest(f"t{i}")[LR_KEY] for i in range(len(lrs))] == lrs:
            return seed
    raise AssertionError("no seed found")


def interrupt_after(proc: subprocess.Popen, trials: int, timeout_s: float = 600) -> str:
    """SIGINT (Ctrl-C) to the sweep driver once `trials` trials have ended; returns its output."""
    lines, ended, t0 = [], 0, time.time()
    for line in proc.stdout:
        lines.append(line)
        if "[raykd sweep] trial" in line and "ended in this run" in line:
            ended += 1
            if ended == trials:
                proc.send_signal(signal.SIGINT)
        assert time.time() - t0 < timeout_s, "".join(lines[-50:])
    proc.wait(timeout=120)
    return "".join(lines)


def tune_history(experiment: Path) -> dict[str, list[dict]]:
    """trial_id -> its reported results in order (Tune's result.json)."""
    out = {}
    for f in experiment.glob("run_trial_*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


@pytest.mark.timeout(1800)  # ~4 min on a quiet 2-core machine; Ray Train start-up dominates
def test_sweep_asha_results_no_teacher_and_resume(toy):
    root = toy["root"]
    results = root / "runs/sweep_tiny/sweep_results"
    first = interrupt_after(sweep_cli(toy, seed_good_then_bad(toy), popen=True), trials=2)
    assert "rerun the same command to resume" in first, first[-3000:]
    before = pd.read_parquet(results / "trials.parquet")
    done_before = before[before["status"].isin(["finished", "stopped early"])]
    assert len(done_before) >= 2, before

    for weights in toy["teacher"].glob("*.safetensors"):  # from now on the teacher cannot load
        weights.unlink()
    second = sweep_cli(toy, seed_good_then_bad(toy))
    assert second.returncode == 0, (second.stdout[-3000:], second.stderr[-3000:])
    assert "resuming" in second.stdout and "teacher not loaded" in second.stdout

    table = pd.read_parquet(results / "trials.parquet")
    summary = json.loads((results / "summary.json").read_text())
    assert len(table) == 4 and set(table["status"]) <= {"finished", "stopped early"}, table
    assert summary["teacher_loads_in_trials"] == 0 and summary["rejected_draws"] > 0
    assert summary["ray"].startswith("127.0.0.1:"), summary["ray"]
    assert summary["placement_groups_held_after"] == 0  # the stopped trial's workers were freed
    assert (table.loc[table["status"] == "finished", "cache_sets_written"] == 0).all()
    for col in ("student.heads", LR_KEY, "dev_main", "params", "latency_bs1_ms", "time_s", "pareto"):
        assert col in table and col in pd.read_csv(results / "trials.csv"), col
    assert (table["student.heads"] == 2).all()  # heads=3 was rejected before any trial started

    # Resume: the trials that ended before the interruption ran once and kept their results.
    for _, row in done_before.iterrows():
        starts = (root / "runs/sweep_tiny/sweep_trials" / row["trial_id"] / "starts.log").read_text().splitlines()
        assert len(starts) == 1, row["trial_id"]
        assert table.set_index("trial_id").loc[row["trial_id"], "status"] == row["status"]

    # ASHA: stopped trials ended at the first rung, below a trial that reached it before them.
    history = tune_history(root / "runs/sweep_tiny/sweep/sweep_tiny")
    stopped = table[table["status"] == "stopped early"]
    assert len(stopped) >= 1, table
    for _, row in stopped.iterrows():
        mine = history[row["trial_id"]]
        assert len(mine) == 1, mine
        earlier = [h[0]["dev_main"] for t, h in history.items()
                   if t != row["trial_id"] and h[0]["timestamp"] <= mine[0]["timestamp"]]
        assert earlier and mine[0]["dev_main"] < max(earlier), (row["trial_id"], history)
    finished = table[table["status"] == "finished"]
    epochs = toy_cfg(toy).distill.stages[0].optim.epochs
    assert (finished[LR_KEY] == GOOD_LR).all() and (finished["epochs"] == epochs).all()
    assert finished["dev_main"].min() > stopped["dev_main"].max()

    # The Pareto PNG, and the best student per constraint exported in HF format.
    png = (results / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "none" in summary["exports"]["params_le_1"]
    from transformers import AutoModelForSequenceClassification
    for name in ("best", "latency_bs1_ms_le_1000"):
        model = AutoModelForSequenceClassification.from_pretrained(results / "export" / name / "sst2")
        assert model.config.num_hidden_layers == 1


@pytest.mark.timeout(900)  # ~2-3 min: Ray start-up and two 1-epoch trials, one at a time
def test_sweep_on_s3_keeps_state_checkpoints_and_results_in_the_bucket(toy, s3, tmp_path):
    """sweep.storage_path on S3 (moto on 127.0.0.1): Tune's experiment state and every trial's
    checkpoint land in the bucket, nothing in <run dir>/sweep; the table, Pareto PNG and exports
    are written to the local sweep_results and copied to <experiment>/results; the best student
    is exported from its checkpoint fetched back from S3."""
    import pyarrow.fs as pafs
    from transformers import AutoModelForSequenceClassification

    proc = sweep_cli(toy, 0, "run.name=sweep_s3", f"sweep.storage_path={s3.uri('sweeps')}",
                     "sweep.num_samples=2", "sweep.scheduler=fifo", "distill.stages.0.optim.epochs=1",
                     creds=s3.env)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    run = toy["root"] / "runs/sweep_s3"
    results = run / "sweep_results"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["experiment"] == s3.uri("sweeps/sweep_s3")  # the run name in the path, not the query
    assert summary["finished"] == 2 and not (run / "sweep").exists()

    fs, base = pafs.FileSystem.from_uri(summary["experiment"])
    files = {i.path[len(base) + 1:]: i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
             if i.type == pafs.FileType.File}
    assert "tuner.pkl" in files and any(f.startswith("experiment_state-") for f in files), sorted(files)
    table = pd.read_parquet(results / "trials.parquet")
    for row in table.itertuples():  # one checkpoint per trial (num_to_keep=1), fetched for export
        metrics = [f for f in files if f.startswith(f"run_trial_{row.trial_id}_")
                   and f.split("/")[1].startswith("checkpoint_") and f.endswith("/metrics.json")]
        assert len(metrics) == 1, (row.trial_id, sorted(files))
        assert (Path(row.student) / "metrics.json").read_bytes() == fs.open_input_stream(
            f"{base}/{metrics[0]}").read()

    def published(name: str) -> bytes:
        return fs.open_input_stream(f"{base}/results/{name}").read()

    png = (results / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and published("pareto.png") == png
    for name in ("trials.parquet", "trials.csv", "summary.json"):
        assert published(name) == (results / name).read_bytes(), name

    best = summary["exports"]["best"]
    assert best["trial_id"] in set(table["trial_id"]) and best["path"] == str(results / "export/best")
    pafs.copy_files(f"{base}/results/export/best", str(tmp_path / "best"), source_filesystem=fs)
    for folder in (results / "export/best/sst2", tmp_path / "best/sst2"):
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        assert model.config.num_hidden_layers == 1


DIVERGING_LR = 1.0e30  # step 1 blows the weights up; step 2's loss is not finite


@pytest.mark.timeout(900)  # ~2 min: Ray start-up, a 2-epoch trial run twice, a 10 s crash hook, a 2-step trial
def test_a_failed_trial_is_restarted_and_a_diverged_one_is_not(toy):
    """sweep.max_failures=1 (the default). Trial 1: its Ray Train worker exits once in its second
    epoch (test hook; 32 steps per epoch). Trials train with no Ray Train restarts, so the trial
    fails; Tune restarts it and it resumes from its epoch-0 checkpoint, not from scratch. The
    table counts its 2 epochs by `epochs_done`, though its second start reported only one.
    Trial 2 diverges at step 2: seeded, it would again, so it ends as "diverged", not restarted."""
    from pipeline.distill import CRASH_ENV, STATE_FILE

    space = f"sweep.space={{{LR_KEY}: [{GOOD_LR:.1e}, {DIVERGING_LR:.1e}]}}"  # YAML floats need the dot
    cfg = toy_cfg(toy, space)
    seed = seed_drawing(cfg, [GOOD_LR, DIVERGING_LR])
    proc = sweep_cli(toy, seed, "run.name=sweep_retry", "sweep.num_samples=2", "sweep.scheduler=fifo",
                     space, creds={CRASH_ENV: "40"})
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.stdout.count("restarting it from its last checkpoint") == 1, proc.stdout[-3000:]
    run = toy["root"] / "runs/sweep_retry"
    table = pd.read_parquet(run / "sweep_results/trials.parquet").set_index(LR_KEY)
    assert json.loads((run / "sweep_results/summary.json").read_text())["diverged"] == 1
    good, bad = table.loc[GOOD_LR], table.loc[DIVERGING_LR]
    assert (good["status"], good["epochs"]) == ("finished", 2), table
    assert bad["status"] == "diverged" and "step 2" in bad["error"], table

    trial = run / "sweep_trials" / good["trial_id"]
    assert len((trial / "starts.log").read_text().splitlines()) == 2  # started, failed, restarted
    train = next(trial.glob("**/.ray_train/stages_train"))
    assert (train / "test_crash.marker").is_file()
    states = [torch.load(p, weights_only=False) for p in train.glob(f"checkpoint_*/{STATE_FILE}")]
    assert max(s["step"] for s in states) == 64 and {s["start_epoch"] for s in states} == {1}  # resumed
    history = tune_history(run / "sweep/sweep_retry")[good["trial_id"]]
    assert [h["epochs_done"] for h in history if not h.get("final")] == [1, 2], history
    assert len((run / "sweep_trials" / bad["trial_id"] / "starts.log").read_text().splitlines()) == 1
