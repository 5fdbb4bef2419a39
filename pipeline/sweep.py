"""Ray Tune sweeps over student size, head count and loss weights, every trial reading one
teacher cache.

`run_sweep(cfg)` reads top to bottom: check the space, metric and constraints -> find or build
the cache once, in the driver -> a weightless teacher view for the trials -> a Tuner (fresh,
or restored when the experiment exists) -> table, Pareto PNG, best students exported.

A trial (`run_trial`) is `distill_student` on Ray Train. Per-epoch reports reach Tune through a
Ray Train callback (`ray.tune.integration.ray_train.TuneReportCallback`, the Train V2 + Tune
pattern of Ray's guide "Hyperparameter Tuning with Ray Tune"), so ASHA stops on per-epoch
`dev_main`. A finished trial reports once more with its student as a Tune checkpoint, which
Tune stores under the storage path (local or URI).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.ray_runtime import LOOPBACK_ENV

for _key, _value in LOOPBACK_ENV.items():  # Ray reads them when imported: set them first
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.integration.ray_train import TuneReportCallback  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from pipeline import data, evaluate, models, sweep_results  # noqa: E402
from pipeline.cache import store
from pipeline.cache.build import build_missing, plan_caches, request, run_fields
from pipeline.cache.key import cache_key, check_fields
from pipeline.cache.reader import _override_hint, plan_sets
from pipeline.cache.store import CacheError
from pipeline.config import Config, from_dict, replace, to_dict
from pipeline.distill import NonFiniteLoss
from pipeline.errors import ConfigError
from pipeline.objective import make_plan, teacher_quantities
from pipeline.ray_runtime import _quiet_ray_data as quiet_ray_data
from pipeline.ray_runtime import init_ray
from pipeline.stages import distill_student, train_split
from pipeline.sweep_space import Constraints, check_satisfiable, make_searcher, make_space
from pipeline.teacher import base_model_path, existing_teachers, run_dir, teachers_by_task

DRIVER_CPUS = 0.05  # a trial only drives its Ray Train run (and times the student once)
DATA_CPUS = 0.5  # left free per trial for Ray Data's read tasks (a busy node starves them)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


@dataclass(frozen=True)
class TrialSetup:
    """Plain data every trial receives."""

    base: dict  # the sweep's config as a plain dict; a trial applies its sampled keys to it
    teachers: dict[str, list[str]]  # task -> weightless teacher view folder(s)
    trials_dir: str  # local: <trials_dir>/<trial_id>/ holds its Ray Train runs and stages
    cache_keys: tuple[str, ...]


def sweep_dirs(cfg: Config) -> dict[str, str]:
    """experiment (Tune's, maybe a URI), trials and results (local), teacher view (local)."""
    local = run_dir(cfg)
    storage = cfg.sweep.storage_path or str(local / "sweep")
    if "://" in storage:  # the run name joins the URI's path, before its query (endpoint, region)
        path, sep, query = storage.partition("?")
        experiment = f"{path.rstrip('/')}/{cfg.run.name}{sep}{query}"
    else:
        storage = str(Path(storage).resolve())
        experiment = f"{storage}/{cfg.run.name}"
    return {"storage": storage, "experiment": experiment,
            "trials": str(local / "sweep_trials"), "results": str(local / "sweep_results"),
            "teacher_view": str(local / "sweep_teacher")}


def objectives(cfg: Config) -> list[tuple[str, str]]:
    """[(metric, mode)] and, for a Pareto search, (cost, "min"); unknown metrics fail up front."""
    reported = ["dev_main"]
    for name in cfg.data.tasks:
        task = data.task_of(cfg.data, name)
        reported += [f"{name}/{m}" for m in task.metrics]
        reported += [f"{name}/combined"] if len(task.metrics) > 1 else []
    if cfg.sweep.metric not in reported:
        raise ConfigError(f"sweep.metric={cfg.sweep.metric!r} is not reported by tasks "
                          f"{list(cfg.data.tasks)}; they report {reported}")
    if cfg.sweep.latency_objective and cfg.sweep.searcher != "optuna":
        raise ConfigError("sweep.latency_objective=true needs sweep.searcher=optuna "
                          "(random search optimises nothing)")
    out = [(cfg.sweep.metric, cfg.sweep.mode)]
    return out + [(cfg.sweep.cost_metric, "min")] if cfg.sweep.latency_objective else out


def cache_quantities(configs: list[Config], teacher_layers: int) -> list[str]:
    """Every cached quantity any of these configurations reads (the cache must hold the union)."""
    out: set[str] = set()
    for cfg in configs:
        for stage in cfg.distill.stages:
            out |= set(teacher_quantities(make_plan(stage, cfg.student.layers, teacher_layers)))
    return sorted(out)


def count_sets(root: str, keys) -> int:
    return sum(len(store.committed_sets(root, k)) for k in keys)


def prepare_cache(cfg: Config, teachers: dict[str, list[Path]], quantities: list[str],
                  build: bool, config_path: str) -> tuple[tuple[str, ...], int]:
    """(train cache keys, shard sets written now): the cache is built here once, never in a trial."""
    if not quantities:
        return (), 0
    splits = sorted({train_split(st) for st in cfg.distill.stages})  # train; its augmented copies
    if build:  # one cache job for every task's missing quantities
        keys, missing = plan_caches(cfg, [request(teachers[t], t, s, quantities)
                                          for t in cfg.data.tasks for s in splits])
        return tuple(keys), build_missing(cfg, missing)
    fields = {(t, s): run_fields(cfg, teachers[t], t, s)[0] for t in cfg.data.tasks for s in splits}
    keys = tuple(cache_key(f) for f in fields.values())
    for ((task, split), f), key in zip(fields.items(), keys):
        try:
            check_fields(cfg.cache.root, key, f)
            plan_sets(cfg.cache.root, key, quantities)
        except CacheError as e:
            raise CacheError(
                f"the sweep needs the {task}/{split} cache {key} under {cfg.cache.root} holding "
                f"{quantities} and was told not to build it. {e}. Build it with `python -m jobs.cache "
                f"--config {config_path} {_override_hint(quantities)}`, or drop --no-build-cache"
            ) from None
    return keys, 0


def teacher_view(teachers: dict[str, list[Path]], dest: Path) -> dict[str, list[str]]:
    """Copies of the teacher folders without weight files: config, tokenizer and metadata are all
    a trial reads (the cache key stays the same), and a trial cannot load the teacher."""
    views: dict[str, str] = {}
    out: dict[str, list[str]] = {}
    for task, folders in teachers.items():
        out[task] = []
        for folder in folders:
            src = str(Path(folder).resolve())
            if src not in views:
                view = dest / f"teacher{len(views)}"
                shutil.rmtree(view, ignore_errors=True)
                view.mkdir(parents=True)
                for p in Path(src).iterdir():
                    if p.is_file() and p.suffix not in WEIGHT_SUFFIXES:
                        shutil.copy2(p, view / p.name)
                views[src] = str(view)
            out[task].append(views[src])
    return out


def trial_concurrency(cfg: Config, resources: dict) -> int:
    """How many trials fit at once: each needs its Train workers' CPUs (or GPUs), its driver's,
    and a share left free for Ray Data."""
    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    per_trial = cfg.ray.num_workers * cfg.ray.cpus_per_worker + DRIVER_CPUS + DATA_CPUS
    n = math.floor(resources.get("CPU", 1) / per_trial + 1e-9)
    if cfg.ray.use_gpu:
        n = min(n, math.floor(resources.get("GPU", 0) / cfg.ray.num_workers))
    return max(1, n)


def make_scheduler(cfg: Config, configs: list[Config]):
    """ASHA on per-epoch reports, or FIFO. ASHA's time axis is `epochs_done` (epochs across
    stages, from the loop), not Tune's training_iteration, which counts reports and starts again
    at 1 when a failed or interrupted trial is restarted and resumes mid-recipe."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.sweep.scheduler == "fifo":
        return FIFOScheduler()
    epochs = min(sum(s.optim.epochs for s in c.distill.stages) for c in configs)
    grace = cfg.sweep.grace_period
    if grace >= epochs:
        raise ConfigError(f"sweep.grace_period={grace} leaves ASHA nothing to stop: trials run "
                          f"{epochs} epochs in all (every stage); lower it or use scheduler=fifo")
    # rungs stay below the last epoch, so a trial that trained to the end is never cut off
    return ASHAScheduler(time_attr="epochs_done", metric=cfg.sweep.metric,
                         mode=cfg.sweep.mode, grace_period=grace, max_t=max(grace, epochs - 1),
                         reduction_factor=cfg.sweep.reduction_factor, stop_last_trials=False)


class EpochsToTune(TuneReportCallback):
    """Forwards each Ray Train report to Tune, adding the trial's fixed facts (size, latency)."""

    def __init__(self, extra: dict):
        super().__init__()
        self.extra = extra

    def after_report(self, run_context, metrics, checkpoint):
        first = {**metrics[0], **self.extra, "reported_unix": time.time()}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def measure_student(cfg: Config) -> dict[str, float]:
    """Parameters and batch-1 latency (fp32, one CPU thread, sweep.latency_seq_len tokens) of
    the trial's architecture, built like the trainer builds it, before training."""
    tasks = {t: data.task_of(cfg.data, t).num_outputs for t in cfg.data.tasks}
    spec = {"kind": "student", "student": to_dict(cfg.student), "source": base_model_path(cfg),
            "pair_tasks": [t for t in cfg.data.tasks if data.task_of(cfg.data, t).is_pair]}
    model = models.build(spec, tasks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms = evaluate.latency(model, cfg.sweep.latency_seq_len, 1, amp=False,
                              task=cfg.data.tasks[0])["ms"]
    finally:
        torch.set_num_threads(threads)
    return {"params": models.count_parameters(model), "latency_bs1_ms": ms}


def run_trial(params: dict, setup: TrialSetup) -> None:
    """One Tune trial: distill the sampled student from the cache; report every epoch."""
    start = time.time()
    quiet_ray_data()  # this process's Ray Data settings travel to its Train workers
    trial_id = tune.get_context().get_trial_id()
    cfg = replace(from_dict(Config, setup.base),
                  {**params, "run.output_dir": setup.trials_dir, "run.name": trial_id})
    work = run_dir(cfg)
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "starts.log", "a") as f:  # one line per (re)start: resume never repeats
        f.write(f"{start}\n")
    facts = {**measure_student(cfg), "trial_start_unix": start}
    before = count_sets(cfg.cache.root, setup.cache_keys)
    teachers = {t: [Path(p) for p in ps] for t, ps in setup.teachers.items()}
    # No Ray Train restarts inside a trial: when ASHA stops it, TrialProgress removes its
    # placement group, and a controller not yet killed by Tune would read the lost workers as
    # a failure and start a new group, held until the sweep ends (seen under CI load). A trial
    # that fails is restarted by Tune instead (sweep.max_failures), from the same checkpoints.
    try:
        final = distill_student(cfg, teachers, build_cache=False, callbacks=(EpochsToTune(facts),),
                                retries=0)
    except NonFiniteLoss as e:  # seeded, so a restart would diverge again: end it, not an error
        # Tune wants the metric in every result; NaN, and no epochs_done, so ASHA ignores it
        # and the searcher tells its model this trial was as bad as the worst (sweep_space).
        tune.report({**facts, cfg.sweep.metric: math.nan, "final": 1, "diverged": 1,
                     "nonfinite": str(e).splitlines()[0][:300]})
        return
    metrics = json.loads((final / "metrics.json").read_text())
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    written = count_sets(cfg.cache.root, setup.cache_keys) - before
    # metrics.json is the best epoch's; the trial as a whole did every stage's epochs
    metrics["epochs_done"] = sum(stage.optim.epochs for stage in cfg.distill.stages)
    tune.report({**metrics, **facts, "final": 1, "cache_sets_written": written},
                checkpoint=tune.Checkpoint.from_directory(str(final)))


def trial_record(result, statuses: dict[str, str], keys: list[str], metric: str, mode: str,
                 fetch_dir: Path) -> dict:
    """A Tune Result (and the Tune status of every trial) -> one table row (plain values); a
    finished trial's checkpoint on remote storage is fetched to fetch_dir/<trial_id>."""
    hist = result.metrics_dataframe
    last = result.metrics or {}
    trial_id = last.get("trial_id") or Path(result.path).name.split("_")[2]  # run_trial_<id>_...
    status = statuses.get(trial_id, "PENDING")
    row = {"trial_id": trial_id}
    row |= {k: (result.config or {}).get(k) for k in keys}
    epochs = hist[hist["final"].isna()] if hist is not None and "final" in hist else hist
    n = 0 if epochs is None else len(epochs)
    if n and "epochs_done" in epochs and epochs["epochs_done"].notna().any():
        n = int(epochs["epochs_done"].max())  # a restarted trial reports only the epochs it had left
    best = math.nan
    if n and metric in epochs:
        best = epochs[metric].max() if mode == "max" else epochs[metric].min()
    if status == "TERMINATED":  # diverged: a non-finite loss ended it; stopped early: the scheduler
        status = "diverged" if last.get("diverged") else "finished" if last.get("final") else "stopped early"
    else:
        status = "error" if status == "ERROR" else "unfinished" if n else "not started"
    row |= {"status": status, metric: best, "epochs": n, "params": last.get("params", math.nan),
            "latency_bs1_ms": last.get("latency_bs1_ms", math.nan),
            "time_s": last.get("time_total_s", math.nan), **_timing(epochs),
            "cache_sets_written": last.get("cache_sets_written", math.nan),
            "error": str(result.error).splitlines()[0][:300] if result.error else last.get("nonfinite", ""),
            "student": _student_path(result, fetch_dir / trial_id) if status == "finished" else None}
    return row


def _timing(epochs) -> dict[str, float]:
    """startup_s: trial start -> first optimizer step; train_s: per stage, first step -> last report."""
    if epochs is None or not len(epochs) or "first_step_unix" not in epochs:
        return {"startup_s": math.nan, "train_s": math.nan}
    stages = epochs.groupby("first_step_unix")["reported_unix"].max()
    return {"startup_s": float(epochs["first_step_unix"].min() - epochs["trial_start_unix"].iloc[0]),
            "train_s": float((stages - stages.index.to_numpy()).sum())}


def _student_path(result, fetch_to: Path) -> str | None:
    if result.checkpoint is None:
        return None
    if result.checkpoint.filesystem.type_name != "local":  # remote storage ("s3", "gcs", ...)
        if not fetch_to.is_dir():
            tmp = fetch_to.with_name(fetch_to.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            result.checkpoint.to_directory(str(tmp))
            tmp.rename(fetch_to)
        return str(fetch_to)
    return result.checkpoint.path


class TrialProgress(tune.Callback):
    """One line per trial that ends (finished, stopped by ASHA, or failed); frees the Ray Train
    placement group of a trial that Tune killed mid-run."""

    def __init__(self):
        self.ended = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        finished = bool(trial.last_result.get("final"))
        if not finished:
            free_placement_group(trial.last_result.get("placement_group", ""))
        self._line(trial, "diverged" if trial.last_result.get("diverged") else
                   "finished" if finished else "stopped early")

    def on_trial_error(self, iteration, trials, trial, **info):
        free_placement_group(trial.last_result.get("placement_group", ""))
        self._line(trial, "failed")

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A failed trial that Tune restarts (sweep.max_failures): it resumes from its Ray Train
        checkpoint, skipping its finished stages."""
        print(f"[raykd sweep] trial {trial.trial_id} failed after {trial.last_result.get('epochs_done', 0)} "
              f"epochs; restarting it from its last checkpoint", flush=True)

    def _line(self, trial, how: str) -> None:
        self.ended += 1
        metric = {k: v for k, v in trial.last_result.items() if k == "dev_main"}
        why = f": {trial.last_result['nonfinite']}" if how == "diverged" else ""
        print(f"[raykd sweep] trial {trial.trial_id} {how} after "
              f"{trial.last_result.get('epochs_done', 0)} epochs {metric} "
              f"({self.ended} ended in this run){why}", flush=True)


def free_placement_group(pg_hex: str) -> None:
    """Remove a killed trial's Train placement group. Killing the trial kills its Train
    controller; the group outlives it (it belongs to the job) and Train's detached cleaner needs
    the dashboard's state API, so without this each ASHA stop would hold its CPUs until the
    driver exits and, on a small node, the sweep would stall."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    if pg_hex and placement_group_table().get(pg_hex, {}).get("state") == "CREATED":
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_hex)))


