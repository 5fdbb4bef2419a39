"""The whole pipeline on one config: teacher -> cache -> distilled student -> export -> report.

  python -m jobs.pipeline [--config FILE] [key=value ...]
Default: MiniLM-L6 teacher fine-tuned on SST-2, its outputs cached, a 3-layer student distilled.
Every step reuses finished work, so rerunning after an interruption resumes.
"""
from transformers import AutoConfig, AutoTokenizer

from jobs.cli import main, save_resolved
from pipeline import data, models
from pipeline.cache.build import ensure_caches, request
from pipeline.export import export_student
from pipeline.ray_runtime import init_ray
from pipeline.report import RunClock, build_report, write_report
from pipeline.stages import cache_requests, check_stages, distill_student, final_students
from pipeline.teacher import base_model_path, run_dir, teachers_by_task, train_teachers


def run(cfg, args) -> None:
    out = run_dir(cfg)
    save_resolved(cfg, out)
    with RunClock(out) as clock:  # a resumed run's time adds up over its invocations
        _steps(cfg, args, out, clock)


def _steps(cfg, args, out, clock: RunClock) -> None:
    check_stages(cfg, AutoConfig.from_pretrained(cfg.teacher.path or base_model_path(cfg)))
    data.check_available(cfg.data)  # before Ray: a missing file fails in seconds
    init_ray(cfg.ray, args.address)
    print(f"[raykd] 1/4 teacher(s) for {list(cfg.data.tasks)}", flush=True)
    if cfg.teacher.ensemble_size == 1 and any("soft_ce" in s.losses for s in cfg.distill.stages):
        print("[raykd] warning: soft_ce against an ensemble of 1 is plain soft-target distillation "
              "(MT-DNN-KD wants teacher.ensemble_size >= 2)", flush=True)
    teachers = teachers_by_task(cfg, train_teachers(cfg))
    first = teachers[cfg.data.tasks[0]][0]
    print("[raykd] 2/4 cache: what the recipe's stages read, plus dev logits for the report", flush=True)
    dev = [request(folders, task, "dev", ["logits"]) for task, folders in teachers.items()]
    train = cache_requests(cfg, teachers)
    for r in train:
        print(f"[raykd] cache for {r.task} ({r.split}): {list(r.quantities)}", flush=True)
    keys = ensure_caches(cfg, dev + train)  # one cache job for all of them
    dev_keys = dict(zip(teachers, keys[:len(dev)]))
    print("[raykd] 3/4 student", flush=True)
    distill_student(cfg, teachers)
    students = final_students(cfg)
    print("[raykd] 4/4 export and report", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(first))
    exported = [p for t in cfg.data.tasks for p in export_student(
        models.load_model(students[t] / "model"), [data.task_of(cfg.data, t)], first, out / "export")]
    report = build_report(cfg, students, {t: f[0] for t, f in teachers.items()}, dev_keys, tokenizer,
                          min_time_s=cfg.run.latency_min_s)
    report["wall_time_s"] = clock.lap()  # every invocation of this run, not just this one
    report["invocations"] = clock.invocations
    report["export"] = [str(p) for p in exported]
    write_report(report, out)
    print(f"[raykd] done in {report['wall_time_s']:.0f} s"
          + (f" over {clock.invocations} invocations" if clock.invocations > 1 else "")
          + f"; report: {out / 'report.md'}", flush=True)


if __name__ == "__main__":
    main(run, __doc__)
