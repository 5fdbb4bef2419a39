"""The four methods' recipes run end to end (teacher stage, cache, student stages, report) on
tiny models and a few dozen GLUE rows, through the real CLI and real Ray."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_teacher
from pipeline.config import Config, StageConfig, load
from pipeline.recipe_file import read_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_limit=48", "data.dev_limit=24", "data.max_len=32", "teacher.optim.epochs=1",
        "teacher.optim.batch_size=16", "student.layers=2", "student.hidden=32", "student.heads=4",
        "student.ffn=64", "run.latency_min_s=0.2"]


def run_recipe(recipe: str, tmp_path: Path, glue_dir: Path, *extra: str) -> dict:
    base = make_tiny_teacher(tmp_path / "base", {"sst2": 2})
    cfg = load(REPO / "jobs/configs" / recipe, [e for e in extra if e.startswith("data.tasks=")])
    tree, _ = read_recipe(REPO / "jobs/configs" / recipe, Config, StageConfig)
    stages = len(tree["distill"]["stages"])  # before each_task copies
    one_epoch = [f"distill.stages.{i}.optim.epochs=1" for i in range(stages)]
    one_epoch += [f"distill.stages.{i}.optim.batch_size=16" for i in range(stages)]
    args = ["--config", f"jobs/configs/{recipe}", f"run.output_dir={tmp_path}/runs",
            f"cache.root={tmp_path}/cache", f"teacher.model={base}", f"data.glue_dir={glue_dir}",
            *TINY, *one_epoch, *extra]
    r = subprocess.run([sys.executable, "-m", "jobs.pipeline", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    report = json.loads((tmp_path / "runs" / cfg.run.name / "report.json").read_text())
    assert set(report["tasks"]) == set(cfg.data.tasks)
    for task, row in report["tasks"].items():
        assert row["student"] and row["teacher"], (task, row)
    return report


def test_mitkd_general_student_then_per_task(tmp_path, glue_dir):
    report = run_recipe("mitkd.yaml", tmp_path, glue_dir, "distill.stages.0.relation_heads=4")
    runs = tmp_path / "runs/mitkd/student"
    assert (runs / "stage0-general/model/raykd.json").is_file()  # the reusable general student
    for task in ("sst2", "mrpc", "stsb"):
        assert report["tasks"][task]["student_path"].endswith(f"finetune_{task}")


def test_mtdnn_kd_ensemble(tmp_path, glue_dir):
    report = run_recipe("mtdnn_kd.yaml", tmp_path, glue_dir, "teacher.ensemble_size=2",
                        "data.tasks=[sst2,stsb]", "student.init=uniform")
    members = sorted((tmp_path / "runs/mtdnn_kd/teacher/multitask-ensemble2").glob("member*"))
    assert len(members) == 2
    assert report["tasks"]["stsb"]["student"]["pearson"] == report["tasks"]["stsb"]["student"]["pearson"]


def test_mkd_bilstm_multitask_then_finetune(tmp_path, glue_dir):
    run_recipe("mkd_bilstm.yaml", tmp_path, glue_dir, "student.hidden=32", "student.lstm_hidden=16",
               "student.heads=1")


def test_mlkd_three_heads(tmp_path, glue_dir):
    report = run_recipe("mlkd.yaml", tmp_path, glue_dir, "student.heads=2")
    assert report["student"]["heads"] == 2


def test_ensemble_soft_target_is_mean_of_member_probabilities(tmp_path, glue_dir, ray_local):
    import numpy as np
    import torch

    from pipeline import data
    from pipeline.batching import collate_inputs
    from pipeline.cache.build import ensure_cache
    from pipeline.cache.reader import read_cache
    from pipeline.encoder import EncoderClassifier
    from pipeline.evaluate import bf16_supported

    members = [make_tiny_teacher(tmp_path / f"m{i}", {"sst2": 2}, seed=i) for i in range(3)]
    cfg = load(None, [f"cache.root={tmp_path}/cache", f"data.glue_dir={glue_dir}",
                      "data.train_limit=40", "cache.rows_per_shard=16"])
    key = ensure_cache(cfg, members, "sst2", "train", ["logits"])
    cached = read_cache(cfg.cache.root, key, ["logits"])
    rows = {int(e): i for i, e in enumerate(cached.column("example_id").to_numpy())}
    probs = np.stack(cached.column("probs").to_numpy(zero_copy_only=False))
    member_logits = np.stack(cached.column("member_logits").to_numpy(zero_copy_only=False))

    from transformers import AutoTokenizer
    table = data.load_tokenized(cfg.data, "sst2", "train", AutoTokenizer.from_pretrained(str(members[0])))
    b = collate_inputs(table)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                         enabled=bf16_supported(torch.device("cpu"))):  # as the writer
        direct = [EncoderClassifier.load(m).eval()(b["input_ids"], b["attention_mask"],
                                                   b["token_type_ids"], "sst2").logits.float()
                  for m in members]
    expected = torch.stack(direct).softmax(-1).mean(0).numpy()
    order = [rows[int(e)] for e in b["example_id"]]
    np.testing.assert_allclose(probs[order], expected, atol=2e-2)
    # the soft target is the mean of probabilities, not the softmax of the mean logit
    by_member = member_logits[order].reshape(len(order), 3, 2)
    mean_probs = torch.from_numpy(by_member).softmax(-1).mean(1).numpy()
    np.testing.assert_allclose(probs[order], mean_probs, atol=1e-5)
