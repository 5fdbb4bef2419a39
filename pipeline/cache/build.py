"""Find-or-build: the cache a run needs, computing only the quantities not yet cached.

Looking a cache up reads the teacher folder's metadata and tokenizer files only; the teacher
model is loaded by the cache job's actors, and only when something is missing.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from pipeline import data
from pipeline.cache import key as ckey
from pipeline.cache import store
from pipeline.cache.writer import run_cache_job
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


def ensure_cache(cfg: Config, teachers: list[Path], task: str, split: str,
                 quantities: list[str]) -> str:
    """The key of a cache holding `quantities`; writes a new shard set for what is missing."""
    fields, frame = run_fields(cfg, teachers, task, split)
    key = ckey.cache_key(fields)
    have = cached_quantities(cfg.cache.root, key)
    if have:
        ckey.check_fields(cfg.cache.root, key, fields)
    missing = [q for q in dict.fromkeys(quantities) if q not in have]
    if not missing:
        print(f"[raykd cache] {key}: reusing cached {sorted(have)} (teacher not loaded)", flush=True)
        return key
    if have:
        print(f"[raykd cache] {key}: has {sorted(have)}; adding {missing}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(teachers[0]))
    table = data.tokenize_frame(frame, tokenizer, cfg.data.max_len)
    tcfg = AutoConfig.from_pretrained(str(teachers[0]))
    if task == data.UNLABELED:  # logits of unlabeled text come from the teacher's first head
        num_outputs = next(iter(read_meta(teachers[0])["tasks"].values()))
    else:
        num_outputs = data.task_of(cfg.data, task).num_outputs
    run_cache_job(table, fields, missing, [str(t) for t in teachers], task, tcfg.hidden_size,
                  num_outputs, cfg.cache, use_gpu=cfg.ray.use_gpu)
    return key
