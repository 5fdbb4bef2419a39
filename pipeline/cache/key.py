"""The content-addressed cache key: what decides the teacher's outputs, hashed."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from pipeline.cache.schema import SCHEMA_VERSION
from pipeline.cache.store import KEY_FILE, CacheError, exists, filesystem, join, read_json, subdirs

HASHED = ("schema_version", "teacher_fingerprints", "tokenizer", "max_len", "truncation", "task",
          "split", "data_hash")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def data_hash(frame: pd.DataFrame) -> str:
    """sha256 over every row's id, texts and label, in order."""
    h = hashlib.sha256()
    for row in zip(frame["example_id"].tolist(), frame["text_a"].tolist(),
                   frame["text_b"].tolist(), frame["label"].tolist()):
        h.update(("\x1f".join(map(str, row)) + "\x1e").encode("utf-8"))
    return h.hexdigest()[:32]


def tokenizer_hash(folder: str | Path) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            h.update(name.encode() + path.read_bytes())
    return h.hexdigest()[:32]


def key_fields(teachers: list[dict], tokenizer: str, max_len: int, task: str, split: str,
               frame: pd.DataFrame) -> dict:
    """Readable key fields. `teachers`: [{"path", "fingerprint"}] (ensemble members in order)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher_fingerprints": [t["fingerprint"] for t in teachers],
        "teacher_paths": [str(t["path"]) for t in teachers],  # readable only, not hashed
        "tokenizer": tokenizer, "max_len": max_len, "truncation": "longest_first",
        "task": task, "split": split, "data_hash": data_hash(frame), "rows": len(frame),
    }


def cache_key(fields: dict) -> str:
    hashed = {k: fields[k] for k in HASHED}
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:20]
    return f"{fields['task']}-{fields['split']}-{digest}"


def set_id(quantities: list[str], dtype: str) -> str:
    digest = hashlib.sha256(json.dumps([sorted(quantities), dtype]).encode()).hexdigest()[:12]
    return f"set-{digest}"


def explain_miss(root: str, fields: dict) -> str:
    """Why no cache matches: the closest cache for the same task/split and the fields that differ."""
    fs, base = filesystem(root)
    best: tuple[int, str, list[str]] | None = None
    for key in subdirs(fs, base):
        path = join(base, key, KEY_FILE)
        if not exists(fs, path):
            continue
        other = read_json(fs, path)
        if other.get("task") != fields["task"] or other.get("split") != fields["split"]:
            continue
        diff = [f"{k}: cache has {other.get(k)!r}, run has {fields[k]!r}"
                for k in HASHED if other.get(k) != fields[k]]
        if best is None or len(diff) < best[0]:
            best = (len(diff), key, diff)
    if best is None:
        return f"no cache for task {fields['task']} ({fields['split']}) under {root}"
    return f"the closest cache {best[1]} differs in: " + "; ".join(best[2])


def check_fields(root: str, key: str, fields: dict) -> None:
    """Refuse a cache whose recorded key fields differ from the run's (names the field)."""
    fs, base = filesystem(root)
    path = join(base, key, KEY_FILE)
    if not exists(fs, path):
        raise CacheError(f"no cache {key} under {root}: " + explain_miss(root, fields))
    stored = read_json(fs, path)
    diff = [k for k in HASHED if stored.get(k) != fields[k]]
    if diff:
        raise CacheError(f"cache {key} does not match this run; differing fields: " + ", ".join(
            f"{k} (cache {stored.get(k)!r} vs run {fields[k]!r})" for k in diff))
