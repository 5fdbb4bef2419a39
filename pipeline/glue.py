"""Strict readers for GLUE TSV files and user data files.

Every reader returns a frame with exactly the columns ``example_id`` (int64, 0-based row
index in the file), ``text_a`` (str), ``text_b`` (str, ``""`` for single-sentence tasks) and
``label`` (int64 class index, float32 score, or -1 for unlabeled text). Any problem raises
``DataError`` naming the file, the 1-based line (or row) and the column.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError, DataError
from pipeline.tasks import Task, get_task

FRAME_COLUMNS = ("example_id", "text_a", "text_b", "label")
GLUE_SPLITS = ("train", "dev")
_GLUE_DIR_HINT = "set the GLUE_DIR environment variable or the data.glue_dir config key"
# CoLA ships without a header line; these are the names we give its 4 columns.
COLA_COLUMNS = ("source", "label", "original_label", "sentence")


def glue_split_path(glue_dir: str | Path, task: str, split: str) -> Path:
    """Path of a GLUE split file, ``<glue_dir>/<task>/<split>.tsv``; checks that it exists.

    ``task`` is a GLUE task name (``"SST-2"`` is accepted for ``"sst2"``); MNLI's dev split
    is ``dev_matched.tsv``.

    Raises:
        ConfigError: unknown task or split.
        DataError: the folder or file does not exist.
    """
    name = get_task(str(task).lower().replace("-", "")).name  # ConfigError if not GLUE
    if split not in GLUE_SPLITS:
        raise ConfigError(f"unknown GLUE split {split!r}; choose one of {list(GLUE_SPLITS)}")
    if not glue_dir:
        raise DataError(f"no GLUE data folder given; {_GLUE_DIR_HINT}")
    root = Path(glue_dir)
    if not root.is_dir():
        raise DataError(f"GLUE data folder {str(root)!r} does not exist; {_GLUE_DIR_HINT}")
    filename = "dev_matched.tsv" if (name, split) == ("mnli", "dev") else f"{split}.tsv"
    path = root / name / filename
    if not path.is_file():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(
            f"GLUE file {str(path)!r} not found; task folders in {str(root)!r}: {present}. "
            f"Copy the GLUE {name} files there, or {_GLUE_DIR_HINT}"
        )
    return path


def read_glue_split(glue_dir: str | Path, task: Task, split: str, limit: int = 0) -> pd.DataFrame:
    """Read one split of a GLUE task from its GLUE TSV file; ``limit>0`` keeps the first rows."""
    path = glue_split_path(glue_dir, task.name, split)
    if task.name == "cola":
        return read_table(path, task, has_header=False, column_names=COLA_COLUMNS, limit=limit)
    return read_table(path, task, limit=limit)


def read_table(
    path: str | Path,
    task: Task,
    *,
    has_header: bool = True,
    column_names: Sequence[str] | None = None,
    delimiter: str = "\t",
    limit: int = 0,
) -> pd.DataFrame:
    """Read a delimited file without quote handling (``QUOTE_NONE``), as GLUE files need.

    Column names come from ``column_names`` or else from the header line (a UTF-8 BOM is
    removed). Every row must have as many fields as there are column names.
    """
    path = Path(path)
    if not has_header and column_names is None:
        raise ConfigError(f"{path}: a file without a header line needs column_names")
    lines = _read_lines(path)
    names = tuple(column_names or ())
    if has_header:
        if not lines:
            raise DataError(f"{path}: file is empty; expected a header line")
        header = next(csv.reader(lines[:1], delimiter=delimiter, quoting=csv.QUOTE_NONE), [])
        names = names or tuple(header)
        lines = lines[1:]
    first_line = 2 if has_header else 1
    indices = _column_indices(path, task, names)
    if limit > 0:
        lines = lines[:limit]
    if not lines:
        raise DataError(f"{path}: no data rows")
    n_fields = len(names)
    rows: list[list[str]] = []
    try:
        # One input string per record: with QUOTE_NONE a record never spans lines.
        for row in csv.reader(lines, delimiter=delimiter, quoting=csv.QUOTE_NONE, strict=True):
            if len(row) != n_fields:
                raise DataError(
                    f"{path} line {first_line + len(rows)}: expected {n_fields} fields "
                    f"{list(names)} separated by {delimiter!r}, found {len(row)}; "
                    "fix or remove this line"
                )
            rows.append(row)
    except csv.Error as err:
        raise DataError(f"{path} line {first_line + len(rows)}: malformed line ({err})") from None
    columns = {col: [row[idx] for row in rows] for col, idx in indices.items()}
    return _examples_to_frame(path, task, columns, lambda i: f"line {first_line + i}")


def read_text_lines(path: str | Path) -> pd.DataFrame:
    """Read unlabeled text, one example per non-empty line; ``label`` is -1.

    ``example_id`` counts the non-empty lines from 0.
    """
    path = Path(path)
    texts = [line for line in _read_lines(path) if line.strip()]
    if not texts:
        raise DataError(f"{path}: no non-empty lines; expected one text per line")
    return pd.DataFrame({
        "example_id": np.arange(len(texts), dtype=np.int64),
        "text_a": texts,
        "text_b": [""] * len(texts),
        "label": np.full(len(texts), -1, dtype=np.int64),
    })


def read_file_split(
    path: str | Path,
    task: Task,
    column_map: Mapping[str, str] | None = None,
    limit: int = 0,
) -> pd.DataFrame:
    """Read a user file by extension: ``.csv``, ``.tsv``, ``.jsonl``/``.json`` (one object per
    line) or ``.parquet``.

    ``column_map`` renames task columns to file columns, ``{task_column: file_column}``.
    CSV uses standard quoting; TSV uses no quoting, like GLUE.
    """
    path = Path(path)
    file_task = _map_columns(task, column_map or {})
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".json", ".parquet"):
        raise DataError(
            f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl or .parquet"
        )
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} not found; check the path in the config")
    if suffix == ".tsv":
        return read_table(path, file_task, limit=limit)
    if suffix == ".csv":
        return _read_csv(path, file_task, limit)
    if suffix == ".parquet":
        return _read_parquet(path, file_task, limit)
    return _read_jsonl(path, file_task, limit)


def _map_columns(task: Task, column_map: Mapping[str, str]) -> Task:
    """Copy of ``task`` whose column names are the file's, after ``column_map``."""
    own = (*task.text_columns, task.label_column)
    unknown = [k for k in column_map if k not in own]
    if unknown:
        raise ConfigError(
            f"column_map keys {unknown} are not columns of task {task.name!r}; "
            f"its columns are {list(own)} (map them as {{task_column: file_column}})"
        )
    return dataclasses.replace(
        task,
        text_columns=tuple(column_map.get(c, c) for c in task.text_columns),
        label_column=column_map.get(task.label_column, task.label_column),
    )


