"""The whole pipeline on one config: teacher -> cache -> distilled student -> export -> report.

  python -m jobs.pipeline [--config FILE] [key=value ...]
Default: MiniLM-L6 teacher fine-tuned on SST-2, its outputs cached, a 3-layer student distilled.
Every step reuses finished work, so rerunning after an interruption resumes.
"""
import time

from transformers import AutoTokenizer

from jobs.cli import main, save_resolved
from pipeline import data, models
from pipeline.cache.build import ensure_cache
from pipeline.export import export_student
from pipeline.ray_runtime import init_ray
from pipeline.report import build_report, write_report
from pipeline.stages import distill_student, required_quantities
from pipeline.teacher import run_dir, teachers_by_task, train_teachers


def run(cfg, args) -> None:
    t0 = time.perf_counter()
    out = run_dir(cfg)
    save_resolved(cfg, out)
    init_ray(cfg.ray, args.address)
    print(f"[raykd] 1/4 teacher(s) for {list(cfg.data.tasks)}", flush=True)
    teachers = teachers_by_task(cfg, train_teachers(cfg))
    first = teachers[cfg.data.tasks[0]][0]
    quantities = required_quantities(cfg, first)
    print(f"[raykd] 2/4 cache: {quantities or 'nothing (online or no teacher losses)'}", flush=True)
    dev_keys = {}
    for task, folders in teachers.items():
        if quantities and not cfg.distill.online:
            ensure_cache(cfg, folders, task, "train", quantities)
        dev_keys[task] = ensure_cache(cfg, folders, task, "dev", ["logits"])
    print("[raykd] 3/4 student", flush=True)
    final = distill_student(cfg, teachers)
    print("[raykd] 4/4 export and report", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(first))
    tasks = [data.task_of(cfg.data, t) for t in cfg.data.tasks]
    exported = export_student(models.load_model(final / "model"), tasks, first, out / "export")
    report = build_report(cfg, final, first, dev_keys, tokenizer)
    report["wall_time_s"] = round(time.perf_counter() - t0, 1)
    report["export"] = [str(p) for p in exported]
    write_report(report, out)
    print(f"[raykd] done in {report['wall_time_s']:.0f} s; report: {out / 'report.md'}", flush=True)


if __name__ == "__main__":
    main(run, __doc__)
