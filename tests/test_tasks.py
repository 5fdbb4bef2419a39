"""Tests for pipeline.tasks: registry, validation and metrics (checked against sklearn/scipy)."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from pipeline.errors import ConfigError, DataError, RaykdError
from pipeline.tasks import GLUE_TASKS, compute_metrics, get_task, main_metric, make_task


def test_glue_registry_shapes():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    expected = {  # name: (num_outputs, is_pair, main metric)
        "cola": (2, False, "mcc"), "sst2": (2, False, "accuracy"), "mrpc": (2, True, "accuracy"),
        "stsb": (1, True, "pearson"), "qqp": (2, True, "accuracy"), "mnli": (3, True, "accuracy"),
        "qnli": (2, True, "accuracy"), "rte": (2, True, "accuracy"), "wnli": (2, True, "accuracy"),
    }
    for name, (n_out, pair, metric) in expected.items():
        task = get_task(name)
        assert (task.num_outputs, task.is_pair, main_metric(task)) == (n_out, pair, metric), name
    assert GLUE_TASKS["mrpc"].metrics == ("accuracy", "f1")
    assert GLUE_TASKS["stsb"].kind == "regression" and GLUE_TASKS["stsb"].labels == ()


def test_label_index():
    mnli = GLUE_TASKS["mnli"]
    assert [mnli.label_index(x) for x in ("contradiction", "entailment", "neutral")] == [0, 1, 2]
    assert GLUE_TASKS["rte"].label_index("not_entailment") == 1
    assert GLUE_TASKS["stsb"].label_index("3.800") == pytest.approx(3.8)
    with pytest.raises(DataError, match=r"'Entailment'.*\['entailment', 'not_entailment'\]"):
        GLUE_TASKS["rte"].label_index("Entailment")
    with pytest.raises(DataError, match="not a number"):
        GLUE_TASKS["stsb"].label_index("high")
    with pytest.raises(DataError, match="not finite"):
        GLUE_TASKS["stsb"].label_index("nan")
    assert issubclass(DataError, ValueError) and issubclass(DataError, RaykdError)


def test_get_task_unknown_suggests_and_lists():
    with pytest.raises(ConfigError, match=r"did you mean 'sst2'\?") as info:
        get_task("sst")
    assert "cola" in str(info.value) and "wnli" in str(info.value)
    with pytest.raises(ConfigError, match=r"did you mean 'mrpc'\?"):
        get_task("mrcp")
    with pytest.raises(ConfigError, match="known tasks") as info:
        get_task("zzzzzz")
    assert "did you mean" not in str(info.value)


def test_get_task_custom_first():
    mine = make_task("reviews", "text", "stars", ["1", "2", "3"])
    assert get_task("reviews", {"reviews": mine}) is mine
    with pytest.raises(ConfigError, match=r"did you mean 'reviews'\?"):
        get_task("review", {"reviews": mine})


def test_make_task_normalises_inputs():
    task = make_task("t", "text", "y", [0, 1])
    assert task.text_columns == ("text",) and task.labels == ("0", "1")
    assert task.metrics == ("accuracy",)
    reg = make_task("r", ["a", "b"], "score", kind="regression")
    assert reg.metrics == ("pearson", "spearman") and reg.num_outputs == 1 and reg.is_pair


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text_columns=["a", "b", "c"]), "1 or 2 columns"),
        (dict(text_columns=[]), "1 or 2 columns"),
        (dict(text_columns=["a", "a"]), "distinct"),
        (dict(label_column="a"), "also a text column"),
        (dict(kind="regression"), "regression task has no label set"),
        (dict(labels=["pos"]), "at least 2 labels"),
        (dict(labels=["x", "x"]), "distinct"),
        (dict(kind="ranking"), "kind must be one of"),
        (dict(metrics=["acuracy"]), "did you mean 'accuracy'"),
        (dict(metrics=["pearson"]), "does not apply to a classification"),
        (dict(labels=["a", "b", "c"], metrics=["f1"]), "binary F1"),
        (dict(labels="01"), "got the string"),
    ],
)
def test_make_task_validation(kwargs, message):
    args = dict(name="t", text_columns=["a"], label_column="y", labels=["0", "1"])
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        make_task(**args)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(200, 2))
    labels = rng.integers(0, 2, size=200)
    preds = logits.argmax(-1)
    got = compute_metrics(GLUE_TASKS["mrpc"], logits, labels)
    assert got["accuracy"] == pytest.approx(100 * accuracy_score(labels, preds))
    assert got["f1"] == pytest.approx(100 * f1_score(labels, preds))
    assert got["combined"] == pytest.approx((got["accuracy"] + got["f1"]) / 2)
    cola = compute_metrics(GLUE_TASKS["cola"], logits, labels)
    assert set(cola) == {"mcc"}
    assert cola["mcc"] == pytest.approx(100 * matthews_corrcoef(labels, preds))


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=300)
    logits = rng.normal(size=(300, 3))
    logits[np.arange(150), labels[:150]] += 2.0  # better than chance, so mcc is not ~0
    preds = logits.argmax(-1)
    got = compute_metrics(GLUE_TASKS["mnli"], logits, labels)
    assert got == {"accuracy": pytest.approx(100 * accuracy_score(labels, preds))}
    task = make_task("m", "t", "y", ["a", "b", "c"], metrics=["mcc", "accuracy"])
    assert compute_metrics(task, logits, labels)["mcc"] == pytest.approx(
        100 * matthews_corrcoef(labels, preds)
    )


@pytest.mark.parametrize("shape", [(150,), (150, 1)])
def test_regression_metrics_match_scipy(shape):
    rng = np.random.default_rng(4)
    gold = rng.integers(0, 6, size=150).astype(np.float32)  # ties, as STS-B has
    scores = gold + rng.normal(scale=1.5, size=150)
    got = compute_metrics(GLUE_TASKS["stsb"], scores.reshape(shape), gold)
    assert got["pearson"] == pytest.approx(100 * stats.pearsonr(scores, gold)[0])
    assert got["spearman"] == pytest.approx(100 * stats.spearmanr(scores, gold)[0])
    assert got["combined"] == pytest.approx((got["pearson"] + got["spearman"]) / 2)


def test_degenerate_inputs_give_zero_not_nan():
    labels = np.array([0, 1, 1, 0, 1])
    constant = np.tile([1.0, 0.0], (5, 1))  # always predicts class 0
    cola = compute_metrics(GLUE_TASKS["cola"], constant, labels)
    assert cola["mcc"] == 0.0
    mrpc = compute_metrics(GLUE_TASKS["mrpc"], constant, labels)
    assert mrpc["f1"] == 0.0 == f1_score(labels, np.zeros(5, int), zero_division=0)
    stsb = compute_metrics(GLUE_TASKS["stsb"], np.full(5, 2.5), np.arange(5.0))
    assert stsb == {"pearson": 0.0, "spearman": 0.0, "combined": 0.0}
    assert not any(math.isnan(v) for v in (*cola.values(), *mrpc.values()))


def test_class_index_predictions_accepted():
    labels = np.array([0, 1, 1, 0])
    got = compute_metrics(GLUE_TASKS["sst2"], np.array([0, 1, 0, 0]), labels)
    assert got == {"accuracy": 75.0}


@pytest.mark.parametrize(
    "task, outputs, labels, message",
    [
        ("sst2", np.zeros((4, 3)), np.zeros(4), r"shape \[4, 2\]"),
        ("sst2", np.zeros((3, 2)), np.zeros(4), r"shape \[4, 2\]"),
        ("sst2", np.zeros((4, 2)), np.array([0, 1, 2, 0]), r"class indices in \[0, 2\)"),
        ("stsb", np.zeros((4, 2)), np.zeros(4), r"shape \[4\] or \[4, 1\]"),
        ("sst2", np.zeros((0, 2)), np.zeros(0), "no examples"),
    ],
)
def test_compute_metrics_rejects_bad_shapes(task, outputs, labels, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(GLUE_TASKS[task], outputs, labels)
