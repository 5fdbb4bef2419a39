"""Arrow rows -> padded torch batches, and the order in which batches are taken.

Token-level columns are Arrow list columns holding only real tokens; a batch is padded to its
own longest row (never to max_len). Multi-task training takes one task per batch, tasks drawn
with p(task) ∝ |D_task|^alpha (alpha = 1: MT-DNN's proportional pooling).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

TOKEN_COLUMNS = ("input_ids", "token_type_ids")


def list_lengths(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Row lengths of an Arrow list column, as int64 [B]."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return arr.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)


def flat_values(col: pa.ChunkedArray | pa.Array, dtype: np.dtype | None = None) -> np.ndarray:
    """Every row's values, concatenated: a list column's elements, or a binary column's bytes
    read as `dtype` (the cache's token tensors: one binary value per row)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_large_binary(arr.type) or pa.types.is_binary(arr.type):
        if dtype is None:
            raise TypeError(f"a binary column needs the dtype of its values ({arr.type})")
        kind = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
        offsets = np.frombuffer(arr.buffers()[1], dtype=kind)[arr.offset: arr.offset + len(arr) + 1]
        raw = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]] if len(arr) else \
            np.zeros(0, np.uint8)
        return raw.view(np.dtype(dtype).newbyteorder("<"))
    return arr.flatten().to_numpy(zero_copy_only=False)


def pad_tokens(col: pa.ChunkedArray | pa.Array, lengths: np.ndarray, width: int = 1,
               pad: float = 0, dtype: np.dtype | None = None) -> np.ndarray:
    """A column holding `lengths[i] * width` values per row (a list column, or a binary one of
    `dtype` values) -> [B, T] or [B, T, width]."""
    values = flat_values(col, dtype)
    batch, longest = len(lengths), int(lengths.max(initial=0))
    shape = (batch, longest) if width == 1 else (batch, longest, width)
    out = np.full(shape, pad, dtype=values.dtype)
    mask = np.arange(longest)[None, :] < lengths[:, None]
    out[mask] = values.reshape(-1, width) if width > 1 else values
    return out


def collate_inputs(table: pa.Table) -> dict[str, torch.Tensor]:
    """Tokenized rows (example_id, input_ids, token_type_ids, label) -> padded tensors."""
    lengths = list_lengths(table.column("input_ids"))
    batch = {
        "example_id": torch.from_numpy(table.column("example_id").to_numpy().astype(np.int64)),
        "input_ids": torch.from_numpy(pad_tokens(table.column("input_ids"), lengths).astype(np.int64)),
        "token_type_ids": torch.from_numpy(
            pad_tokens(table.column("token_type_ids"), lengths).astype(np.int64)),
        "attention_mask": torch.from_numpy(
            (np.arange(int(lengths.max(initial=0)))[None, :] < lengths[:, None]).astype(np.int64)),
    }
    if "label" in table.column_names:
        batch["labels"] = torch.from_numpy(table.column("label").to_numpy(zero_copy_only=False).copy())
    return batch


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Row indices cut into batches of similar length (less padding for inference)."""
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def task_schedule(batches_per_task: dict[str, int], alpha: float, seed: int) -> list[str]:
    """The task of every batch in one epoch.

    alpha = 1 pools every task's batches and shuffles them (MT-DNN, Algorithm 1); other alphas
    draw the same total number of batches with p(task) ∝ n_task^alpha.
    """
    rng = np.random.default_rng(seed)
    names = list(batches_per_task)
    counts = np.array([batches_per_task[t] for t in names], dtype=np.float64)
    total = int(counts.sum())
    if alpha == 1.0:
        pool = np.repeat(np.arange(len(names)), counts.astype(np.int64))
        rng.shuffle(pool)
    else:
        p = counts ** alpha / (counts ** alpha).sum()
        pool = rng.choice(len(names), size=total, p=p)
    return [names[i] for i in pool]
