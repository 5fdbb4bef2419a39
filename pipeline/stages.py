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
from pipeline.cache.build import ensure_cache, run_fields
from pipeline.cache.key import cache_key, check_fields
from pipeline.cache.reader import cache_dataset, columns_of, plan_sets
from pipeline.config import Config, to_dict
from pipeline.distill import fit
from pipeline.objective import make_plan, teacher_quantities
from pipeline.teacher import base_model_path, run_dir


def student_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "student"


def cache_for(cfg: Config, teachers: list[Path], task: str, quantities: list[str], build: bool) -> str:
    """Key of the train cache holding `quantities`; built if `build`, else it must exist."""
    if build:
        return ensure_cache(cfg, teachers, task, "train", quantities)
    fields, _ = run_fields(cfg, teachers, task, "train")
    key = cache_key(fields)
    check_fields(cfg.cache.root, key, fields)
    plan_sets(cfg.cache.root, key, quantities)  # clear error naming what is missing
    return key


def required_quantities(cfg: Config, teacher: Path) -> list[str]:
    """Everything the recipe's stages read from the cache (the pipeline caches exactly this)."""
    t_cfg = AutoConfig.from_pretrained(str(teacher))
    out: list[str] = []
    for stage in cfg.distill.stages:
        plan = make_plan(stage, cfg.student.layers, t_cfg.num_hidden_layers)
        out += [q for q in teacher_quantities(plan) if q not in out]
    return out


def distill_student(cfg: Config, teachers_by_task: dict[str, list[Path]], *,
                    build_cache: bool = False) -> Path:
    """Run every stage of cfg.distill; returns the final student folder (model + metrics).

    teachers_by_task: the teacher folder(s) (ensemble members) whose outputs each task reads.
    """
    teacher = teachers_by_task[cfg.data.tasks[0]][0]
    t_cfg = AutoConfig.from_pretrained(str(teacher))
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    source = str(teacher) if cfg.student.init_from == "teacher" else base_model_path(cfg)
    spec: dict = {"kind": "student", "student": to_dict(cfg.student), "source": source,
                  "pair_tasks": [t for t in cfg.data.tasks if data.task_of(cfg.data, t).is_pair]}
    out = student_dir(cfg)
    for i, stage in enumerate(cfg.distill.stages):
        folder = out / f"stage{i}-{stage.name}"
        if (folder / "metrics.json").is_file():
            print(f"[raykd] {folder} finished earlier; reusing it", flush=True)
            spec = {"kind": "folder", "path": str(folder / "model")}
            continue
        plan = make_plan(stage, cfg.student.layers, t_cfg.num_hidden_layers)
        quantities = teacher_quantities(plan)
        info, datasets, columns = {}, {}, {}
        for task in cfg.data.tasks:
            t = data.task_of(cfg.data, task)
            if cfg.distill.online or not quantities:
                train = data.load_tokenized(cfg.data, task, "train", tokenizer)
                datasets[f"train:{task}"], rows = data.to_ray(train), len(train)
            else:
                key = cache_for(cfg, teachers_by_task[task], task, quantities, build_cache)
                sets = plan_sets(cfg.cache.root, key, quantities)
                columns |= columns_of(sets)
                datasets[f"train:{task}"] = cache_dataset(cfg.cache.root, key, quantities)
                rows = sets[0][0].manifest["rows"]
            datasets[f"dev:{task}"] = data.to_ray(data.load_tokenized(cfg.data, task, "dev", tokenizer))
            info[task] = {"kind": t.kind, "num_outputs": t.num_outputs, "metric": t.metrics[0],
                          "train_rows": rows, "train_rows_per_worker": rows // cfg.ray.num_workers}
        online = {"kind": "folder", "path": str(teacher)} if cfg.distill.online and quantities else None
        print(f"[raykd] student stage {i} ({stage.name}): losses {stage.losses}, "
              f"{'online teacher' if online else 'cached ' + str(quantities)}", flush=True)
        fit(cfg, stage, spec, info, datasets, folder, teacher_layers=t_cfg.num_hidden_layers,
            teacher_width=t_cfg.hidden_size, cache_columns=columns or None, online_teacher=online)
        tokenizer.save_pretrained(folder / "model")
        spec = {"kind": "folder", "path": str(folder / "model")}
    final = Path(spec["path"]).parent
    (out / "final.json").write_text(json.dumps({"student": str(final)}, indent=2))
    return final


