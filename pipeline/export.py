"""HF-format export: a Transformer student becomes one `BertForSequenceClassification`
folder per task (loadable by `AutoModelForSequenceClassification` and `transformers.pipeline`);
a BiLSTM student stays a documented torch module folder (see students/bilstm.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoTokenizer

from pipeline.encoder import EncoderClassifier, to_hf_classifier
from pipeline.tasks import Task


def export_student(model, tasks: list[Task], tokenizer_dir: str | Path, out: str | Path) -> list[Path]:
    """Write <out>/<task>/ for each task; returns the folders."""
    out = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    folders = []
    for task in tasks:
        folder = out / task.name
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(model, EncoderClassifier):
            to_hf_classifier(model, task.name, task.labels).save_pretrained(tmp)
        else:
            model.save(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        folders.append(folder)
    return folders
