"""The one training loop (per Ray Train worker) and `fit_all`, which runs it on a TorchTrainer
for a list of runs: a recipe's stages, or a job's teachers, one after another.

Teacher fine-tuning, cached distillation, online distillation and the no-teacher baseline are
all this loop: they differ only in the stage's losses and where `t_*` batch keys come from.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import data, evaluate, models
from pipeline.batching import collate_inputs, task_schedule
from pipeline.cache import store
from pipeline.config import Config, StageConfig, from_dict
from pipeline import ray_runtime
from pipeline.objective import build_projections, compute_loss, make_plan, teacher_batch
from pipeline.train_data import eval_batches, num_batches, prefetched, worker_batches

STATE_FILE = "train_state.pt"
NONFINITE_FILE = "nonfinite-rank{rank}.txt"  # in the run's Ray Train folder; fit() raises it
CRASH_MARKER = "test_crash.marker"
CRASH_ENV = "RAYKD_TEST_CRASH_AT_STEP"  # tests only: rank 0 exits once at this step
# the last epoch's steady-state figures: kept in the checkpoint, added to the run's metrics.json
LAST_EPOCH_KEYS = ("epoch_examples_per_s", "epoch_data_wait_fraction", "teacher_forward_fraction")


class NonFiniteLoss(RuntimeError):
    pass


class Trainee(nn.Module):
    """The student and its learned projections. `forward` returns the stage's loss, so that DDP
    sees every parameter it must synchronise (projections included) inside one forward call."""

    def __init__(self, model: nn.Module, proj: nn.ModuleDict, stage: StageConfig, plan):
        super().__init__()
        self.model, self.proj, self.stage, self.plan = model, proj, stage, plan

    def forward(self, batch: dict[str, torch.Tensor], task: str, kind: str):
        head = task if task in self.model.tasks else None  # unlabeled text: no task head of its own
        feats = self.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                           head, self.plan.student)
        with torch.autocast(feats.logits.device.type, enabled=False):  # losses in fp32, not bf16
            return compute_loss(self.stage, self.plan, feats, batch, self.proj, kind,
                                models.num_heads(self.model))


def train_worker(ctx: dict[str, Any]) -> None:
    """Ray Train entry: train ctx["runs"] in order in this one worker group (a recipe's stages,
    or a job's teachers: no new Ray Train run, hence no new processes, per stage). A run whose
    output folder exists is skipped, so a worker group that Ray Train restarts after a failure
    (FailureConfig) goes on with the run it was in, from that run's latest checkpoint."""
    import ray.train
    import ray.train.torch as rtt

    cfg: Config = from_dict(Config, ctx["config"])
    _quiet_train_reports()
    device = rtt.get_device()
    if device.type == "cpu":  # Ray pins fractional-CPU workers to 1 thread; use the node's cores
        torch.set_num_threads(cfg.ray.threads_per_worker or max(
            1, (os.cpu_count() or 1) // ray.train.get_context().get_local_world_size()))
    ckpt = ray.train.get_checkpoint()
    for run in ctx["runs"]:
        if finished(run["out_dir"]):
            continue
        if not train_run(ctx, cfg, run, ckpt, device):
            return  # a non-finite loss: fit_all raises it
        ckpt = None  # only the first unfinished run can be the checkpoint's


def _quiet_train_reports() -> None:
    """Ray Train logs every report (its whole metrics dict) and checkpoint at INFO, once per
    epoch per run; the loop's own epoch line says the same. Warnings and errors still show.
    Ray 2.60 names the report logger by its file path, not its module."""
    from ray.train.v2._internal.execution import context, storage

    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_run(ctx: dict[str, Any], cfg: Config, run: dict[str, Any], ckpt, device) -> bool:
    """The loop for one run (a stage or a teacher); rank 0 keeps its best epoch by dev metric
    and, at the end, moves it to run["out_dir"]. False if it stopped on a non-finite loss."""
    import ray.train
    import ray.train.torch as rtt

    stage: StageConfig = from_dict(StageConfig, run["stage"])
    tasks: dict[str, dict] = run["tasks"]  # name -> {"kind", "num_outputs", "metric"}
    world, rank = ray.train.get_context().get_world_size(), ray.train.get_context().get_world_rank()
    out_dir = Path(run["out_dir"])
    torch.manual_seed(run["seed"])
    model = models.build(run["model"], run["heads"])
    teacher = models.build(run["online_teacher"], {}) if run.get("online_teacher") else None
    plan = make_plan(stage, models.num_layers(model), run["teacher_layers"])
    proj = build_projections(stage, plan, models.width(model), run["teacher_width"])
    start_epoch, state = 0, _resume_state(ckpt, run, model, proj)
    if state is not None:
        start_epoch = state["epoch"] + 1
        if rank == 0:
            print(f"[raykd] {run['label']}: resumed from the epoch {state['epoch']} checkpoint "
                  f"(step {state['step']}) on {world} worker(s); steps after it are redone", flush=True)
    elif rank == 0:
        shutil.rmtree(_best_dir(out_dir), ignore_errors=True)  # an earlier attempt's, not this one's
        print(f"[raykd] {run['label']}: training on {list(tasks)}, losses {stage.losses}", flush=True)
    net = Trainee(model, proj, stage, plan)
    trainee = rtt.prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": True})
    if teacher is not None:
        teacher.to(device).eval()

    per_worker = max(1, stage.optim.batch_size // world)
    sources = {t: run["sources"][f"train:{t}"] for t in tasks}
    counts = {t: num_batches(src.rows, world, per_worker) for t, src in sources.items()}
    steps_per_epoch = sum(counts.values())
    total = stage.optim.max_steps or steps_per_epoch * stage.optim.epochs
    opt = torch.optim.AdamW(trainee.parameters(), lr=stage.optim.lr,
                            weight_decay=stage.optim.weight_decay, fused=device.type in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_decay(total, stage.optim.warmup_ratio))
    if state is not None:
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    amp = stage.optim.bf16 and evaluate.bf16_supported(device)
    step, log = (state or {}).get("step", 0), _Progress(rank, total)
    last_epoch = _last_epoch(state or {})

    def epoch_batches(epoch: int):  # read + collate the next batches while this one trains
        return prefetched((task, _collate(table, (run["cache_columns"] or {}).get(task)))  # per task: widths differ
                          for task, table in _train_batches(sources, counts, rank, world, per_worker,
                                                            cfg.data.sampling_alpha, run["seed"] + epoch))

    batches = epoch_batches(start_epoch) if start_epoch < stage.optim.epochs and step < total else None
    for epoch in range(start_epoch, stage.optim.epochs):
        if step >= total:
            break
        trainee.train()
        log.begin_epoch()
        timed = log.timed_wait(batches)
        for task, batch in timed:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                if teacher is not None:
                    with torch.no_grad(), log.timing_teacher(device):
                        head = task if task in teacher.tasks else None
                        batch |= teacher_batch(teacher(batch["input_ids"], batch["attention_mask"],
                                                       batch["token_type_ids"], head, plan.teacher), plan)
                loss, terms = trainee(batch, task, tasks[task]["kind"])
            if not _finite_on_every_rank(loss, world):  # all ranks stop at the same step
                _record_nonfinite(ctx, rank, loss, step + 1, epoch, task, terms)
                return False
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if stage.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainee.parameters(), stage.optim.grad_clip)
            opt.step()
            sched.step()
            step += 1
            log.step(step, epoch, len(batch["input_ids"]), terms)
            if rank == 0 and step == ctx.get("test_crash_at_step"):
                _test_crash_once(ctx["storage"])
            if step >= total:
                break
        timed.close()
        log.end_epoch()
        if epoch + 1 < stage.optim.epochs and step < total:
            batches = epoch_batches(epoch + 1)  # its first window is read while this epoch is evaluated
        losses = log.epoch_losses()
        metrics = _evaluate_rank0(net.model, run, cfg, rank, device, amp, losses)
        metrics |= {"epoch": epoch, "step": step, "train_examples_per_s": log.rate(),
                    # epochs of this and every earlier run of the fit: a sweep's ASHA time axis,
                    # which stays right when a retried trial skips its finished stages
                    "epochs_done": run.get("epochs_before", 0) + epoch + 1,
                    "epoch_examples_per_s": log.epoch_rate, "data_wait_fraction": log.wait_fraction(),
                    "epoch_data_wait_fraction": log.epoch_wait_fraction,
                    "first_step_unix": log.first_step_unix, **losses,
                    **({"teacher_forward_fraction": log.epoch_teacher_fraction} if teacher is not None else {}),
                    "placement_group": _placement_group_id()}
        last_epoch = _last_epoch(metrics)
        if rank == 0:
            _keep_if_best(net.model, metrics, out_dir)
        _report(metrics, net, opt, sched, epoch, step, start_epoch, rank, out_dir)
    if rank == 0:
        _finish_run(out_dir, last_epoch)
    if world > 1:
        torch.distributed.barrier()  # every rank sees the output before the next run reads it
    return True


def finished(out_dir: str | Path) -> bool:
    """A run's output folder is complete (it appears, by a rename, only when training ended)."""
    return (Path(out_dir) / "metrics.json").is_file()


def _best_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".best")


def _resume_state(ckpt, run: dict, model, proj) -> dict | None:
    """The checkpoint's training state, with its weights loaded into model and proj, if the
    checkpoint is this run's (a checkpoint names the output folder of the run that wrote it)."""
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, weights_only=False)
        if state.get("out_dir") != run["out_dir"]:
            return None
        models.load_folder(Path(d) / "model", model)
        proj.load_state_dict(state["proj"])
    return state


def _keep_if_best(model, metrics: dict, out_dir: Path) -> None:
    """Rank 0: save this epoch's model and metrics as the run's best if its dev_main beats the
    best so far (the first of equals is kept). Written beside and renamed into place."""
    best = _best_dir(out_dir)
    if (best / "metrics.json").is_file():
        if json.loads((best / "metrics.json").read_text())["dev_main"] >= metrics["dev_main"]:
            return
    tmp = out_dir.with_name(out_dir.name + ".best-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    models.save_folder(model, tmp / "model")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(best, ignore_errors=True)
    os.replace(tmp, best)


def _last_epoch(source: dict) -> dict[str, float]:
    """LAST_EPOCH_KEYS of an epoch's metrics (or of a resumed checkpoint's state); 0 if absent."""
    return {k: source.get(k, 0.0) for k in LAST_EPOCH_KEYS}


def _finish_run(out_dir: Path, last_epoch: dict[str, float]) -> None:
    """Rank 0: the best epoch becomes out_dir (model/ + metrics.json) in one rename; its metrics
    gain the last epoch's own rate and data-wait share (and, online, its share of time in the
    teacher's forward), whichever epoch was best (steady state, start-up excluded)."""
    best = _best_dir(out_dir)
    if not (best / "metrics.json").is_file():
        raise RuntimeError(f"{out_dir}: training ended with no evaluated epoch to keep")
    metrics = json.loads((best / "metrics.json").read_text())
    metrics["final_epoch_examples_per_s"] = last_epoch["epoch_examples_per_s"]
    metrics["final_epoch_data_wait_fraction"] = last_epoch["epoch_data_wait_fraction"]
    if last_epoch["teacher_forward_fraction"]:
        metrics["final_epoch_teacher_forward_fraction"] = last_epoch["teacher_forward_fraction"]
    (best / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(best, out_dir)


def _placement_group_id() -> str:
    """This run's placement group, reported so that a sweep can free it when Tune kills the
    run (Train's own cleanup after a killed controller needs the dashboard's state API)."""
    import ray.util

    pg = ray.util.get_current_placement_group()
    return pg.id.hex() if pg is not None else ""


def _finite_on_every_rank(loss: torch.Tensor, world: int) -> bool:
    ok = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
    if world > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


def _record_nonfinite(ctx, rank, loss, step, epoch, task, terms) -> None:
    """Leave the reason for fit() to raise: a worker exception would be retried by Ray Train
    (FailureConfig) and fail the same way again."""
    if torch.isfinite(loss.detach()):
        return  # another rank's loss was the bad one; it writes the message
    msg = (f"non-finite loss at step {step} (epoch {epoch}, task {task}, rank {rank}): "
           + ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
           + "; the last good checkpoint is kept — lower the lr or disable bf16 (optim.bf16=false)")
    print(f"[raykd] {msg}", flush=True)
    store.write_atomic(*_storage_file(ctx["storage"], NONFINITE_FILE.format(rank=rank)), msg.encode())


def _test_crash_once(storage: dict[str, str]) -> None:
    """Test hook (env RAYKD_TEST_CRASH_AT_STEP on the driver): kill this worker process once,
    to exercise resume from the last checkpoint. The marker keeps the retry alive."""
    fs, marker = _storage_file(storage, CRASH_MARKER)
    if not store.exists(fs, marker):
        # Ray Train's controller learns of a reported checkpoint when it next polls the workers;
        # give it time, so the crash tests resume rather than a report lost to the race.
        time.sleep(10)
        store.write_atomic(fs, marker, b"crashed")
        print(f"[raykd] test hook: worker exits at step as asked by {CRASH_ENV}", flush=True)
        os._exit(1)


def _collate(table, cache_columns: dict | None) -> dict[str, torch.Tensor]:
    batch = collate_inputs(table)
    if cache_columns:
        from pipeline.cache.reader import collate_teacher
        batch |= collate_teacher(table, cache_columns)
    return batch


def _train_batches(sources: dict, counts: dict[str, int], rank: int, world: int, per_worker: int,
                   alpha: float, seed: int):
    """Yield (task, Arrow batch): one task per batch, interleaved by the task schedule; every
    rank takes the same schedule, so DDP steps line up."""
    iters = {t: worker_batches(src, rank, world, per_worker, seed) for t, src in sources.items()}
    for task in task_schedule(counts, alpha, seed):
        yield task, next(iters[task])


def _evaluate_rank0(model, run: dict, cfg: Config, rank: int, device, amp: bool,
                    losses: dict[str, float]) -> dict[str, float]:
    """Dev metrics of the stage's labeled tasks; `dev_main` is their mean main metric. A stage on
    unlabeled text has no dev metric: its `dev_main` is minus its mean training loss."""
    if rank != 0:
        return {}
    labeled = {t: info for t, info in run["tasks"].items() if info.get("metric")}
    if not labeled:
        return {"dev_main": -float(sum(losses.values()))}
    results: dict[str, float] = {}
    for t, info in labeled.items():
        batches = (_collate(tb, None) for tb in eval_batches(run["sources"][f"dev:{t}"]))
        task = data.task_of(cfg.data, t)  # user-declared tasks too
        results |= evaluate.evaluate_task(model, batches, task, info["kind"], device, amp, prefix=f"{t}/")
    mains = [results[f"{t}/{info['metric']}"] for t, info in labeled.items()]
    results["dev_main"] = float(np.mean(mains))
    return results


def _report(metrics, net, opt, sched, epoch, step, start_epoch, rank, out_dir: Path) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if rank == 0:
            models.save_folder(net.model, Path(d) / "model")
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch,
                        "step": step, "start_epoch": start_epoch,  # > 0: this attempt resumed
                        **_last_epoch(metrics),
                        "out_dir": str(out_dir), "proj": net.proj.state_dict()}, Path(d) / STATE_FILE)
            ckpt = ray.train.Checkpoint.from_directory(d)
            print(f"[raykd] epoch {epoch} step {step} dev " + " ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)), flush=True)
        ray.train.report(metrics, checkpoint=ckpt)


def _warmup_decay(total: int, warmup_ratio: float):
    warm = max(1, int(total * warmup_ratio))
    return lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))