def _read_text(path: Path) -> str:
    """Decode ``path`` as UTF-8, dropping a leading BOM; DataError names the line of a bad byte."""
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} not found; check the path in the config")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        col = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path} line {line}: byte 0x{data[err.start]:02x} at character {col} is not valid "
            "UTF-8; re-save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def _read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 file without their line endings (``\\n`` or ``\\r\\n``)."""
    text = _read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    if "\r" in text:
        lines = [line.removesuffix("\r") for line in lines]
    return lines


def _column_indices(path: Path, task: Task, names: Sequence[str]) -> dict[str, int]:
    """Position of each of the task's columns in ``names``; DataError if one is missing."""
    wanted = (*task.text_columns, task.label_column)
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(
            f"{path}: task {task.name!r} needs columns {missing}, but the file has "
            f"{list(names)}; rename the columns or pass a column_map {{task_column: file_column}}"
        )
    return {c: list(names).index(c) for c in wanted}


def _examples_to_frame(
    path: Path, task: Task, columns: Mapping[str, list[object]], locate: Callable[[int], str]
) -> pd.DataFrame:
    """Validate raw text/label values and build the standard frame.

    ``locate(i)`` says where the i-th value is in the file (e.g. ``"line 12"``), for errors.
    """
    texts = [_check_texts(path, col, columns[col], locate) for col in task.text_columns]
    n = len(texts[0])
    labels = _label_values(path, task, columns[task.label_column], locate)
    return pd.DataFrame({
        "example_id": np.arange(n, dtype=np.int64),
        "text_a": texts[0],
        "text_b": texts[1] if task.is_pair else [""] * n,
        "label": labels,
    })


