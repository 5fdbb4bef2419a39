"""Task registry: text/label columns, label set, kind and metrics for each task.

A ``Task`` says how to read a task's examples and how to score predictions on it.
``GLUE_TASKS`` holds the nine GLUE tasks with the column names and label strings of the
original GLUE TSV files; ``make_task`` declares a task for your own data.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError, DataError

KINDS = ("classification", "regression")
CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")


@dataclass(frozen=True)
class Task:
    """One task: where its text and label are, which labels exist, how it is scored.

    Attributes:
        name: short task name, e.g. ``"sst2"``.
        text_columns: 1 or 2 column names holding text, as named in the source file.
        label_column: column holding the label (class string or float score).
        labels: class label strings as they appear in the data; ``()`` for regression.
            The position of a label is its class index.
        kind: ``"classification"`` or ``"regression"``.
        metrics: metric names; the first one is the main metric.
    """

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...]
    kind: str
    metrics: tuple[str, ...]

    def __post_init__(self) -> None:
        _validate_task(self)

    @property
    def num_outputs(self) -> int:
        """Number of model outputs: one per class, or 1 for regression."""
        return len(self.labels) if self.kind == "classification" else 1

    @property
    def is_pair(self) -> bool:
        """True when examples are sentence pairs (two text columns)."""
        return len(self.text_columns) == 2

    def label_index(self, raw: object) -> int | float:
        """Map a raw label to its class index (classification) or float score (regression).

        Raises:
            DataError: the label is not in ``labels`` or the score is not a finite number.
        """
        if self.kind == "regression":
            try:
                if isinstance(raw, bool):
                    raise TypeError
                score = float(raw)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise DataError(
                    f"score {raw!r} of task {self.name!r} is not a number"
                ) from None
            if not math.isfinite(score):
                raise DataError(f"score {raw!r} of task {self.name!r} is not finite")
            return score
        try:
            return self.labels.index(raw)  # type: ignore[arg-type]
        except ValueError:
            raise DataError(
                f"label {raw!r} is not a label of task {self.name!r}; expected one of "
                f"{list(self.labels)} (labels are compared as exact strings)"
            ) from None


def _validate_task(task: Task) -> None:
    """Raise ConfigError when a Task's fields do not fit together."""
    where = f"task {task.name!r}"
    if not isinstance(task.name, str) or not task.name:
        raise ConfigError("a task needs a non-empty name")
    for field in ("text_columns", "labels", "metrics"):
        if not isinstance(getattr(task, field), tuple):
            raise ConfigError(
                f"{where}: {field} must be a tuple of strings, got {getattr(task, field)!r}; "
                "use make_task() to build a task from lists"
            )
    cols = task.text_columns
    if not 1 <= len(cols) <= 2:
        raise ConfigError(
            f"{where}: text_columns must name 1 or 2 columns (single sentences or pairs), "
            f"got {len(cols)}: {list(cols)}"
        )
    if not all(isinstance(c, str) and c for c in cols) or len(set(cols)) != len(cols):
        raise ConfigError(
            f"{where}: text_columns must be distinct non-empty names, got {list(cols)}"
        )
    if not isinstance(task.label_column, str) or not task.label_column:
        raise ConfigError(f"{where}: label_column must be a non-empty column name")
    if task.label_column in cols:
        raise ConfigError(
            f"{where}: label_column {task.label_column!r} is also a text column; "
            "use different columns for text and label"
        )
    if task.kind not in KINDS:
        raise ConfigError(f"{where}: kind must be one of {list(KINDS)}, got {task.kind!r}")
    _validate_labels(task, where)
    _validate_metrics(task, where)


def _validate_labels(task: Task, where: str) -> None:
    if task.kind == "regression":
        if task.labels:
            raise ConfigError(
                f"{where}: a regression task has no label set, got labels={list(task.labels)}; "
                "remove labels or set kind='classification'"
            )
        return
    if len(task.labels) < 2:
        raise ConfigError(
            f"{where}: a classification task needs at least 2 labels, got {list(task.labels)}; "
            "list the label strings as they appear in the data"
        )
    if not all(isinstance(lab, str) and lab for lab in task.labels):
        raise ConfigError(f"{where}: labels must be non-empty strings, got {list(task.labels)}")
    if len(set(task.labels)) != len(task.labels):
        raise ConfigError(f"{where}: labels must be distinct, got {list(task.labels)}")