class _Progress:
    """One line every ~20 s from rank 0: step, epoch, loss terms, examples/s; and each loss
    term's mean over the epoch for the epoch's metrics."""

    def __init__(self, rank: int, total: int, every_s: float = 20.0):
        self.rank, self.total, self.every = rank, total, every_s
        self.t_begin = self.last = time.perf_counter()
        self.train_s = 0.0  # time inside training epochs only (evaluation and checkpoints excluded)
        self.examples = 0
        self.first_step_unix = 0.0  # wall clock after the first step: sweeps measure start-up
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.wait_s = 0.0  # time the loop waited for its next batch (0 when reading keeps up)
        self.epoch_rate = 0.0  # examples/s of the last finished epoch alone (after start-up: steady)
        self._epoch_examples = 0
        self.teacher_s = 0.0  # online distillation: time in the teacher's forward
        self.epoch_teacher_fraction = 0.0  # its share of the last finished epoch
        self._epoch_teacher_s = 0.0
        self.epoch_wait_fraction = 0.0  # share of the last finished epoch spent waiting for data
        self._epoch_wait_s = 0.0

    @contextlib.contextmanager
    def timing_teacher(self, device: torch.device):
        """Time the in-loop teacher forward (online mode): the benchmark's bound on what a cache
        can save is (teacher forward + student step) / student step, both from the same run."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if device.type == "cuda":  # kernels run asynchronously: wait for the teacher's
                torch.cuda.synchronize(device)
            self.teacher_s += time.perf_counter() - t0

    def timed_wait(self, batches):
        """`batches`, timing how long the loop waits on each."""
        it = iter(batches)
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    self.wait_s += time.perf_counter() - t0
                yield item
        finally:
            if hasattr(it, "close"):
                it.close()  # a loop that stops early stops the prefetch thread

    def step(self, step: int, epoch: int, n: int, terms: dict[str, float]) -> None:
        self.examples += n
        self.steps += 1
        self.first_step_unix = self.first_step_unix or time.time()
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        now = time.perf_counter()
        if self.rank == 0 and (now - self.last > self.every or step == 1):
            self.last = now
            loss = " ".join(f"{k}={v:.4f}" for k, v in terms.items())
            print(f"[raykd] step {step}/{self.total} epoch {epoch} {loss} "
                  f"{self.rate():.0f} ex/s/worker, {100 * self.wait_fraction():.0f}% waiting for data",
                  flush=True)

    def begin_epoch(self) -> None:
        self.t_begin = time.perf_counter()
        self._epoch_examples = self.examples
        self._epoch_teacher_s = self.teacher_s
        self._epoch_wait_s = self.wait_s

    def end_epoch(self) -> None:
        spent = time.perf_counter() - self.t_begin
        self.train_s += spent
        self.epoch_rate = (self.examples - self._epoch_examples) / max(spent, 1e-9)
        self.epoch_teacher_fraction = (self.teacher_s - self._epoch_teacher_s) / max(spent, 1e-9)
        self.epoch_wait_fraction = (self.wait_s - self._epoch_wait_s) / max(spent, 1e-9)
        self.t_begin = None

    def _training_s(self) -> float:
        """Time inside training epochs so far, the running one included."""
        running = time.perf_counter() - self.t_begin if self.t_begin is not None else 0.0
        return max(1e-9, self.train_s + running)

    def rate(self) -> float:
        """Training examples/s of this worker, evaluation and checkpointing excluded."""
        return self.examples / self._training_s()

    def wait_fraction(self) -> float:
        """Share of training time spent waiting for batches (reading is the bottleneck if high)."""
        return self.wait_s / self._training_s()

    def epoch_losses(self) -> dict[str, float]:
        """{"loss/<term>": mean over this epoch's steps (this rank)}; starts the next epoch."""
        out = {f"loss/{k}": v / max(1, self.steps) for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0
        return out


# ------------------------------------------------------------------------------ driver side


def run_spec(stage: StageConfig, model_spec: dict, tasks: dict[str, dict], sources: dict,
             out_dir: str | Path, *, teacher_layers: int, teacher_width: int, seed: int,
             cache_columns: dict[str, dict] | None = None, online_teacher: dict | None = None,
             heads: dict[str, int] | None = None, label: str = "") -> dict[str, Any]:
    """One run of the loop, as plain data for `fit_all`.

    model_spec: what to start from (models.build), e.g. an earlier run's out_dir/model.
    tasks: {task: {"kind", "num_outputs", "metric"}} trained on; heads: task -> outputs of the
    model's heads (default: the trained tasks'); a student keeps heads for every task of the
    recipe, also in stages that train on a subset or unlabeled text.
    sources: {"train:<task>": TableSource | CacheSource, "dev:<task>": TableSource}
    (pipeline.train_data: each worker reads its own share, no Ray Data coordinator).
    """
    out_dir = Path(out_dir).resolve()
    return {"stage": _plain(stage), "model": model_spec, "tasks": tasks, "sources": sources,
            "heads": heads or {t: v["num_outputs"] for t, v in tasks.items()},
            "teacher_layers": teacher_layers, "teacher_width": teacher_width, "seed": seed,
            "cache_columns": cache_columns, "online_teacher": online_teacher,
            "out_dir": str(out_dir), "label": label or out_dir.name}


def fit_all(cfg: Config, runs: list[dict[str, Any]], experiment: str | Path, *,
            callbacks: tuple = (), retries: int = 2) -> None:
    """Train `runs` (from run_spec) in order on one TorchTrainer; each run's best epoch (by
    dev_main) lands in its out_dir as model/ + metrics.json, a folder that appears only when
    that run has finished. Runs finished earlier are skipped.

    One TorchTrainer for all of a recipe's stages (or all of a job's teachers): a Ray Train run
    starts a controller and worker processes that import torch and transformers, ~8 s on two
    cores, which the second and later runs no longer pay.
    experiment: a folder naming the Ray Train experiment (see train_storage); a rerun with the
    same one resumes the run it stopped in from that run's latest checkpoint.
    callbacks: Ray Train callbacks, e.g. one forwarding each report to Ray Tune (sweeps).
    retries: worker-group restarts after a failure, each from the latest checkpoint.
    """
    import ray.train

    before = itertools.accumulate((r["stage"]["optim"]["epochs"] for r in runs), initial=0)
    runs = [r | {"epochs_before": b} for r, b in zip(runs, before)]
    pending = [r for r in runs if not finished(r["out_dir"])]
    if not pending:
        return
    storage = train_storage(cfg, Path(experiment).resolve())
    _take_nonfinite(storage, cfg.ray.num_workers)  # a previous attempt's, if any
    ctx = {"config": _plain(cfg), "runs": pending, "storage": storage,
           "test_crash_at_step": int(os.environ.get(CRASH_ENV, 0)) or None}
    trainer = ray_runtime.trainer(
        train_worker, ctx,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            placement_strategy=cfg.ray.placement_strategy,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if cfg.ray.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=storage["name"], storage_path=storage["path"],
            # the latest checkpoint only, to resume from: each run's best epoch is kept by
            # rank 0 beside its output folder
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=retries), callbacks=list(callbacks)),
    )
    trainer.fit()  # raises when workers keep failing after max_failures retries
    if reason := _take_nonfinite(storage, cfg.ray.num_workers):
        raise NonFiniteLoss(reason)
    if missing := [r["out_dir"] for r in pending if not finished(r["out_dir"])]:
        raise RuntimeError(f"Ray Train finished without writing {missing}")
    if not cfg.run.keep_checkpoints:  # every run's best model is in its out_dir now
        fs, base = store.filesystem(storage["path"])
        experiment_path = store.join(base, storage["name"])
        if store.exists(fs, experiment_path):
            fs.delete_dir(experiment_path)


