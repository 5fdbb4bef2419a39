"""Raw data (GLUE folders, HF datasets, local files, plain text) -> tokenized Arrow tables.

Every source ends as the same table: `example_id` (int64, stable: the row's index in its
source split), `input_ids` (list<int32>, real tokens only), `token_type_ids` (list<int8>),
`label` (int64 class index, float32 score, or -1 when unlabeled). Batches are padded later,
per batch (`batching.collate_inputs`); `train_data` decides which rows go in a batch.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import glue
from pipeline.augment import augment_frame
from pipeline.config import DataConfig
from pipeline.errors import DataError
from pipeline.tasks import Task, get_task, make_task

REPO = Path(__file__).resolve().parents[1]
AUGMENTED = "train_aug"  # the train split + data.augment copies (pipeline/augment.py)
SPLITS = ("train", "dev", AUGMENTED)
UNLABELED = "unlabeled"  # pseudo-task: task-agnostic text (data.unlabeled_path or pooled tasks)


def custom_tasks(cfg: DataConfig) -> dict[str, Task]:
    return {d.name: make_task(d.name, d.text_columns, d.label_column, d.labels, d.kind)
            for d in cfg.custom_tasks}


def task_of(cfg: DataConfig, name: str) -> Task:
    return get_task(name, custom_tasks(cfg))


def resolve_glue_dir(cfg: DataConfig) -> Path | None:
    """data.glue_dir, else $GLUE_DIR, else ../shared/data/glue beside the repo, else None."""
    for candidate in (cfg.glue_dir, os.environ.get("GLUE_DIR", ""), REPO.parent / "shared/data/glue"):
        if candidate:
            path = Path(candidate)
            if cfg.glue_dir and candidate == cfg.glue_dir and not path.is_dir():
                raise DataError(f"data.glue_dir={cfg.glue_dir} is not a folder")
            if path.is_dir():
                return path
    return None


def _split_location(cfg: DataConfig, task_name: str, split: str):
    """Where one task split is read from: ("file", path, its TaskDecl) for a task declared in
    data.custom_tasks, ("glue", GLUE folder, None), or ("hub", None, None). DataError for a
    declared task without this split's path, or source=glue with no GLUE folder."""
    decl = next((d for d in cfg.custom_tasks if d.name == task_name), None)
    if decl is not None:
        path = decl.train_path if split == "train" else decl.dev_path
        if not path:
            raise DataError(f"task {task_name}: no {split}_path in data.custom_tasks")
        return "file", path, decl
    glue_dir = resolve_glue_dir(cfg) if cfg.source in ("auto", "glue") else None
    if glue_dir is not None:
        return "glue", glue_dir, None
    if cfg.source == "glue":
        raise DataError("no GLUE folder found: set GLUE_DIR or data.glue_dir to the folder "
                        "holding sst2/, mrpc/, ...")
    return "hub", None, None


def check_available(cfg: DataConfig) -> None:
    """Every file the run will read exists (GLUE splits, declared task files, unlabeled text),
    or the Hub is reachable for what none of them serve: a DataError naming the path or the
    config key now, before Ray starts, instead of at the first read."""
    hub_tasks = []
    for name in cfg.tasks:
        for split in ("train", "dev"):
            kind, where, _ = _split_location(cfg, name, split)
            if kind == "file" and "://" not in where and not Path(where).is_file():
                raise DataError(f"task {name}: data.custom_tasks {split}_path {where} does not exist")
            if kind == "glue":
                glue.glue_split_path(where, task_of(cfg, name).name, split)
            if kind == "hub" and name not in hub_tasks:
                hub_tasks.append(name)
    if cfg.unlabeled_path and "://" not in cfg.unlabeled_path and not Path(cfg.unlabeled_path).is_file():
        raise DataError(f"data.unlabeled_path={cfg.unlabeled_path} does not exist")
    if hub_tasks:
        _require_hub(f"{cfg.hf_name} {hub_tasks}")


