"""A student's recipe, stage by stage: find the cache, build the student, fit, hand on.

Each stage starts from the previous stage's best student. Cached distillation reads the
teacher's outputs from the cache (the teacher is never loaded); `distill.online=true` runs the
teacher in the loop instead, with the same losses.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from pipeline import data
from pipeline.cache.build import CacheRequest, ensure_cache, request, run_fields
from pipeline.cache.key import cache_key, check_fields
from pipeline.cache.reader import columns_of
from pipeline.train_data import cache_source, table_source
from pipeline.config import Config, to_dict
from pipeline.distill import finished, fit_all, run_spec
from pipeline.errors import ConfigError
from pipeline.objective import check_stage, make_plan, teacher_quantities
from pipeline.teacher import base_model_path, run_dir


def student_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "student"


def train_split(stage) -> str:
    """The split a stage trains on: the train rows, or them and their augmented copies."""
    return data.AUGMENTED if stage.augmented else "train"


def cache_for(cfg: Config, teachers: list[Path], task: str, split: str, quantities: list[str],
              build: bool) -> str:
    """Key of the train cache holding `quantities`; built if `build`, else it must exist."""
    if build:
        return ensure_cache(cfg, teachers, task, split, quantities)
    fields, _ = run_fields(cfg, teachers, task, split)
    key = cache_key(fields)
    check_fields(cfg.cache.root, key, fields)
    return key  # reading it (train_data.cache_source) names any missing quantity


def cache_needs(cfg: Config, teacher: Path) -> dict[tuple[str, str], list[str]]:
    """Quantities each (task or unlabeled text, training split) needs over the recipe's stages."""
    if cfg.distill.online:
        return {}
    t_cfg = AutoConfig.from_pretrained(str(teacher))
    needs: dict[tuple[str, str], list[str]] = {}
    for stage in cfg.distill.stages:
        quantities = teacher_quantities(make_plan(stage, cfg.student.layers, t_cfg.num_hidden_layers))
        for task in [data.UNLABELED] if stage.unlabeled else (stage.tasks or cfg.data.tasks):
            if quantities:
                have = needs.setdefault((task, train_split(stage)), [])
                have += [q for q in quantities if q not in have]
    return needs


def required_quantities(cfg: Config, teacher: Path) -> list[str]:
    """Everything the recipe's stages read from the cache, over all tasks."""
    out: list[str] = []
    for quantities in cache_needs(cfg, teacher).values():
        out += [q for q in quantities if q not in out]
    return out


def cache_requests(cfg: Config, teachers_by_task: dict[str, list[Path]]) -> list[CacheRequest]:
    """Exactly what the recipe's stages read from the train caches, per task (for
    `ensure_caches`, which computes only the missing quantities)."""
    first = teachers_by_task[cfg.data.tasks[0]]
    return [request(teachers_by_task.get(task, first), task, split, quantities)
            for (task, split), quantities in cache_needs(cfg, first[0]).items()]


def check_stages(cfg: Config, teacher_config) -> None:
    """Every stage fits the student and a teacher of this shape (HF config); clear errors."""
    for stage in cfg.distill.stages:
        check_stage(stage, cfg.student.arch, cfg.student.heads, cfg.student.hidden,
                    teacher_config.num_attention_heads, teacher_config.hidden_size)