class KeepSchedulerState(tune.Callback):
    """Tune 2.60 checkpoints the searcher and the callbacks of an experiment, not its scheduler
    (TuneController.__getstate__ drops it): a restored sweep's ASHA forgot every rung value
    recorded before the interruption, so the first trials after a resume were stopped against
    nothing. Its state rides in this callback's. Tuner.restore unpickles the callback and the
    scheduler from one tuner.pkl, so `scheduler` is the restored sweep's own."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def get_state(self) -> dict:
        return {"scheduler": pickle.dumps(self.scheduler.__dict__)}

    def set_state(self, state: dict) -> None:
        self.scheduler.__dict__.update(pickle.loads(state["scheduler"]))


def share_threads(cfg: Config, concurrency: int, resources: dict) -> Config:
    """Trials side by side on CPUs each get their share of the cores: every worker taking all
    of its node's cores (the default for one run) oversubscribes them, and torch's threads then
    wait on each other: on 2 cores, a teacher trained next to another run that way at 15 ex/s,
    against 230 alone."""
    if concurrency <= 1 or cfg.ray.use_gpu or cfg.ray.threads_per_worker:
        return cfg
    share = int(resources.get("CPU", 1) // (concurrency * cfg.ray.num_workers))
    return replace(cfg, {"ray.threads_per_worker": max(1, share)})


def make_tuner(cfg: Config, dirs: dict, setup: TrialSetup, searcher, scheduler, concurrency: int):
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"CPU": DRIVER_CPUS})
    if tune.Tuner.can_restore(dirs["experiment"]):
        print(f"[raykd sweep] resuming {dirs['experiment']}: finished trials are kept", flush=True)
        return tune.Tuner.restore(dirs["experiment"], trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=cfg.sweep.num_samples,
                                    max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=cfg.run.name, storage_path=dirs["storage"],
                                  callbacks=[TrialProgress(), KeepSchedulerState(scheduler)],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures)))


def check_same_sweep(cfg: Config, experiment: str, results_dir: Path) -> None:
    """A restored experiment keeps its own space and searcher: refuse a changed recipe. The
    config is recorded when an experiment starts and compared when it is resumed."""
    saved = results_dir / "sweep_config.json"
    now = {k: v for k, v in to_dict(cfg).items() if k != "ray"}
    if not tune.Tuner.can_restore(experiment):
        results_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(now, indent=2))
        return
    if saved.is_file():
        # through the config class: keys added since the sweep started take their defaults
        before = {k: v for k, v in to_dict(from_dict(Config, json.loads(saved.read_text()))).items()
                  if k != "ray"}
        diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if diff:
            raise ConfigError(f"the sweep {experiment} was started with a different config "
                              f"(sections {diff} differ); use another run.name, or delete "
                              f"{experiment} to start over")


def run_sweep(cfg: Config, *, build_cache: bool = True, address: str = "",
              config_path: str = "<recipe>") -> dict:
    """Run (or resume) the sweep of `cfg.sweep`; returns the summary (also in summary.json).

    Raises KeyboardInterrupt, after writing the partial table, when the sweep was interrupted:
    the same call resumes it."""
    t0 = time.time()
    dirs = sweep_dirs(cfg)
    results_dir = Path(dirs["results"])
    goals = objectives(cfg)
    sweep_results.check_constraints(cfg.sweep.constraints)
    teachers = teachers_by_task(cfg, existing_teachers(cfg))
    t_cfg = AutoConfig.from_pretrained(str(teachers[cfg.data.tasks[0]][0]))
    constraints = Constraints(to_dict(cfg), t_cfg.num_attention_heads, t_cfg.hidden_size)
    space = make_space(cfg)
    valid = check_satisfiable(space, constraints, cfg.run.seed)
    scheduler = make_scheduler(cfg, valid)
    quantities = cache_quantities(valid + [cfg], t_cfg.num_hidden_layers)

    data.check_available(cfg.data)
    address = init_ray(cfg.ray, address)
    import ray
    from ray.util.placement_group import placement_group_table

    keys, built = prepare_cache(cfg, teachers, quantities, build_cache, config_path)
    check_same_sweep(cfg, dirs["experiment"], results_dir)
    resources = ray.cluster_resources()
    concurrency = trial_concurrency(cfg, resources)
    cfg = share_threads(cfg, concurrency, resources)
    setup = TrialSetup(to_dict(cfg), teacher_view(teachers, Path(dirs["teacher_view"])),
                       dirs["trials"], keys)
    searcher = make_searcher(cfg, space, constraints, str(results_dir / "rejected.jsonl"), goals)
    print(f"[raykd sweep] {cfg.sweep.num_samples} trials, {concurrency} at a time, "
          f"{cfg.sweep.scheduler} + {cfg.sweep.searcher}; cache {list(keys)} holds {quantities}",
          flush=True)
    sets_before, t_tune = count_sets(cfg.cache.root, keys), time.time()
    results = make_tuner(cfg, dirs, setup, searcher, scheduler, concurrency).fit()
    facts = {"name": cfg.run.name, "experiment": dirs["experiment"], "ray": address,
             "tune_s": time.time() - t_tune, "concurrency": concurrency,
             "teacher_loads_in_trials": count_sets(cfg.cache.root, keys) - sets_before,
             "cache_sets_built_up_front": built, "quantities": quantities, "objectives": goals,
             # 0 when every killed trial's Train workers were freed (see free_placement_group)
             "placement_groups_held_after": sum(pg["state"] == "CREATED"
                                                for pg in placement_group_table().values())}
    summary, table = summarize(cfg, results, facts, results_dir)
    summary["wall_s"] = time.time() - t0
    print(sweep_results.write_summary(summary, table, cfg.sweep.metric, results_dir), flush=True)
    publish(results_dir, dirs)
    return summary


def summarize(cfg: Config, results, facts: dict, results_dir: Path):
    """(summary, table): the table is written even when interrupted; then the Pareto PNG and
    the exports."""
    metric, mode = cfg.sweep.metric, cfg.sweep.mode
    statuses = {t.trial_id: t.status for t in tune.ExperimentAnalysis(facts["experiment"]).trials}
    records = [trial_record(r, statuses, list(cfg.sweep.space), metric, mode, results_dir / "checkpoints")
               for r in results]
    table = sweep_results.trials_table(records, metric, mode, cfg.sweep.cost_metric)
    sweep_results.write_tables(table, results_dir)
    done = results.num_terminated + results.num_errors
    if done < cfg.sweep.num_samples:
        print(f"[raykd sweep] interrupted: {done} of {cfg.sweep.num_samples} trials done; partial "
              f"table in {results_dir}; rerun the same command to resume", flush=True)
        raise KeyboardInterrupt
    sweep_results.plot_pareto(table, metric, cfg.sweep.cost_metric, results_dir / "pareto.png")
    tasks = [data.task_of(cfg.data, t) for t in cfg.data.tasks]
    exports = sweep_results.export_best(table, metric, mode, cfg.sweep.cost_metric,
                                        cfg.sweep.constraints, tasks, results_dir / "export")
    rejected = results_dir / "rejected.jsonl"
    counts = {k: int((table["status"] == v).sum()) for k, v in
              (("finished", "finished"), ("stopped_early", "stopped early"), ("diverged", "diverged"),
               ("errors", "error"))}
    summary = {**facts, "trials": len(table), **counts, "space_keys": list(cfg.sweep.space),
               "rejected_draws": len(rejected.read_text().splitlines()) if rejected.is_file() else 0,
               "scheduler": cfg.sweep.scheduler, "searcher": cfg.sweep.searcher, "exports": exports}
    return summary, table


def publish(results_dir: Path, dirs: dict) -> None:
    """With a URI storage path, copy the results next to the experiment (<experiment>/results)."""
    if "://" not in dirs["storage"]:
        return
    import pyarrow.fs as pafs

    fs, base = store.filesystem(dirs["experiment"])
    dest = store.join(base, "results")
    pafs.copy_files(str(results_dir), dest, destination_filesystem=fs)
    print(f"[raykd sweep] results copied to {fs.type_name}://{dest}", flush=True)
