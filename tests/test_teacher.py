"""Teacher training on Ray Train with tiny models: multi-task heads, ensembles, reuse."""
import json

from pipeline.config import load
from pipeline.encoder import EncoderClassifier, read_meta
from pipeline.teacher import existing_teachers, teachers_by_task, train_teachers


def tiny_cfg(tmp_path, tiny_teacher, glue_dir, *extra):
    return load(None, [f"run.output_dir={tmp_path}", f"teacher.model={tiny_teacher}",
                       f"data.glue_dir={glue_dir}", "data.train_limit=48", "data.dev_limit=24",
                       "teacher.optim.epochs=1", "teacher.optim.batch_size=16", "data.max_len=32",
                       *extra])


def test_multitask_ensemble_teacher(tmp_path, tiny_teacher, glue_dir, ray_local):
    cfg = tiny_cfg(tmp_path, tiny_teacher, glue_dir, "teacher.mode=multitask",
                   "data.tasks=[sst2,stsb]", "teacher.ensemble_size=2")
    groups = train_teachers(cfg)
    members = groups["multitask"]
    assert [m.name for m in members] == ["member0", "member1"]
    metas = [read_meta(m) for m in members]
    assert metas[0]["fingerprint"] != metas[1]["fingerprint"]  # members differ (seed, dropout)
    for m, meta in zip(members, metas):
        assert meta["tasks"] == {"sst2": 2, "stsb": 1}
        metrics = json.loads((m / "metrics.json").read_text())
        assert {"sst2/accuracy", "stsb/pearson", "stsb/spearman", "dev_main"} <= set(metrics)
        model = EncoderClassifier.load(m)
        assert set(model.heads) == {"sst2", "stsb"}
        assert (m / "tokenizer.json").is_file()
    assert teachers_by_task(cfg, existing_teachers(cfg)) == {"sst2": members, "stsb": members}
    # both members trained in one Ray Train run (one placement group)
    assert len({json.loads((m / "metrics.json").read_text())["placement_group"] for m in members}) == 1
    # A second call reuses the finished folders (no retraining: the files stay untouched).
    stamp = (members[0] / "model.safetensors").stat().st_mtime_ns
    train_teachers(cfg)
    assert (members[0] / "model.safetensors").stat().st_mtime_ns == stamp


def test_custom_task_teacher_trains_and_reports_its_metric(tmp_path, tiny_teacher, glue_dir, ray_local):
    """A user-declared task (a CSV with its own column names) through the loop and dev evaluation."""
    import pandas as pd

    rows = [{"review": f"{w} film number {i}", "stars": s}
            for i in range(40) for w, s in (("great", "pos"), ("awful", "neg"))]
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(rows[:20]).to_csv(tmp_path / "dev.csv", index=False)
    decl = (f"data.custom_tasks=[{{name: reviews, text_columns: [text], label_column: label, "
            f"labels: [neg, pos], train_path: {tmp_path}/train.csv, dev_path: {tmp_path}/dev.csv, "
            "column_map: {text: review, label: stars}}]")
    cfg = tiny_cfg(tmp_path, tiny_teacher, glue_dir, decl, "data.tasks=[reviews]")
    folder = train_teachers(cfg)["reviews"][0]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0 <= metrics["reviews/accuracy"] <= 100 and metrics["dev_main"] == metrics["reviews/accuracy"]