def train_storage(cfg: Config, out_dir: Path) -> dict[str, str]:
    """Ray Train's storage for the experiment named by out_dir (fit_all's `experiment`, e.g.
    <student>/stages): {"path": a local path or URI, "name": the experiment folder in it}. By
    default `<out_dir.parent>/.ray_train/<out_dir.name>_train`; under run.storage_path, which
    many runs share, the name also holds the run name and a hash of out_dir, so no two runs
    share an experiment folder."""
    if not cfg.run.storage_path:
        return {"path": str(out_dir.parent / ".ray_train"), "name": f"{out_dir.name}_train"}
    path = cfg.run.storage_path
    digest = hashlib.sha256(str(out_dir).encode()).hexdigest()[:10]
    return {"path": path if "://" in path else os.path.abspath(path),
            "name": f"{cfg.run.name}-{out_dir.name}-{digest}_train"}


def _storage_file(storage: dict[str, str], file: str):
    """(pyarrow filesystem, path) of a file in the run's Ray Train folder, for the driver and
    every worker alike, wherever they run."""
    fs, base = store.filesystem(storage["path"])
    return fs, store.join(base, storage["name"], file)


def _take_nonfinite(storage: dict[str, str], world: int) -> str:
    """The lowest rank's non-finite-loss message ("" if none), deleting every rank's file."""
    reasons = []
    for rank in range(world):
        fs, path = _storage_file(storage, NONFINITE_FILE.format(rank=rank))
        if store.exists(fs, path):
            reasons.append(store.read_bytes(fs, path).decode())
            fs.delete_file(path)
    return reasons[0] if reasons else ""


def _plain(obj) -> dict:
    from pipeline.config import to_dict
    return to_dict(obj)
