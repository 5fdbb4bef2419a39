"""Reading a cache: the shard sets that hold the wanted quantities, checked row for row, as an
Arrow table (tests, notebooks) or shard by shard (training, `train_data`); `collate_teacher` turns Arrow rows
into padded `t_*` tensors.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.batching import list_lengths, pad_tokens
from pipeline.cache import store
from pipeline.cache.schema import INPUT_COLUMNS, batch_key, parse_quantity, quantity_of
from pipeline.cache.store import CacheError, ShardSet


def plan_sets(root: str, key: str, quantities: list[str]) -> list[tuple[ShardSet, list[str]]]:
    """Which committed set provides each quantity; a clear error for what no set holds."""
    sets = store.committed_sets(root, key)
    chosen: dict[str, tuple[ShardSet, list[str]]] = {}
    missing = []
    for q in quantities:
        parse_quantity(q)
        st = next((s for s in sets if q in s.quantities), None)
        if st is None:
            missing.append(q)
        else:
            chosen.setdefault(st.set_id, (st, []))[1].append(q)
    if missing:
        cached = sorted({q for s in sets for q in s.quantities}) or "nothing"
        raise CacheError(
            f"cache {key} under {root} lacks {missing}; it holds {cached}. Add them with "
            f"`python -m jobs.cache <same config> {_override_hint(missing)}` (only the new "
            "quantities are computed) or let `python -m jobs.pipeline` compute what a recipe needs")
    plan = list(chosen.values())
    cuts = {(len(st.manifest["shards"]), st.manifest["rows_per_shard"]) for st, _ in plan}
    if len(cuts) > 1:
        raise CacheError(f"cache {key} under {root}: shard sets {[st.set_id for st, _ in plan]} are "
                         f"cut into different shards {sorted(cuts)} and cannot be read together; "
                         f"delete the cache (`python -m jobs.cache --delete {key}`) and rebuild")
    return plan


def _override_hint(missing: list[str]) -> str:
    parts = {"hidden": [], "attn": [], "qkv": []}
    flags = []
    for q in missing:
        kind, layer = parse_quantity(q)
        if layer is None:
            flags.append(f"cache.{kind}=true")
        else:
            parts[kind].append(layer)
    flags += [f"cache.{k}_layers=[{','.join(map(str, v))}]" for k, v in parts.items() if v]
    return " ".join(flags)


def columns_of(plan: list[tuple[ShardSet, list[str]]]) -> dict[str, dict]:
    """Cached column name -> {kind, dim, dtype} for the planned quantities."""
    out = {}
    for st, qs in plan:
        for name, col in st.columns.items():
            if quantity_of(name) in qs:
                out[name] = col
    return out


def read_shard(root: str, key: str, st: ShardSet, index: int, columns: list[str]) -> pa.Table:
    """One shard of one set, checksum-verified; names the shard when it is missing or corrupt."""
    fs, base = store.filesystem(root)
    info = st.manifest["shards"][index]
    path = store.join(base, key, st.set_id, info["file"])
    fix = (f"check the whole cache with `python -m jobs.cache cache.root={root} --verify {key}`, "
           f"then `--delete {key}` and rebuild")
    if not store.exists(fs, path):
        raise CacheError(f"{path}: shard missing; {fix}")
    data = store.read_buffer(fs, path)
    if not store.checksum_matches(data, info):
        raise CacheError(f"{path}: checksum mismatch (corrupt shard); {fix}")
    return pq.read_table(pa.BufferReader(data), columns=columns)  # columns may point into `data`


def load_shard(root: str, key: str, plan: list[tuple[ShardSet, list[str]]], index: int) -> pa.Table:
    """Shard `index` with the input columns and every planned set's columns, aligned by row."""
    cols = columns_of(plan)
    table = None
    for st, _ in plan:
        mine = [c for c in st.columns if c in cols]
        mine += [f"{c}_scale" for c in mine if st.columns[c]["dtype"] == "int8"]
        part = read_shard(root, key, st, index, list(INPUT_COLUMNS) + mine)
        if table is None:
            table = part
            continue
        if not table.column("example_id").equals(part.column("example_id")):
            raise CacheError(f"cache {key}: set {st.set_id} shard {index} is not aligned with "
                             "the other sets (example_id differs); rebuild the cache")
        for c in mine:
            table = table.append_column(c, part.column(c))
    return table


def read_cache(root: str, key: str, quantities: list[str]) -> pa.Table:
    """The whole cache as one Arrow table (rows in cache order: sorted by length)."""
    plan = plan_sets(root, key, quantities)
    n = len(plan[0][0].manifest["shards"]) if plan else 0
    return pa.concat_tables([load_shard(root, key, plan, i) for i in range(n)])


def collate_teacher(table: pa.Table, columns: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Cached columns -> `t_<name>` tensors; token-level ones padded to [B, T, d] in their stored
    float dtype (fp16: numpy's fp16 -> fp32 conversion is scalar and would cost the reading
    thread ~2 ms per batch; the losses upcast in torch), int8 ones dequantized to fp32."""
    lengths = list_lengths(table.column("input_ids"))
    out = {}
    for name, col in columns.items():
        if name not in table.column_names:
            continue
        if col["kind"] == "vector":
            flat = pad_tokens(table.column(name), np.full(len(table), 1), width=col["dim"])
            out[batch_key(name)] = torch.from_numpy(flat.reshape(len(table), col["dim"]).astype(np.float32))
            continue
        x = pad_tokens(table.column(name), lengths, width=col["dim"], dtype=np.dtype(col["dtype"]))
        if col["dtype"] == "int8":
            scale = pad_tokens(table.column(f"{name}_scale"), lengths)
            x = x.astype(np.float32) * scale.astype(np.float32)[..., None]
        out[batch_key(name)] = torch.from_numpy(x)
    return out
