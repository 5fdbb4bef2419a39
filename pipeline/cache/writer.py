"""The cache job: Ray Data runs teacher actors over length-sorted shards and writes Parquet.

Each shard is a fixed slice of the length-sorted rows. An actor (teacher loaded once) takes
one shard id, computes its columns, writes `shard-<i>-<sha8>.parquet` atomically, then a
marker. A rerun skips shards with markers (resume after a crash); `manifest.json` is written
last by the driver, so a cache is never visible before it is complete.

One Ray Data job serves every cache a run is missing (train and dev splits, every task) that
share the same teacher(s): each item is a (cache, shard) pair, so the actors load the teacher
once, not once per split.

Each actor takes two shards at a time on two threads, and every teacher forward runs on one
dedicated thread: while one call streams shard i to storage (Parquet encoding, hashing and writing
release the GIL), the teacher thread already computes shard i+1, so the teacher (GPU or CPU) never
waits for storage. One thread, not a lock around the forward: torch keeps an OpenMP team per
calling thread, and alternating between two callers cost the shard phase ~12% on CPU.
"""
from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache import key as ckey
from pipeline.cache import store
from pipeline.cache.schema import SCHEMA_VERSION, Column, columns_for


def parquet_options(table: pa.Table) -> dict:
    """Token tensors (fp16/int8 bytes) are stored uncompressed: zstd saved only ~17% on them but
    took longer than the teacher's own forward on a shard; every other column is zstd. Nor do
    they get min/max statistics (nothing filters on tensor bytes): that cut a 367 MiB shard's
    encoding from 0.28 to 0.19 s."""
    tensors = {f.name for f in table.schema if pa.types.is_large_binary(f.type)}
    return {"use_dictionary": False,
            "compression": {f.name: "none" if f.name in tensors else "zstd" for f in table.schema},
            "write_statistics": [f.name for f in table.schema if f.name not in tensors]}


SHARD_FIELDS = ("index", "file", "rows", "bytes", "checksum")  # a shard's entry in the manifest


def shard_entry(marker: dict) -> dict:
    """A shard's manifest entry from its marker (markers of older runs carry `sha256`)."""
    return {k: _plain(marker[k]) for k in (*SHARD_FIELDS, "sha256") if k in marker}