def _validate_metrics(task: Task, where: str) -> None:
    allowed = CLASSIFICATION_METRICS if task.kind == "classification" else REGRESSION_METRICS
    if not task.metrics:
        raise ConfigError(f"{where}: metrics must name at least one of {list(allowed)}")
    for metric in task.metrics:
        if metric not in allowed:
            hint = _did_you_mean(str(metric), allowed)
            raise ConfigError(
                f"{where}: metric {metric!r} does not apply to a {task.kind} task{hint}; "
                f"choose from {list(allowed)}"
            )
    if len(set(task.metrics)) != len(task.metrics):
        raise ConfigError(f"{where}: metrics must be distinct, got {list(task.metrics)}")
    if "f1" in task.metrics and len(task.labels) != 2:
        raise ConfigError(
            f"{where}: 'f1' is binary F1 (positive class = labels[1]) but the task has "
            f"{len(task.labels)} labels; use 'accuracy' or 'mcc'"
        )


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name.lower(), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def make_task(
    name: str,
    text_columns: str | Iterable[str],
    label_column: str,
    labels: Iterable[object] = (),
    kind: str = "classification",
    metrics: Iterable[str] | None = None,
) -> Task:
    """Declare a task for your own data; lists and YAML ints are turned into string tuples.

    ``metrics`` defaults to ``("accuracy",)`` for classification and
    ``("pearson", "spearman")`` for regression.

    Raises:
        ConfigError: 0 or more than 2 text columns, labels on a regression task, fewer than
            2 labels on a classification task, or a metric that does not fit the kind.
    """
    cols = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
    if isinstance(labels, str):
        raise ConfigError(
            f"task {name!r}: labels must be a list of label strings, got the string {labels!r}"
        )
    if metrics is None:
        metrics = ("accuracy",) if kind == "classification" else REGRESSION_METRICS
    elif isinstance(metrics, str):
        metrics = (metrics,)
    return Task(
        name=name,
        text_columns=cols,
        label_column=label_column,
        labels=tuple(str(lab) for lab in labels),
        kind=kind,
        metrics=tuple(metrics),
    )


# Column names and label strings exactly as in the GLUE TSV files (see shared/data/glue/README.md).
_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        make_task("cola", ("sentence",), "label", _BINARY, metrics=("mcc",)),
        make_task("sst2", ("sentence",), "label", _BINARY, metrics=("accuracy",)),
        make_task(
            "mrpc", ("#1 String", "#2 String"), "Quality", _BINARY, metrics=("accuracy", "f1")
        ),
        make_task("stsb", ("sentence1", "sentence2"), "score", kind="regression"),
        make_task(
            "qqp", ("question1", "question2"), "is_duplicate", _BINARY, metrics=("accuracy", "f1")
        ),
        make_task(
            "mnli", ("sentence1", "sentence2"), "gold_label",
            ("contradiction", "entailment", "neutral"), metrics=("accuracy",),
        ),
        make_task("qnli", ("question", "sentence"), "label", _NLI2, metrics=("accuracy",)),
        make_task("rte", ("sentence1", "sentence2"), "label", _NLI2, metrics=("accuracy",)),
        make_task("wnli", ("sentence1", "sentence2"), "label", _BINARY, metrics=("accuracy",)),
    )
}


def get_task(name: str, custom: Mapping[str, Task] | None = None) -> Task:
    """Look a task up by name: user-declared ``custom`` tasks first, then GLUE.

    Raises:
        ConfigError: unknown name; the message lists known tasks and the closest match.
    """
    known: dict[str, Task] = {**GLUE_TASKS, **(custom or {})}
    if name in known:
        return known[name]
    hint = _did_you_mean(str(name), known)
    raise ConfigError(
        f"unknown task {name!r}{hint}; known tasks: {', '.join(sorted(known))}. "
        "To use your own data, declare the task under data.custom_tasks (or with make_task())"
    )


def main_metric(task: Task) -> str:
    """Name of the metric used to compare models on ``task`` (the first of its metrics)."""
    return task.metrics[0]


