"""Ray Train overhead: teacher fine-tuning throughput, 1 Ray Train worker vs a plain
single-process PyTorch loop, same model, same batches (SST-2 train rows), same dtype.

  python -m benchmarks.bench_train [--rows 3200] [--batch 32]
Prints examples/s of both and the ratio (target >= 0.9x). Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch
from transformers import AutoTokenizer

from pipeline import data, models
from pipeline.batching import collate_inputs
from pipeline.config import load
from pipeline.evaluate import fast_precision
from pipeline.ray_runtime import init_ray
from pipeline.teacher import base_model_path, train_teachers
from pipeline.train_data import table_batches


def plain_loop(cfg, table, batch: int) -> float:
    """The same work as the Ray loop (hard CE, AdamW fused, warmup/decay, clipping, bf16 where native)."""
    base = base_model_path(cfg)
    model = models.build({"kind": "pretrained", "path": base}, {"sst2": 2}).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.teacher.optim.lr, weight_decay=0.01, fused=True)
    torch.manual_seed(0)
    t0, n = time.perf_counter(), 0
    for rows in table_batches(table, 0, 1, batch, cfg.run.seed):  # the Ray worker's batches
        b = collate_inputs(rows)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast_precision() == "bf16"):
            f = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], "sst2")
            loss = torch.nn.functional.cross_entropy(f.logits.float(), b["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        n += len(b["labels"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=3200)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="bench_train_")
    cfg = load(None, [f"data.train_limit={args.rows}", "data.dev_limit=64", "teacher.optim.epochs=1",
                      f"teacher.optim.batch_size={args.batch}", f"run.output_dir={out}", "run.name=bench"])
    tok = AutoTokenizer.from_pretrained(base_model_path(cfg))
    table = data.load_tokenized(cfg.data, "sst2", "train", tok)
    torch.set_num_threads(torch.get_num_threads())
    plain = plain_loop(cfg, table, args.batch)
    init_ray(cfg.ray)
    folders = train_teachers(cfg)
    import json
    ray_rate = json.loads((folders["sst2"][0] / "metrics.json").read_text())["train_examples_per_s"]
    print(f"rows={args.rows} batch={args.batch} {fast_precision()}, {torch.get_num_threads()} threads")
    print(f"plain PyTorch loop : {plain:8.1f} examples/s")
    print(f"Ray Train, 1 worker: {ray_rate:8.1f} examples/s")
    print(f"ratio Ray/plain    : {ray_rate / plain:8.3f}x  (target >= 0.9x)")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
