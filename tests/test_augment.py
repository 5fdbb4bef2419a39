"""Augmented copies for distillation (pipeline/augment.py): the rules, ids and labels, the
config's checks, and a stage that trains on teacher-labelled copies under real Ray."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, make_tiny_teacher

from pipeline import data
from pipeline.augment import UNLABELED, augment_frame
from pipeline.cache.reader import read_cache
from pipeline.cache.build import run_fields
from pipeline.cache.key import cache_key
from pipeline.config import AugmentConfig, load
from pipeline.errors import ConfigError
from pipeline.stages import cache_needs, distill_student, required_quantities

WORDS = "the quick brown fox jumps over the lazy dog near a quiet river bank today".split()


def frame(n: int = 50, pair: bool = False, regression: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(6, 14))) for _ in range(2 * n)]
    return pd.DataFrame({
        "example_id": np.arange(10, 10 + n, dtype=np.int64),  # ids need not start at 0
        "text_a": texts[:n], "text_b": texts[n:] if pair else "",
        "label": rng.random(n).astype(np.float32) * 5 if regression else rng.integers(0, 2, n)})


def test_copies_follow_their_rows_with_unique_ids_and_no_gold_label():
    df = frame()
    out = augment_frame(df, AugmentConfig(copies=3), "sst2")
    pd.testing.assert_frame_equal(out.iloc[:len(df)], df)  # the rows themselves, untouched, first
    copies = out.iloc[len(df):]
    assert out["example_id"].is_unique and len(df) < len(out) <= 4 * len(df)
    stride = int(df["example_id"].max()) + 1
    source = copies["example_id"] % stride  # copy k of row e has id e + k * stride
    assert set(source) <= set(df["example_id"]) and set((copies["example_id"] // stride)) <= {1, 2, 3}
    assert (copies["label"] == UNLABELED).all() and copies["label"].dtype == df["label"].dtype
    by_id = dict(zip(df["example_id"], df["text_a"]))
    assert all(t != by_id[e] for e, t in zip(source, copies["text_a"]))  # unchanged copies dropped
    assert (copies["text_b"] == "").all()


def test_rules_rates_and_determinism():
    df = frame(400)
    cfg = AugmentConfig(copies=1, mask_p=0.2, replace_p=0.0, ngram_p=0.0)
    out = augment_frame(df, cfg, "sst2")
    pd.testing.assert_frame_equal(out, augment_frame(df, cfg, "sst2"))  # seeded
    assert not out.equals(augment_frame(df, cfg, "cola"))  # another task draws others
    assert not out.equals(augment_frame(df, AugmentConfig(copies=1, mask_p=0.2, replace_p=0.0,
                                                         ngram_p=0.0, seed=1), "sst2"))
    copies = out.iloc[len(df):]
    words = [w for t in copies["text_a"] for w in t.split()]
    assert 0.15 < words.count("[MASK]") / len(words) < 0.25  # ~mask_p of the words
    assert all(len(t.split()) == len(df.set_index("example_id").loc[e % 410, "text_a"].split())
               for e, t in zip(copies["example_id"], copies["text_a"]))  # masking keeps the length
    grams = augment_frame(df, AugmentConfig(copies=1, mask_p=0, replace_p=0, ngram_p=1.0, max_ngram=3), "x")
    assert all(1 <= len(t.split()) <= 3 for t in grams["text_a"].iloc[len(df):])
    replaced = augment_frame(df, AugmentConfig(copies=1, mask_p=0, replace_p=0.5, ngram_p=0), "x")
    assert "[MASK]" not in " ".join(replaced["text_a"]) and set(" ".join(replaced["text_a"]).split()) <= set(WORDS)


def test_pair_and_regression_rows():
    df = frame(30, pair=True, regression=True)
    out = augment_frame(df, AugmentConfig(copies=2), "stsb")
    copies = out.iloc[len(df):]
    assert (copies["text_b"] != "").all() and (copies["label"] == -1.0).all()
    assert copies["label"].dtype == np.float32
    assert augment_frame(df, AugmentConfig(copies=0), "stsb") is df


@pytest.mark.parametrize("override,match", [
    ("data.augment.copies=-1", "copies must be >= 0"),
    ("data.augment.mask_p=1.5", "mask_p must be in"),
    ("data.augment.max_ngram=0", "max_ngram must be >= 1"),
])
def test_bad_augment_values_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load(None, [override])


def test_an_augmented_stage_needs_copies_and_no_gold_labels():
    stage = 'distill.stages=[{name: aug, augmented: true, losses: {kd: 1.0}}]'
    with pytest.raises(ConfigError, match=r"stages.0.augmented needs data.augment.copies >= 1"):
        load(None, [stage])
    with pytest.raises(ConfigError, match=r"augmented stage cannot use label losses \['hard'\]"):
        load(None, ["data.augment.copies=2", 'distill.stages=[{name: a, augmented: true, '
                    'losses: {kd: 1.0, hard: 1.0}}]'])
    cfg = load(None, ["data.augment.copies=2", stage])
    assert cfg.distill.stages[0].augmented and cfg.data.augment.copies == 2


def test_a_stage_distills_on_teacher_labelled_copies(tiny_teacher, ray_local, glue_dir, tmp_path):
    """Stage 0 trains on 32 SST-2 rows + 2 copies each, labelled by the teacher's cached logits;
    stage 1 on the rows with gold labels. Each split has its own cache (the key holds the data),
    and the augmented cache's rows are the copies' ids and the teacher's outputs on them."""
    stages = [{"name": "aug", "augmented": True, "losses": {"kd": 1.0}, "temperature": 2.0,
               "optim": {"epochs": 1, "batch_size": 16}},
              {"name": "gold", "losses": {"kd": 1.0, "hard": 1.0}, "optim": {"epochs": 1, "batch_size": 16}}]
    cfg = load(None, [f"run.output_dir={tmp_path}", f"cache.root={tmp_path / 'cache'}",
                      f"teacher.path={tiny_teacher}", f"teacher.model={tiny_teacher}",
                      f"data.glue_dir={glue_dir}", "data.train_limit=32", "data.dev_limit=16",
                      "data.augment.copies=2", "student.layers=1", "student.hidden=32",
                      "student.heads=4", "student.ffn=64", "distill.stages=" + json.dumps(stages)])
    assert required_quantities(cfg, tiny_teacher) == ["logits"]
    distill_student(cfg, {"sst2": [tiny_teacher]}, build_cache=True)
    rows = {}
    for split in ("train", data.AUGMENTED):
        fields, frame_ = run_fields(cfg, [tiny_teacher], "sst2", split)
        table = read_cache(cfg.cache.root, cache_key(fields), ["logits"]).to_pandas()
        assert sorted(table["example_id"]) == sorted(frame_["example_id"]), split
        rows[split] = len(table)
    assert rows["train"] == 32 and 48 < rows[data.AUGMENTED] <= 96, rows
    out = tmp_path / "sst2" / "student"
    steps = [json.loads((out / f"stage{i}-{s['name']}" / "metrics.json").read_text())["step"]
             for i, s in enumerate(stages)]
    assert steps == [-(-rows[data.AUGMENTED] // 16), 2], steps


def test_a_multitask_recipe_caches_each_tasks_rows_and_copies(tiny_teacher, tmp_path):
    """mkd_augmented.yaml: an augmented multi-task stage before MKD's own; every task needs its
    teacher logits on the train split and on the augmented one (two caches per task)."""
    cfg = load(str(REPO / "jobs/configs/mkd_augmented.yaml"), [f"run.output_dir={tmp_path}"])
    assert cfg.distill.stages[0].augmented and cfg.data.augment.copies == 4
    needs = cache_needs(cfg, tiny_teacher)
    assert needs == {(t, s): ["logits"] for t in cfg.data.tasks for s in (data.AUGMENTED, "train")}, needs


def test_mlkd_augmented_caches_features_for_the_copies_and_predictions_for_the_rows(tmp_path):
    """mlkd_augmented.yaml: the feature stage reads the teacher's embeddings, attention outputs
    and hidden states of the mapped layers on rows + copies; the prediction stage its [CLS]
    vectors and logits on the labelled rows only. Head counts 6 and 3 need the same cache."""
    teacher = make_tiny_teacher(tmp_path / "t6", {"sst2": 2}, layers=6, hidden=48, heads=12)
    for heads in (12, 6, 3):
        cfg = load(str(REPO / "jobs/configs/mlkd_augmented.yaml"),
                   [f"run.output_dir={tmp_path}", f"student.heads={heads}"])
        assert cfg.distill.stages[0].augmented and not cfg.distill.stages[1].augmented
        needs = cache_needs(cfg, teacher)
        assert set(needs) == {("sst2", data.AUGMENTED), ("sst2", "train")}, needs
        assert sorted(needs[("sst2", data.AUGMENTED)]) == [
            "attn_2", "attn_4", "attn_6", "embeddings", "hidden_2", "hidden_4", "hidden_6"], needs
        assert sorted(needs[("sst2", "train")]) == ["cls", "logits"], needs


def test_mlkd_augmented_predictions_caches_cls_and_logits_for_the_copies_too(tmp_path):
    """mlkd_augmented_predictions.yaml: its middle stage distills sample relations and soft logits
    on rows + copies, so the copies' cache gains [CLS] and logits beside the features; the last
    stage (supervised contrastive needs gold labels) reads the labelled rows only."""
    teacher = make_tiny_teacher(tmp_path / "t6", {"sst2": 2}, layers=6, hidden=48, heads=12)
    cfg = load(str(REPO / "jobs/configs/mlkd_augmented_predictions.yaml"), [f"run.output_dir={tmp_path}"])
    assert [s.augmented for s in cfg.distill.stages] == [True, True, False]
    assert "supcon" not in cfg.distill.stages[1].losses and "supcon" in cfg.distill.stages[2].losses
    needs = cache_needs(cfg, teacher)
    assert set(needs) == {("sst2", data.AUGMENTED), ("sst2", "train")}, needs
    assert sorted(needs[("sst2", data.AUGMENTED)]) == [
        "attn_2", "attn_4", "attn_6", "cls", "embeddings", "hidden_2", "hidden_4", "hidden_6", "logits"], needs
    assert sorted(needs[("sst2", "train")]) == ["cls", "logits"], needs