@dataclass
class ShardJob:
    """One cache key's new shard set: its rows (length-sorted, tokenized by a Ray task that runs
    while the cache job's actors start), columns and what is left to do."""
    key: str
    set_id: str
    task: str
    quantities: list[str]
    table_ref: Any  # ray.ObjectRef of the length-sorted tokenized pa.Table
    rows: int
    columns: list[Column]
    rows_per_shard: int
    done: dict[int, dict]  # shard index -> marker of a shard already written (resume)

    @property
    def n_shards(self) -> int:
        return -(-self.rows // self.rows_per_shard)

    @property
    def todo(self) -> list[int]:
        return [i for i in range(self.n_shards) if i not in self.done]


class ShardWriter:
    """Ray Data actor: loads the teacher(s) once, then writes whole shards of any of the jobs
    (cache keys) it was given, so one actor pool serves every split and task of a run."""

    def __init__(self, jobs: list[dict], teacher_paths: list[str], root: str, batch_size: int,
                 num_threads: int, bf16: bool, use_gpu: bool):
        import ray
        import torch

        from pipeline.encoder import EncoderClassifier
        from pipeline.evaluate import bf16_supported

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.members = [EncoderClassifier.load(p).to(self.device).eval() for p in teacher_paths]
        self.amp = bf16 and bf16_supported(self.device)
        tables = ray.get([j["table_ref"][0] for j in jobs])  # zero-copy from the object store
        self.jobs = [{**j, "table": t, "columns": [Column(**c) for c in j["columns"]]}
                     for j, t in zip(jobs, tables)]
        self.root, self.batch_size = root, batch_size
        # every teacher forward runs on this one thread, one shard at a time (see module doc)
        self.teacher_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [{**self.write_shard(self.jobs[int(j)], int(i)), "job": int(j)}
               for j, i in zip(batch["job"], batch["shard"])]
        return {k: np.array([o[k] for o in out]) for k in out[0]}

    def write_shard(self, job: dict, index: int) -> dict:
        from pipeline.cache.compute import teacher_columns

        table, per_shard = job["table"], job["rows_per_shard"]
        rows = table.slice(index * per_shard, per_shard)

        def forward():  # on the teacher thread
            return time.perf_counter(), time.time(), teacher_columns(
                self.members, rows, job["task"], job["columns"], self.batch_size, self.device, self.amp)

        t0, started, result = self.teacher_thread.submit(forward).result()
        fs, base = store.filesystem(self.root)
        folder = store.join(base, job["key"], job["set_id"])
        name, size, digest = store.write_hashed(
            fs, folder, lambda sink: pq.write_table(result, sink, **parquet_options(result)),
            lambda digest: f"shard-{index:05d}-{digest.partition(':')[2][:8]}.parquet")
        marker = {"index": index, "file": name, "rows": len(rows), "bytes": size, "checksum": digest,
                  "rows_per_shard": per_shard, "started": started, "finished": time.time()}
        store.write_json(fs, store.join(folder, f"shard-{index:05d}.json"), marker)
        secs = time.perf_counter() - t0  # from the teacher's start on this shard to its marker
        print(f"[raykd cache] {job['key']} shard {index + 1}/{-(-len(table) // per_shard)}: {len(rows)} rows, "
              f"{size / 2**20:.1f} MiB in {secs:.1f} s ({len(rows) / secs:.0f} ex/s)", flush=True)
        return {**marker, "seconds": secs}


def done_markers(root: str, key: str, set_id: str, n_shards: int, rows_per_shard: int) -> dict[int, dict]:
    """Shards already written by an earlier (possibly killed) run, checked to exist.

    A marker counts only if it was cut with the same rows_per_shard: shard i of another
    run holds other rows, and reusing it would silently drop and duplicate examples.
    """
    fs, base = store.filesystem(root)
    done = {}
    for i in range(n_shards):
        path = store.join(base, key, set_id, f"shard-{i:05d}.json")
        if store.exists(fs, path):
            marker = store.read_json(fs, path)
            if (marker.get("rows_per_shard") == rows_per_shard
                    and store.exists(fs, store.join(base, key, set_id, marker["file"]))):
                done[i] = marker
    return done


def shard_rows(root: str, key: str, wanted: int) -> int:
    """rows_per_shard of the key's committed sets (a new set must cut the same shards to stay
    aligned row for row with them), else `wanted`."""
    sets = store.committed_sets(root, key)
    return sets[0].manifest["rows_per_shard"] if sets else wanted


TOKENIZE_HERE_ROWS = 10_000  # MRPC, RTE, CoLA, STS-B train and every dev split


def sorted_by_length(frame, tokenizer_path: str, max_len: int) -> pa.Table:
    """The rows of `frame` tokenized and sorted by token count (stable: a rerun cuts the same
    shards). `plan_job` runs it in the driver for a small split, else as a Ray task that
    overlaps the actors' start-up."""
    from transformers import AutoTokenizer

    from pipeline import data
    from pipeline.batching import list_lengths

    table = data.tokenize_frame(frame, AutoTokenizer.from_pretrained(tokenizer_path), max_len)
    return table.take(pa.array(np.argsort(list_lengths(table.column("input_ids")), kind="stable")))


def plan_job(frame, tokenizer_path: str, max_len: int, fields: dict, quantities: list[str], width: int,
             num_outputs: int, n_members: int, cache_cfg) -> ShardJob:
    """The shard set holding `quantities` for this key: rows sorted by length and cut into
    shards; shards an earlier (killed) run finished are marked done. The rows are tokenized
    by a Ray task (no CPU reserved: it runs beside whatever holds the CPUs) started here; the
    actors take its result after loading the teacher, so ~2 s of tokenizing a 67k-row split
    no longer delays the first shard. A small split (at most TOKENIZE_HERE_ROWS rows) is
    tokenized here instead: starting the task's process costs more than the work."""
    import ray

    key = ckey.cache_key(fields)
    sid = ckey.set_id(quantities, cache_cfg.dtype)
    fs, base = store.filesystem(cache_cfg.root)
    if not store.exists(fs, store.join(base, key, store.KEY_FILE)):
        store.write_json(fs, store.join(base, key, store.KEY_FILE), fields)
    columns = [c for q in quantities for c in columns_for(q, width, num_outputs, n_members, cache_cfg.dtype)]
    if len(frame) <= TOKENIZE_HERE_ROWS:  # ~0.1 s here; a task's new process would import for ~4 s
        table_ref = ray.put(sorted_by_length(frame, tokenizer_path, max_len))
    else:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)  # has the files
        table_ref = ray.remote(sorted_by_length).options(num_cpus=0, scheduling_strategy=here).remote(
            frame, tokenizer_path, max_len)
    rows_per_shard = shard_rows(cache_cfg.root, key, cache_cfg.rows_per_shard)
    n_shards = -(-len(frame) // rows_per_shard)
    job = ShardJob(key, sid, fields["task"], list(quantities), table_ref, len(frame), columns,
                   rows_per_shard, done_markers(cache_cfg.root, key, sid, n_shards, rows_per_shard))
    print(f"[raykd cache] {key}: {len(frame)} rows, {n_shards} shards of {rows_per_shard} rows "
          f"({len(job.done)} already done), quantities {quantities}", flush=True)
    return job


def run_cache_jobs(jobs: list[ShardJob], teacher_paths: list[str], cache_cfg, *, bf16: bool = True,
                   use_gpu: bool = False) -> None:
    """Compute every job's missing shards in ONE Ray Data job (one actor pool, the teacher loaded
    once per actor, whatever the number of splits and tasks), then commit each job's manifest."""
    import ray

    todo = [{"job": j, "shard": i} for j, job in enumerate(jobs) for i in job.todo]
    computed = [len(job.todo) for job in jobs]
    t0 = time.perf_counter()
    if todo:
        gpus = 1 if use_gpu else 0
        cpus = actor_cpus(cache_cfg.concurrency)
        cpus = min(cpus, int(ray.available_resources().get("CPU", cpus)) or 1)
        specs = [{"table_ref": [job.table_ref], "task": job.task, "key": job.key, "set_id": job.set_id,
                  "columns": [c.__dict__ for c in job.columns], "rows_per_shard": job.rows_per_shard}
                 for job in jobs]
        if len(jobs) > 1:
            print(f"[raykd cache] one cache job for {len(todo)} shards of {len(jobs)} caches", flush=True)
        results = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            ShardWriter, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=cache_cfg.concurrency, max_concurrent_calls_per_actor=2,
                                               enable_true_multi_threading=True),
            num_cpus=0 if gpus else cpus, num_gpus=gpus,
            fn_constructor_kwargs=dict(
                jobs=specs, teacher_paths=teacher_paths, root=cache_cfg.root,
                batch_size=cache_cfg.batch_size, num_threads=0 if gpus else cpus, bf16=bf16,
                use_gpu=use_gpu),
        ).take_all()
        for r in results:
            jobs[int(r.pop("job"))].done[int(r["index"])] = r  # the manifest takes its entry, as from a marker
    secs = time.perf_counter() - t0
    for job, n in zip(jobs, computed):
        commit(job, cache_cfg, secs, n)


def commit(job: ShardJob, cache_cfg, secs: float, computed: int) -> None:
    """Write the job's manifest: the set becomes visible, complete, only now."""
    import ray

    manifest = {
        "schema_version": SCHEMA_VERSION, "key": job.key, "set_id": job.set_id,
        "quantities": job.quantities, "dtype": cache_cfg.dtype, "rows": job.rows,
        "rows_per_shard": job.rows_per_shard, "columns": {c.name: c.__dict__ for c in job.columns},
        "shards": [shard_entry(job.done[i]) for i in range(job.n_shards)],
        "created": {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
                    "seconds": round(secs, 2), "shards_computed": computed,
                    "ray": ray.__version__, "pid": os.getpid()},
    }
    fs, base = store.filesystem(cache_cfg.root)
    store.write_json(fs, store.join(base, job.key, job.set_id, store.MANIFEST), manifest)


def actor_cpus(concurrency: int) -> int:
    """CPUs per teacher actor: an even share of the cluster's, capped at the largest node's
    (an actor lives on one node; asking for more than any node has hangs the job)."""
    import ray

    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
    return max(1, min(int(ray.cluster_resources().get("CPU", 1)) // concurrency, int(largest)))


def _plain(v):
    return v.item() if hasattr(v, "item") else v


