"""The one training loop (per Ray Train worker) and `fit`, which runs it on a TorchTrainer.

Teacher fine-tuning, cached distillation, online distillation and the no-teacher baseline are
all this loop: they differ only in the stage's losses and where `t_*` batch keys come from.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import evaluate, models
from pipeline.batching import collate_inputs, task_schedule
from pipeline.config import Config, StageConfig, from_dict
from pipeline.objective import build_projections, compute_loss, make_plan, teacher_batch

STATE_FILE = "train_state.pt"
PROJ_FILE = "projections.pt"


class NonFiniteLoss(RuntimeError):
    pass


def train_worker(ctx: dict[str, Any]) -> None:
    """Ray Train entry: ctx holds plain data (config dict, stage, model spec, task info)."""
    import ray.train
    import ray.train.torch as rtt

    cfg: Config = from_dict(Config, ctx["config"])
    stage: StageConfig = from_dict(StageConfig, ctx["stage"])
    tasks: dict[str, dict] = ctx["tasks"]  # name -> {"kind", "num_outputs", "train_rows"}
    world, rank = ray.train.get_context().get_world_size(), ray.train.get_context().get_world_rank()
    torch.manual_seed(ctx["seed"])
    device = rtt.get_device()
    if device.type == "cpu":  # Ray pins fractional-CPU workers to 1 thread; use the node's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ray.train.get_context().get_local_world_size()))

    model = models.build(ctx["model"], {t: v["num_outputs"] for t, v in tasks.items()})
    teacher = models.build(ctx["online_teacher"], {}) if ctx.get("online_teacher") else None
    plan = make_plan(stage, models.num_layers(model), ctx["teacher_layers"])
    proj = build_projections(stage, plan, models.width(model), ctx["teacher_width"])
    trainee = torch.nn.ModuleDict({"model": model, "proj": proj})
    start_epoch, state = 0, None
    if (ckpt := ray.train.get_checkpoint()) is not None:  # resume after a failure
        with ckpt.as_directory() as d:
            trainee.model = models.load_folder(Path(d) / "model", model)
            state = torch.load(Path(d) / STATE_FILE, weights_only=False)
            proj.load_state_dict(state["proj"])
        start_epoch = state["epoch"] + 1
    trainee = rtt.prepare_model(trainee, parallel_strategy_kwargs={"find_unused_parameters": True})
    if teacher is not None:
        teacher.to(device).eval()

    per_worker = max(1, stage.optim.batch_size // world)
    steps_per_epoch = sum(math.ceil(v["train_rows"] / world / per_worker) for v in tasks.values())
    total = stage.optim.max_steps or steps_per_epoch * stage.optim.epochs
    opt = torch.optim.AdamW(trainee.parameters(), lr=stage.optim.lr,
                            weight_decay=stage.optim.weight_decay, fused=device.type in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_decay(total, stage.optim.warmup_ratio))
    if state is not None:
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    amp = stage.optim.bf16 and evaluate.bf16_supported(device)
    net = trainee.module if hasattr(trainee, "module") else trainee
    step, best, log = (state or {}).get("step", 0), None, _Progress(rank, total)

    for epoch in range(start_epoch, stage.optim.epochs):
        trainee.train()
        batches = _train_batches(tasks, per_worker, cfg.data.sampling_alpha, ctx["seed"] + epoch)
        for task, table in batches:
            batch = {k: v.to(device) for k, v in _collate(table, ctx["cache_columns"]).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                if teacher is not None:
                    with torch.no_grad():
                        batch |= teacher_batch(teacher(batch["input_ids"], batch["attention_mask"],
                                                       batch["token_type_ids"], task, plan.teacher), plan)
                feats = trainee["model"](batch["input_ids"], batch["attention_mask"],
                                         batch["token_type_ids"], task, plan.student) \
                    if not hasattr(trainee, "module") else _ddp_forward(trainee, batch, task, plan)
                loss, terms = compute_loss(stage, plan, feats, batch, net["proj"],
                                           tasks[task]["kind"], models.num_heads(net["model"]))
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss at step {step} (epoch {epoch}, task {task}): "
                                    f"{terms}; the last good checkpoint is kept — lower the lr "
                                    "or disable bf16 (optim.bf16=false)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if stage.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainee.parameters(), stage.optim.grad_clip)
            opt.step()
            sched.step()
            step += 1
            log.step(step, epoch, len(table), terms)
            if step >= total:
                break
        metrics = _evaluate_rank0(net["model"], ctx, rank, device, amp)
        metrics |= {"epoch": epoch, "step": step, "train_examples_per_s": log.rate()}
        _report(metrics, net, opt, sched, epoch, step, rank)
        if step >= total:
            break


def _ddp_forward(trainee, batch, task, plan):
    # DDP must see the forward call to sync grads; ModuleDict has no forward, so call through it.
    return trainee.module["model"](batch["input_ids"], batch["attention_mask"],
                                   batch["token_type_ids"], task, plan.student)


def _collate(table, cache_columns: dict | None) -> dict[str, torch.Tensor]:
    batch = collate_inputs(table)
    if cache_columns:
        from pipeline.cache.reader import collate_teacher
        batch |= collate_teacher(table, cache_columns)
    return batch


def _train_batches(tasks: dict, per_worker: int, alpha: float, seed: int):
    """Yield (task, Arrow batch): one task per batch, interleaved by the task schedule."""
    import ray.train

    iters = {t: iter(ray.train.get_dataset_shard(f"train:{t}").iter_batches(
        batch_size=per_worker, batch_format="pyarrow", local_shuffle_buffer_size=min(4096, v["train_rows"]),
        local_shuffle_seed=seed, prefetch_batches=2)) for t, v in tasks.items()}
    counts = {t: math.ceil(v["train_rows_per_worker"] / per_worker) for t, v in tasks.items()}
    for task in task_schedule(counts, alpha, seed):
        table = next(iters[task], None)
        if table is not None and len(table):
            yield task, table


def _evaluate_rank0(model, ctx: dict, rank: int, device, amp: bool) -> dict[str, float]:
    import ray.train

    if rank != 0:
        return {}
    results: dict[str, float] = {}
    for t, info in ctx["tasks"].items():
        shard = ray.train.get_dataset_shard(f"dev:{t}")
        batches = (_collate(tb, None) for tb in shard.iter_batches(batch_size=128, batch_format="pyarrow"))
        results |= evaluate.evaluate_task(model, batches, t, info["kind"], device, amp, prefix=f"{t}/")
    mains = [results[f"{t}/{info['metric']}"] for t, info in ctx["tasks"].items()]
    results["dev_main"] = float(np.mean(mains))
    return results


def _report(metrics, net, opt, sched, epoch, step, rank) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if rank == 0:
            models.save_folder(net["model"], Path(d) / "model")
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch,
                        "step": step, "proj": net["proj"].state_dict()}, Path(d) / STATE_FILE)
            ckpt = ray.train.Checkpoint.from_directory(d)
            print(f"[raykd] epoch {epoch} step {step} dev " + " ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)), flush=True)
        ray.train.report(metrics, checkpoint=ckpt)


def _warmup_decay(total: int, warmup_ratio: float):
    warm = max(1, int(total * warmup_ratio))
    return lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))


class _Progress:
    """One line every ~20 s from rank 0: step, epoch, loss terms, examples/s."""

    def __init__(self, rank: int, total: int, every_s: float = 20.0):
        self.rank, self.total, self.every = rank, total, every_s
        self.t0 = self.last = time.perf_counter()
        self.examples = 0

    def step(self, step: int, epoch: int, n: int, terms: dict[str, float]) -> None:
        self.examples += n
        now = time.perf_counter()
        if self.rank == 0 and (now - self.last > self.every or step == 1):
            self.last = now
            loss = " ".join(f"{k}={v:.4f}" for k, v in terms.items())
            print(f"[raykd] step {step}/{self.total} epoch {epoch} {loss} "
                  f"{self.rate():.0f} ex/s/worker", flush=True)

    def rate(self) -> float:
        return self.examples / max(1e-9, time.perf_counter() - self.t0)


# ------------------------------------------------------------------------------ driver side


def fit(cfg: Config, stage: StageConfig, model_spec: dict, tasks: dict[str, dict],
        datasets: dict, out_dir: str | Path, *, teacher_layers: int, teacher_width: int,
        cache_columns: dict | None = None, online_teacher: dict | None = None,
        seed: int | None = None) -> dict[str, Any]:
    """Run the loop on a TorchTrainer; copy the best checkpoint's model to out_dir/model.

    datasets: {"train:<task>": ray Dataset, "dev:<task>": ray Dataset}. Returns the best
    checkpoint's metrics. The output folder appears only when training has finished.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    out_dir = Path(out_dir).resolve()
    ctx = {"config": _plain(cfg), "stage": _plain(stage), "model": model_spec, "tasks": tasks,
           "teacher_layers": teacher_layers, "teacher_width": teacher_width,
           "cache_columns": cache_columns, "online_teacher": online_teacher,
           "seed": cfg.run.seed if seed is None else seed}
    trainer = TorchTrainer(
        train_worker, train_loop_config=ctx,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if cfg.ray.use_gpu else {})}),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[k for k in datasets if k.startswith("train:")]),
        run_config=ray.train.RunConfig(
            name=out_dir.name + "_train", storage_path=str(out_dir.parent / ".ray_train"),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="dev_main", checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=2)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    best = result.get_best_checkpoint(metric="dev_main", mode="max") or result.checkpoint
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with best.as_directory() as d:
        shutil.copytree(Path(d) / "model", tmp / "model")
    metrics = dict(_best_metrics(result, best))
    (tmp / "metrics.json").write_text(__import__("json").dumps(metrics, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return metrics


def _best_metrics(result, best) -> dict:
    for ckpt, metrics in result.best_checkpoints:
        if ckpt.path == best.path:
            return metrics
    return result.metrics or {}


def _plain(obj) -> dict:
    from pipeline.config import to_dict
    return to_dict(obj)