def _check_texts(
    path: Path, col: str, values: list[object], locate: Callable[[int], str]
) -> list[str]:
    for i, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            what = (
                "empty text" if isinstance(value, str)
                else "missing text (null)" if value is None
                else f"not text: {value!r}"
            )
            raise DataError(
                f"{path} {locate(i)}, column {col!r}: {what}; "
                "every example needs text in each text column"
            )
    return values  # type: ignore[return-value]


def _label_values(
    path: Path, task: Task, raw: list[object], locate: Callable[[int], str]
) -> np.ndarray:
    cache: dict[str, int | float] = {}  # label strings repeat; map each once
    out = []
    for i, value in enumerate(raw):
        if task.kind == "classification" and _is_int(value):
            value = str(int(value))  # type: ignore[call-overload]  # e.g. Parquet 0/1 labels
        try:
            if isinstance(value, str):
                if value not in cache:
                    cache[value] = task.label_index(value)
                out.append(cache[value])
            else:
                out.append(task.label_index(value))
        except DataError as err:
            raise DataError(f"{path} {locate(i)}, column {task.label_column!r}: {err}") from None
    dtype = np.int64 if task.kind == "classification" else np.float32
    return np.asarray(out, dtype=dtype)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _read_csv(path: Path, task: Task, limit: int) -> pd.DataFrame:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: file is empty; expected a header line")
    indices = _column_indices(path, task, header)
    columns: dict[str, list[object]] = {c: [] for c in indices}
    starts: list[int] = []  # first line of each row; quoted fields may span lines
    try:
        while not limit or len(starts) < limit:
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                break
            if not row:
                continue  # blank line
            if len(row) != len(header):
                raise DataError(
                    f"{path} line {start}: expected {len(header)} fields {header}, "
                    f"found {len(row)}; fix or remove this line"
                )
            starts.append(start)
            for c, idx in indices.items():
                columns[c].append(row[idx])
    except csv.Error as err:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV ({err})") from None
    if not starts:
        raise DataError(f"{path}: no data rows")
    return _examples_to_frame(path, task, columns, lambda i: f"line {starts[i]}")


def _read_jsonl(path: Path, task: Task, limit: int) -> pd.DataFrame:
    wanted = (*task.text_columns, task.label_column)
    columns: dict[str, list[object]] = {c: [] for c in wanted}
    lines = _read_lines(path)
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if limit > 0:
        numbered = numbered[:limit]
    if not numbered:
        raise DataError(f"{path}: no records; expected one JSON object per line")
    for line_no, line in numbered:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {line_no}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path} line {line_no}: expected a JSON object, got {type(record).__name__}"
            )
        missing = [c for c in wanted if c not in record]
        if missing:
            raise DataError(
                f"{path} line {line_no}: task {task.name!r} needs columns {missing}, but the "
                f"record has {list(record)}; rename the keys or pass a column_map"
            )
        for c in wanted:
            columns[c].append(record[c])
    return _examples_to_frame(path, task, columns, lambda i: f"line {numbered[i][0]}")


def _read_parquet(path: Path, task: Task, limit: int) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as err:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    indices = _column_indices(path, task, names)
    table = pq.read_table(path, columns=list(indices))
    if limit > 0:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise DataError(f"{path}: no data rows")
    columns = {c: table.column(c).to_pylist() for c in indices}
    return _examples_to_frame(path, task, columns, lambda i: f"row {i + 1}")
