"""Teacher-output cache benchmark, side by side in one run:

1. cache job (Ray Data, teacher actor) vs a plain single-process PyTorch loop running the same
   teacher over the same length-sorted batches in the same dtype (target >= 0.85x);
   examples/s and the fraction of the machine's measured matmul peak (bf16 where native);
2. bytes per example per quantity, and the MLKD 3-layer spec total vs naive fp32 storage
   padded to max_len (target <= 0.3x with fp16; int8 lower);
3. read throughput of the cache into padded training batches (the workers' own reader) vs the student's training
   throughput (target >= 10x).

  python -m benchmarks.bench_cache --teacher runs/sst2_default/teacher/sst2 [--rows 0]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import data, models
from pipeline.batching import length_sorted_batches, list_lengths
from pipeline.cache import store
from pipeline.cache.build import ensure_cache, run_fields
from pipeline.cache.compute import teacher_columns
from pipeline.cache.reader import collate_teacher, columns_of, plan_sets
from pipeline.cache.schema import columns_for
from pipeline.cache.writer import parquet_options
from pipeline.config import load
from pipeline.encoder import EncoderClassifier
from pipeline.evaluate import fast_precision
from pipeline.ray_runtime import init_ray
from pipeline.train_data import cache_source, table_batches, worker_batches

MLKD3 = ["logits", "cls", "embeddings", "hidden_2", "hidden_4", "hidden_6", "attn_2", "attn_4", "attn_6"]


def peak_gflops(n: int = 2048, reps: int = 10) -> float:
    """Matmul peak at the precision the jobs run in here (bf16 where native, else fp32)."""
    dtype = torch.bfloat16 if fast_precision() == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def plain_teacher_loop(teacher: Path, table, quantities, cfg, write_to: str = "") -> float:
    """Examples/s of the teacher over the length-sorted shards in one process; with `write_to`,
    each shard's columns are also written there as Parquet (what a hand-written loop would
    store), else they are dropped (the compute-only bound)."""
    model = EncoderClassifier.load(teacher).eval()
    cols = [c for q in quantities for c in columns_for(q, model.config.hidden_size, 2, 1, "float16")]
    order = np.argsort(list_lengths(table.column("input_ids")), kind="stable")
    sorted_table = table.take(order)
    if write_to:
        os.makedirs(write_to)
    t0 = time.perf_counter()
    for start in range(0, len(sorted_table), cfg.cache.rows_per_shard):
        out = teacher_columns([model], sorted_table.slice(start, cfg.cache.rows_per_shard), "sst2", cols,
                              cfg.cache.batch_size, torch.device("cpu"), fast_precision() == "bf16")
        if write_to:
            pq.write_table(out, f"{write_to}/shard-{start:08d}.parquet", **parquet_options(out))
    if write_to:
        shutil.rmtree(write_to)
    return len(table) / (time.perf_counter() - t0)


def teacher_flops_per_example(teacher: Path, mean_tokens: float) -> float:
    cfg = EncoderClassifier.load(teacher).config
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_token = L * (2 * (4 * d * d + 2 * d * f)) + L * 4 * d * mean_tokens  # matmuls + attention
    return per_token * mean_tokens


def shard_span(root: str, key: str, quantities: list[str]) -> float:
    """Seconds from the first shard's teacher start to the last shard's marker."""
    (st, _), = plan_sets(root, key, quantities)
    fs, base = store.filesystem(root)
    marks = [store.read_json(fs, store.join(base, key, st.set_id, f"shard-{i:05d}.json"))
             for i in range(len(st.manifest["shards"]))]
    return max(m["finished"] for m in marks) - min(m["started"] for m in marks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--rows", type=int, default=0, help="SST-2 train rows (0 = all 67,349)")
    ap.add_argument("--repeat", type=int, default=2, help="plain loop / cache job pairs, run in turn")
    ap.add_argument("--student-ex-s", type=float, default=0.0,
                    help="student training examples/s to compare reading against (0 = measure)")
    ap.add_argument("--root", default="", help="parent folder of the benchmark's cache (default: the "
                    "system's temporary folder; /dev/shm leaves the disk's write cost out)")
    ap.add_argument("--with-writes", action="store_true",
                    help="also time a plain loop that writes its shards as Parquet to the same disk")
    args = ap.parse_args()
    teacher = Path(args.teacher)
    root = tempfile.mkdtemp(prefix="bench_cache_", dir=args.root or None)
    cfg = load(None, [f"cache.root={root}", f"teacher.path={teacher}", f"data.train_limit={args.rows}"])
    init_ray(cfg.ray)
    fields, frame = run_fields(cfg, [teacher], "sst2", "train")
    from transformers import AutoTokenizer
    table = data.tokenize_frame(frame, AutoTokenizer.from_pretrained(str(teacher)), cfg.data.max_len)
    lengths = list_lengths(table.column("input_ids"))
    print(f"SST-2 train rows: {len(table)}, mean tokens {lengths.mean():.1f}, max_len {cfg.data.max_len}")

    peak = peak_gflops()
    rounds = []  # this shared 2-core VM varies ~10% run to run: pairs, side by side
    for r in range(args.repeat):
        plain, writes = plain_teacher_loop(teacher, table, MLKD3, cfg), 0.0
        if args.with_writes:
            writes = plain_teacher_loop(teacher, table, MLKD3, cfg, write_to=f"{root}_plain")
            print(f"round {r + 1}: plain loop writing Parquet shards {writes:.1f} ex/s ({writes / plain:.3f}x of "
                  "the compute-only loop)", flush=True)
        t0 = time.perf_counter()
        key = ensure_cache(cfg, [teacher], "sst2", "train", MLKD3)
        job = len(table) / (time.perf_counter() - t0)
        steady = len(table) / shard_span(root, key, MLKD3)
        rounds.append((plain, job, steady))
        print(f"round {r + 1}: plain {plain:.1f} ex/s, job {job:.1f} ex/s end to end ({job / plain:.3f}x), "
              f"{steady:.1f} ex/s from first shard start to last shard end ({steady / plain:.3f}x)"
              + (f"; job / plain loop writing Parquet {job / writes:.3f}x" if writes else ""), flush=True)
        if r + 1 < args.repeat:
            store.delete(root, key)
    plain, job, steady = (float(np.median([x[i] for x in rounds])) for i in range(3))
    flops = teacher_flops_per_example(teacher, lengths.mean())
    print(f"\n== cache job vs plain loop (same teacher, batches, {fast_precision()}; median of {len(rounds)}) ==")
    print(f"plain PyTorch loop : {plain:8.1f} examples/s")
    print(f"Ray Data cache job : {job:8.1f} examples/s (end to end, incl. start-up and writes)")
    print(f"ratio              : {job / plain:8.3f}x (target >= 0.85x); per round "
          + ", ".join(f"{j / p:.3f}x" for p, j, _ in rounds))
    print(f"shard phase only   : {steady:8.1f} examples/s = {steady / plain:.3f}x (first shard's start to last "
          "shard's marker: leaves out the teacher actor's process start and model load)")
    print(f"{fast_precision()} matmul peak   : {peak:8.1f} GFLOP/s; cache job reaches {job * flops / 1e9 / peak * 100:.1f}%"
          f" of it ({job * flops / 1e9:.1f} GFLOP/s of teacher matmuls)")

    sets = plan_sets(root, key, MLKD3)
    manifest = sets[0][0].manifest
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    d = EncoderClassifier.load(teacher).config.hidden_size
    token_q = [q for q in MLKD3 if q not in ("logits", "cls")]
    naive = len(table) * (cfg.data.max_len * d * 4 * len(token_q) + (d + 2) * 4)
    print("\n== storage (MLKD 3-layer spec) ==")
    per_q = {q: lengths.mean() * d * 2 for q in token_q} | {"cls": d * 2, "logits": 2 * 2 * 4}
    for q, b in per_q.items():
        print(f"  {q:11s} {b / 1024:8.2f} KiB/example (raw fp16, real tokens only)")
    print(f"on disk (fp16)        : {total_bytes / 2**20:9.1f} MiB = {total_bytes / len(table) / 1024:.1f} KiB/example")
    print(f"naive fp32 padded     : {naive / 2**20:9.1f} MiB; ratio {total_bytes / naive:.3f}x (target <= 0.3x)")
    root8 = root + "_int8"  # a cached fp16 set would be reused whatever cache.dtype says
    cfg8 = load(None, [f"cache.root={root8}", f"teacher.path={teacher}", f"data.train_limit={args.rows}",
                       "cache.dtype=int8"])
    key8 = ensure_cache(cfg8, [teacher], "sst2", "train", token_q[:1])
    m8 = plan_sets(root8, key8, token_q[:1])[0][0].manifest
    fp16_one = sum(s["bytes"] for s in plan_sets(root, key, token_q[:1])[0][0].manifest["shards"])
    int8_one = sum(s["bytes"] for s in m8["shards"])
    print(f"one quantity (embeddings) incl. inputs: int8 + per-token scale {int8_one / 2**20:.1f} MiB "
          f"({int8_one / len(table) / 1024:.1f} KiB/example); the fp16 set with all quantities: "
          f"{fp16_one / 2**20:.1f} MiB")
    store.delete(root8, key8)

    print("\n== reading into padded training batches ==")
    cols = columns_of(sets)
    t0, n = time.perf_counter(), 0
    for batch in worker_batches(cache_source(root, key, MLKD3), 0, 1, 32, seed=0):  # the loop's path
        collate_teacher(batch, cols)
        n += len(batch)
    read_rate = n / (time.perf_counter() - t0)
    student = args.student_ex_s or measure_student(teacher, table)
    print(f"cache read + collate : {read_rate:8.1f} examples/s (one process)")
    print(f"student training     : {student:8.1f} examples/s (3 layers x 384, {fast_precision()}, hard-label step)")
    print(f"ratio                : {read_rate / student:8.1f}x (target >= 10x)")
    json.dump({"plain": plain, "job": job, "steady": steady, "rounds": rounds, "bytes": total_bytes, "naive": naive, "read": read_rate,
               "student": student}, open(Path(root) / "bench.json", "w"))
    store.delete(root, key)


def measure_student(teacher: Path, table) -> float:
    from pipeline.config import StudentConfig
    from pipeline.batching import collate_inputs
    student = models.transformer_student(StudentConfig(), str(teacher), {"sst2": 2}).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)
    t0, n = time.perf_counter(), 0
    for rows in table_batches(table.slice(0, 1600), 0, 1, 32, seed=0):  # the loop's batches
        b = collate_inputs(rows)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast_precision() == "bf16"):
            f = student(b["input_ids"], b["attention_mask"], b["token_type_ids"], "sst2")
            loss = torch.nn.functional.cross_entropy(f.logits.float(), b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(rows)
    return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