def compute_metrics(task: Task, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Score predictions on ``task``; values are percentages (0-100) as GLUE papers report.

    Args:
        outputs: classification: logits ``[N, C]`` (argmax is taken) or predicted class
            indices ``[N]`` (integer dtype); regression: scores ``[N]`` or ``[N, 1]``.
        labels: ``[N]`` class indices or gold scores.

    Returns:
        ``{metric: value}`` for each of ``task.metrics``, plus ``"combined"`` (their mean)
        when the task has more than one metric, as GLUE does for MRPC, QQP and STS-B.
    """
    outputs = np.asarray(outputs)
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise ValueError(f"compute_metrics for task {task.name!r}: no examples to score")
    if task.kind == "classification":
        preds, gold = _class_predictions(task, outputs, labels)
    else:
        preds, gold = _regression_scores(task, outputs, labels)
    fns = {
        "accuracy": _accuracy, "f1": _binary_f1, "mcc": _mcc,
        "pearson": _pearson, "spearman": _spearman,
    }
    result = {m: 100.0 * fns[m](preds, gold) for m in task.metrics}
    if len(task.metrics) > 1:
        result["combined"] = float(np.mean([result[m] for m in task.metrics]))
    return result


def _class_predictions(
    task: Task, outputs: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    n, c = labels.shape[0], task.num_outputs
    if outputs.ndim == 2 and outputs.shape == (n, c):
        preds = outputs.argmax(axis=-1)
    elif outputs.ndim == 1 and outputs.shape[0] == n and np.issubdtype(outputs.dtype, np.integer):
        preds = outputs
    else:
        raise ValueError(
            f"task {task.name!r}: expected logits of shape [{n}, {c}] or integer class indices "
            f"of shape [{n}], got {outputs.dtype} array of shape {list(outputs.shape)}"
        )
    if not np.all(np.mod(labels, 1) == 0) or labels.min() < 0 or labels.max() >= c:
        raise ValueError(
            f"task {task.name!r}: labels must be class indices in [0, {c}), "
            f"got values from {labels.min()} to {labels.max()}"
        )
    return preds.astype(np.int64), labels.astype(np.int64)


def _regression_scores(
    task: Task, outputs: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    n = labels.shape[0]
    if outputs.shape not in ((n,), (n, 1)):
        raise ValueError(
            f"task {task.name!r}: expected regression scores of shape [{n}] or [{n}, 1], "
            f"got shape {list(outputs.shape)}"
        )
    return outputs.reshape(-1).astype(np.float64), labels.astype(np.float64)


def _accuracy(preds: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(preds == gold))


def _binary_f1(preds: np.ndarray, gold: np.ndarray) -> float:
    """F1 of class 1; 0 when there is no positive prediction and no positive label."""
    tp = int(np.sum((preds == 1) & (gold == 1)))
    wrong = int(np.sum(preds != gold))  # fp + fn
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + wrong)


def _mcc(preds: np.ndarray, gold: np.ndarray) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K); 0 when either side is constant."""
    k = int(max(preds.max(), gold.max())) + 1
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (gold, preds), 1.0)
    t, p = conf.sum(axis=1), conf.sum(axis=0)
    c, s = np.trace(conf), conf.sum()
    cov_tp = c * s - t @ p
    cov_pp = s * s - p @ p
    cov_tt = s * s - t @ t
    denom = math.sqrt(cov_tt * cov_pp)
    return 0.0 if denom == 0 else float(cov_tp / denom)


def _is_degenerate(x: np.ndarray, y: np.ndarray) -> bool:
    return x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0


def _pearson(preds: np.ndarray, gold: np.ndarray) -> float:
    """Pearson r; 0 for constant inputs, where r is undefined. (scipy.stats is imported here,
    not with the module: it takes ~0.8 s, and every Ray worker that reads data imports this.)"""
    from scipy import stats

    return 0.0 if _is_degenerate(preds, gold) else float(stats.pearsonr(preds, gold)[0])


def _spearman(preds: np.ndarray, gold: np.ndarray) -> float:
    """Spearman rho; 0 for constant inputs, where rho is undefined."""
    from scipy import stats

    return 0.0 if _is_degenerate(preds, gold) else float(stats.spearmanr(preds, gold)[0])
