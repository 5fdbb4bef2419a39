"""The teacher-output cache schema (version 2) — the one place it is defined.

Layout under a root (local path or URI):
    <root>/<key>/key.json                 key fields in readable form (written once)
    <root>/<key>/<set_id>/shard-00000-<sha8>.parquet
    <root>/<key>/<set_id>/shard-00000.json  per-shard marker (file, rows, bytes, checksum, rows_per_shard)
    <root>/<key>/<set_id>/manifest.json     written LAST: the commit point of the shard set

`key` hashes what decides the teacher's outputs: schema version, teacher fingerprint(s),
tokenizer, max_len/truncation, task head, split and the data's content hash. A *shard set*
holds some quantities (its `set_id` hashes them with the storage dtype); adding quantities
later writes a new set, aligned with the others row for row (same shards, same row order,
checked by `example_id`).

Columns of every shard (one row per example; rows sorted by length):
    example_id      int64
    input_ids       list<int32>     real tokens only
    token_type_ids  list<int8>
    label           int64 | float32 (-1 when unlabeled)
    logits          list<float32>   [C] the head's logits (ensemble: mean of members' logits)
    probs           list<float32>   [C] mean of members' softmax (single teacher: its softmax)
    member_logits   list<float32>   [K*C] ensembles only
    cls             list<float16>   [d] final-layer [CLS] vector
  token-level, real tokens only: one large_binary value per row holding its [n_tokens, d]
  values row-major, little-endian float16 (or int8 with dtype int8):
    embeddings, hidden_<l>, attn_<l>, q_<l>, k_<l>, v_<l>
        with dtype int8 also <name>_scale list<float16> [n_tokens]
        (value = int8 * scale, scale = max|x| / 127 per token)
  (Version 1 stored them as list<float16>: Parquet then decodes a repetition level per value,
  4.5x slower to read than one binary value per row.) They are written uncompressed (zstd
  saved ~17% but cost more time than the teacher's forward); the other columns use zstd.
Quantity names in specs: logits, cls, embeddings, hidden_<l>, attn_<l>, qkv_<l> (l 1-based).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SCHEMA_VERSION = 2
INPUT_COLUMNS = ("example_id", "input_ids", "token_type_ids", "label")
_LAYERED = re.compile(r"^(hidden|attn|qkv)_(\d+)$")


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "vector" ([dim] per row) | "token" ([n_tokens, dim] per row)
    dim: int
    dtype: str  # float32 | float16 | int8


def parse_quantity(q: str) -> tuple[str, int | None]:
    if q in ("logits", "cls", "embeddings"):
        return q, None
    m = _LAYERED.match(q)
    if not m:
        raise ValueError(f"unknown cache quantity {q!r}; use logits, cls, embeddings, "
                         "hidden_<layer>, attn_<layer> or qkv_<layer>")
    return m.group(1), int(m.group(2))


def quantity_of(column: str) -> str:
    """The quantity a cached column belongs to (probs -> logits, q_4 -> qkv_4, hidden_2 -> hidden_2)."""
    if column in ("probs", "member_logits"):
        return "logits"
    if column[:2] in ("q_", "k_", "v_"):
        return "qkv_" + column[2:]
    return column


def quantities_of(cache_cfg) -> list[str]:
    """Quantity names asked for by a CacheConfig."""
    out = ["logits"] if cache_cfg.logits else []
    out += ["cls"] if cache_cfg.cls else []
    out += ["embeddings"] if cache_cfg.embeddings else []
    out += [f"hidden_{i}" for i in cache_cfg.hidden_layers]
    out += [f"attn_{i}" for i in cache_cfg.attn_layers]
    out += [f"qkv_{i}" for i in cache_cfg.qkv_layers]
    return out


def columns_for(quantity: str, width: int, num_outputs: int, ensemble: int, dtype: str) -> list[Column]:
    kind, layer = parse_quantity(quantity)
    if kind == "logits":
        cols = [Column("logits", "vector", num_outputs, "float32"),
                Column("probs", "vector", num_outputs, "float32")]
        if ensemble > 1:
            cols.append(Column("member_logits", "vector", num_outputs * ensemble, "float32"))
        return cols
    if kind == "cls":
        return [Column("cls", "vector", width, "float16")]
    names = ["embeddings"] if kind == "embeddings" else (
        [f"{p}_{layer}" for p in "qkv"] if kind == "qkv" else [f"{kind}_{layer}"])
    return [Column(n, "token", width, dtype) for n in names]


def batch_key(column: str) -> str:
    """Name of a cached column in a training batch (the same keys an online teacher gives)."""
    return f"t_{column}"
