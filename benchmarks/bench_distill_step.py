"""Where a distillation step's time goes, in one process, on batches collated beforehand (no
reading, no Ray Train): per batch, the student forward, the loss terms and the backward with the
optimizer step, for the hard-label step, KD, KD plus each MLKD loss, and all of them together.

  python -m benchmarks.bench_distill_step --teacher runs/sst2_default/teacher/sst2 [--student 2x192]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks.bench_distill import LOSSES, STUDENTS
from pipeline import models
from pipeline.cache.build import ensure_cache
from pipeline.cache.reader import columns_of
from pipeline.config import StageConfig, load, to_dict
from pipeline.distill import Trainee, _collate
from pipeline.evaluate import fast_precision
from pipeline.objective import build_projections, compute_loss, make_plan, teacher_quantities
from pipeline.ray_runtime import init_ray
from pipeline.teacher import base_model_path
from pipeline.train_data import cache_source, worker_batches


def step_times(cfg, losses: dict[str, float], batches, teacher_layers: int, teacher_width: int):
    """(examples/s, forward ms, loss ms, backward + step ms) per batch, second pass (warm)."""
    stage = StageConfig(name="s", losses=losses)
    spec = {"kind": "student", "student": to_dict(cfg.student), "source": base_model_path(cfg), "pair_tasks": []}
    model = models.build(spec, {"sst2": 2}).train()
    plan = make_plan(stage, cfg.student.layers, teacher_layers)
    net = Trainee(model, build_projections(stage, plan, cfg.student.hidden, teacher_width), stage, plan)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    for _ in range(2):  # the first pass warms up; the second is timed
        t_fwd = t_loss = t_bwd = 0.0
        n = 0
        for b in batches:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast_precision() == "bf16"):
                feats = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], "sst2", plan.student)
                t1 = time.perf_counter()
                with torch.autocast("cpu", enabled=False):  # as the loop: losses in fp32
                    loss, _ = compute_loss(stage, plan, feats, b, net.proj, "classification",
                                           models.num_heads(model))
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t3 = time.perf_counter()
            t_fwd, t_loss, t_bwd, n = t_fwd + t1 - t0, t_loss + t2 - t1, t_bwd + t3 - t2, n + len(b["labels"])
    k = 1e3 / len(batches)
    return n / (t_fwd + t_loss + t_bwd), t_fwd * k, t_loss * k, t_bwd * k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", default="2x192", choices=list(STUDENTS))
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--cache-root", default="", help="default: a temporary folder")
    args = ap.parse_args()
    root = args.cache_root or tempfile.mkdtemp(prefix="bench_step_")
    stage = f"distill.stages=[{{name: s, losses: {LOSSES}}}]"  # the MLKD stage-1 + KD of bench_distill
    cfg = load(None, [f"teacher.path={args.teacher}", f"cache.root={root}", f"data.train_limit={args.rows}",
                      *STUDENTS[args.student], stage])
    from transformers import AutoConfig

    t_cfg = AutoConfig.from_pretrained(args.teacher)
    quantities = teacher_quantities(make_plan(cfg.distill.stages[0], cfg.student.layers, t_cfg.num_hidden_layers))
    init_ray(cfg.ray)
    key = ensure_cache(cfg, [args.teacher], "sst2", "train", quantities)
    source = cache_source(cfg.cache.root, key, quantities)
    columns = columns_of(source.sets())
    batches = [_collate(t, columns) for t in worker_batches(source, 0, 1, 32, cfg.run.seed)]
    print(f"student {args.student}, {len(batches)} batches of 32, torch threads {torch.get_num_threads()}")
    every = dict(cfg.distill.stages[0].losses)
    extra = [{"kd": 1.0, k: v} for k, v in every.items() if k != "kd"]
    step_times(cfg, {"kd": 1.0}, batches, t_cfg.num_hidden_layers, t_cfg.hidden_size)  # the process's first-time costs
    base = None  # KD's time: every variant has a loss on the logits, so its backward runs through the whole student
    for losses in ({"kd": 1.0}, {"hard": 1.0}, *extra, every):
        rate, fwd, loss, bwd = step_times(cfg, losses, batches, t_cfg.num_hidden_layers, t_cfg.hidden_size)
        total = fwd + loss + bwd
        base = base or total
        print(f"{'+'.join(losses):45s} {rate:7.0f} ex/s; ms per batch: forward {fwd:5.1f}, losses {loss:4.1f}, "
              f"backward + step {bwd:5.1f} = {total:5.1f} ({total - base:+.1f} vs kd)")


if __name__ == "__main__":
    main()