def load_frame(cfg: DataConfig, task_name: str, split: str) -> pd.DataFrame:
    """Rows of one task split: example_id, text_a, text_b, label."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {SPLITS}")
    if task_name == UNLABELED:
        if split != "train":
            raise DataError(f"unlabeled text has only a train split, not {split!r}")
        return load_unlabeled(cfg)
    if split == AUGMENTED:
        return augment_frame(load_frame(cfg, task_name, "train"), cfg.augment, task_name)
    task = task_of(cfg, task_name)
    limit = cfg.train_limit if split == "train" else cfg.dev_limit
    kind, where, decl = _split_location(cfg, task_name, split)
    if kind == "file":
        return glue.read_file_split(where, task, decl.column_map, limit)
    if kind == "glue":
        return glue.read_glue_split(str(where), task, split, limit)
    return _hf_frame(cfg.hf_name, task, split, limit)


def _require_hub(what: str) -> None:
    if not _hub_reachable():
        raise DataError(f"cannot load {what} from the Hugging Face Hub (offline?). "
                        "Point GLUE_DIR or data.glue_dir at a GLUE TSV folder instead.")


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hf_frame(name: str, task: Task, split: str, limit: int) -> pd.DataFrame:
    _require_hub(f"{name}/{task.name}")
    import datasets  # heavy import, only on this path

    hf_split = {"train": "train", "dev": "validation"}[split]
    try:
        ds = datasets.load_dataset(name, task.name, split=hf_split)
    except Exception as e:  # the hub raises many kinds; all mean the same to the user
        raise DataError(f"could not load HF dataset {name}/{task.name} ({hf_split}): {e}") from e
    df = ds.to_pandas()
    cols = ["sentence"] if "sentence" in df else [c for c in df.columns if c not in ("label", "idx")][:2]
    out = pd.DataFrame({
        "example_id": np.arange(len(df), dtype=np.int64),
        "text_a": df[cols[0]].astype(str),
        "text_b": df[cols[1]].astype(str) if len(cols) > 1 else "",
        "label": df["label"].astype(np.float32 if task.kind == "regression" else np.int64),
    })
    return out.head(limit) if limit else out


def load_unlabeled(cfg: DataConfig) -> pd.DataFrame:
    """Unlabeled text: data.unlabeled_path, else every task's training text pooled (no labels)."""
    if cfg.unlabeled_path:
        return glue.read_text_lines(cfg.unlabeled_path)
    parts = []
    for name in cfg.tasks:
        df = load_frame(cfg, name, "train")
        parts += [df["text_a"], df.loc[df["text_b"] != "", "text_b"]]
    text = pd.concat(parts, ignore_index=True)
    return pd.DataFrame({"example_id": np.arange(len(text), dtype=np.int64), "text_a": text,
                         "text_b": "", "label": -1})


def tokenize_frame(df: pd.DataFrame, tokenizer, max_len: int) -> pa.Table:
    """Tokenize with truncation to max_len; no padding (batches pad themselves)."""
    text_b = df["text_b"].tolist() if (df["text_b"] != "").any() else None
    enc = tokenizer(df["text_a"].tolist(), text_b, truncation=True, max_length=max_len,
                    padding=False, return_attention_mask=False)
    type_ids = enc.get("token_type_ids") or [[0] * len(x) for x in enc["input_ids"]]
    label = df["label"].to_numpy()
    return pa.table({
        "example_id": pa.array(df["example_id"].to_numpy(np.int64)),
        "input_ids": pa.array(enc["input_ids"], type=pa.list_(pa.int32())),
        "token_type_ids": pa.array(type_ids, type=pa.list_(pa.int8())),
        "label": pa.array(label.astype(np.float32) if label.dtype.kind == "f" else label.astype(np.int64)),
    })


def load_tokenized(cfg: DataConfig, task_name: str, split: str, tokenizer) -> pa.Table:
    return tokenize_frame(load_frame(cfg, task_name, split), tokenizer, cfg.max_len)