def distill_student(cfg: Config, teachers_by_task: dict[str, list[Path]], *,
                    build_cache: bool = False, callbacks: tuple = (), retries: int = 2) -> Path:
    """Run every stage of cfg.distill; returns the final student folder (model + metrics).

    teachers_by_task: the teacher folder(s) (ensemble members) whose outputs each task reads.
    callbacks: Ray Train callbacks passed to every stage's trainer (sweeps forward reports to Tune).
    retries: Ray Train worker-group restarts after a failure (see distill.fit_all).
    """
    teacher = teachers_by_task[cfg.data.tasks[0]][0]
    t_cfg = AutoConfig.from_pretrained(str(teacher))
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    source = str(teacher) if cfg.student.init_from == "teacher" else base_model_path(cfg)
    spec: dict = {"kind": "student", "student": to_dict(cfg.student), "source": source,
                  "pair_tasks": [t for t in cfg.data.tasks if data.task_of(cfg.data, t).is_pair]}
    check_stages(cfg, t_cfg)  # fail before any cache or training work
    others = {t: [str(p) for p in teachers_by_task[t]] for t in cfg.data.tasks
              if [Path(p) for p in teachers_by_task[t]] != [Path(teacher)]}
    if cfg.distill.online and others:
        raise ConfigError("distill.online=true runs one teacher folder in the loop for every task; "
                          f"these tasks have other teachers or an ensemble: {others}. "
                          "Use the cache (distill.online=false) for per-task teachers and ensembles")
    out = student_dir(cfg)
    heads = {t: data.task_of(cfg.data, t).num_outputs for t in cfg.data.tasks}
    done: dict[str, dict] = {}  # stage name -> spec of its best student
    final_by_task: dict[str, str] = {}
    runs, folders = [], []
    for i, stage in enumerate(cfg.distill.stages):
        folder = out / f"stage{i}-{stage.name}"
        folders.append(folder)
        start = done[stage.from_stage] if stage.from_stage else spec
        spec = {"kind": "folder", "path": str(folder / "model")}
        done[stage.name] = spec
        train_tasks = [data.UNLABELED] if stage.unlabeled else list(stage.tasks or cfg.data.tasks)
        final_by_task |= {t: str(folder) for t in train_tasks if t != data.UNLABELED}
        if finished(folder):
            print(f"[raykd] {folder} finished earlier; reusing it", flush=True)
            continue
        plan = make_plan(stage, cfg.student.layers, t_cfg.num_hidden_layers)
        quantities = teacher_quantities(plan)
        info, sources, columns = {}, {}, {}
        for task in train_tasks:
            teachers = teachers_by_task.get(task, teachers_by_task[cfg.data.tasks[0]])
            if cfg.distill.online or not quantities:
                train = data.load_tokenized(cfg.data, task, train_split(stage), tokenizer)
                sources[f"train:{task}"] = table_source(train)
            else:
                key = cache_for(cfg, teachers, task, train_split(stage), quantities, build_cache)
                sources[f"train:{task}"] = source = cache_source(cfg.cache.root, key, quantities)
                columns[task] = columns_of(source.sets())
            info[task] = {"kind": "unlabeled", "num_outputs": 0, "metric": None}
            if task != data.UNLABELED:
                t = data.task_of(cfg.data, task)
                sources[f"dev:{task}"] = table_source(data.load_tokenized(cfg.data, task, "dev", tokenizer))
                info[task] |= {"kind": t.kind, "num_outputs": t.num_outputs, "metric": t.metrics[0]}
        online = {"kind": "folder", "path": str(teacher)} if cfg.distill.online and quantities else None
        label = f"student stage {i} ({stage.name})"
        print(f"[raykd] {label} on {train_tasks}"
              f"{f' + {cfg.data.augment.copies} augmented copies per row' if stage.augmented else ''}: "
              f"losses {stage.losses}, "
              f"{'online teacher' if online else 'cached ' + str(quantities)}", flush=True)
        runs.append(run_spec(stage, start, info, sources, folder, teacher_layers=t_cfg.num_hidden_layers,
                             teacher_width=t_cfg.hidden_size, seed=cfg.run.seed,
                             cache_columns=columns or None, online_teacher=online, heads=heads,
                             label=label))
    fit_all(cfg, runs, out / "stages", callbacks=callbacks, retries=retries)  # all stages in one Ray Train run
    for folder in folders:
        if not (folder / "model" / "tokenizer_config.json").is_file():
            tokenizer.save_pretrained(folder / "model")
    final = Path(spec["path"]).parent
    (out / "final.json").write_text(json.dumps({"student": str(final), "by_task": final_by_task},
                                               indent=2))
    return final


def final_students(cfg: Config) -> dict[str, Path]:
    """Per task, the folder of the last stage that trained on it (after distill_student)."""
    record = json.loads((student_dir(cfg) / "final.json").read_text())
    return {t: Path(p) for t, p in record["by_task"].items()}


