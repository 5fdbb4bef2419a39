"""Find-or-build: the cache a run needs, computing only the quantities not yet cached.

Looking a cache up reads the teacher folder's metadata and tokenizer files only; the teacher
model is loaded by the cache job's actors, and only when something is missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from pipeline import data
from pipeline.cache import key as ckey
from pipeline.cache import store
from pipeline.cache.writer import plan_job, run_cache_jobs
from pipeline.config import Config
from pipeline.encoder import read_meta


def run_fields(cfg: Config, teachers: list[Path], task: str, split: str):
    """(key fields, data frame, tokenizer) for a (teacher, task, split) of this config."""
    metas = [read_meta(t) for t in teachers]
    frame = data.load_frame(cfg.data, task, split)
    fields = ckey.key_fields([{"path": t, "fingerprint": m["fingerprint"]} for t, m in zip(teachers, metas)],
                             ckey.tokenizer_hash(teachers[0]), cfg.data.max_len, task, split, frame)
    return fields, frame


def cached_quantities(root: str, key: str) -> set[str]:
    return {q for st in store.committed_sets(root, key) for q in st.quantities}


@dataclass(frozen=True)
class CacheRequest:
    """What a run needs cached: the quantities of one (teacher(s), task, split)."""
    teachers: tuple[Path, ...]
    task: str
    split: str
    quantities: tuple[str, ...]


def request(teachers, task: str, split: str, quantities) -> CacheRequest:
    return CacheRequest(tuple(Path(t) for t in teachers), task, split, tuple(quantities))


def ensure_cache(cfg: Config, teachers: list[Path], task: str, split: str,
                 quantities: list[str]) -> str:
    """The key of a cache holding `quantities`; writes a new shard set for what is missing."""
    return ensure_caches(cfg, [request(teachers, task, split, quantities)])[0]


def ensure_caches(cfg: Config, requests: list[CacheRequest]) -> list[str]:
    """Each request's cache key, in order. Everything missing is computed by one cache job per
    teacher (or ensemble): its actors load the teacher once for all the splits and tasks."""
    keys, missing = plan_caches(cfg, requests)
    build_missing(cfg, missing)
    return keys


def plan_caches(cfg: Config, requests: list[CacheRequest]) -> tuple[list[str], dict]:
    """(each request's key, what is missing): teachers -> {key: (fields, frame, quantities, task)},
    one shard set per key (the same cache asked for twice gets both requests' quantities)."""
    keys, missing = [], {}
    for r in requests:
        fields, frame = run_fields(cfg, list(r.teachers), r.task, r.split)
        key = ckey.cache_key(fields)
        keys.append(key)
        have = cached_quantities(cfg.cache.root, key)
        if have:
            ckey.check_fields(cfg.cache.root, key, fields)
        planned = missing.get(r.teachers, {}).get(key)
        wanted = [*planned[2], *r.quantities] if planned else r.quantities
        todo = [q for q in dict.fromkeys(wanted) if q not in have]
        if not todo:
            print(f"[raykd cache] {key}: reusing cached {sorted(have)} (teacher not loaded)", flush=True)
            continue
        if have and not planned:
            print(f"[raykd cache] {key}: has {sorted(have)}; adding {todo}", flush=True)
        missing.setdefault(r.teachers, {})[key] = (fields, frame, todo, r.task)
    return keys, missing


def build_missing(cfg: Config, missing: dict) -> int:
    """Write what `plan_caches` found missing, one cache job per teacher; returns the number of
    shard sets written."""
    for teachers, planned in missing.items():
        first = str(teachers[0])
        width = AutoConfig.from_pretrained(first).hidden_size
        shard_jobs = []
        for fields, frame, quantities, task in planned.values():
            if task == data.UNLABELED:  # logits of unlabeled text come from the teacher's first head
                num_outputs = next(iter(read_meta(teachers[0])["tasks"].values()))
            else:
                num_outputs = data.task_of(cfg.data, task).num_outputs
            shard_jobs.append(plan_job(frame, first, cfg.data.max_len, fields, quantities, width, num_outputs,
                                       len(teachers), cfg.cache))
        run_cache_jobs(shard_jobs, [str(t) for t in teachers], cfg.cache, use_gpu=cfg.ray.use_gpu)
    return sum(len(planned) for planned in missing.values())
