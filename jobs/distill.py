"""Distill a student from the cached teacher outputs on Ray Train.

  python -m jobs.distill [--config FILE] [key=value ...]
The teacher must be trained (jobs.teacher) and its outputs cached (jobs.cache), unless
distill.online=true (teacher in the loop). Use jobs.pipeline to do every step at once.
"""
from jobs.cli import main, save_resolved
from pipeline.data import check_available
from pipeline.ray_runtime import init_ray
from pipeline.stages import distill_student
from pipeline.teacher import existing_teachers, run_dir, teachers_by_task


def run(cfg, args) -> None:
    save_resolved(cfg, run_dir(cfg))
    teachers = teachers_by_task(cfg, existing_teachers(cfg))
    check_available(cfg.data)
    init_ray(cfg.ray, args.address)
    final = distill_student(cfg, teachers)
    print(f"[raykd] student: {final}", flush=True)


if __name__ == "__main__":
    main(run, __doc__)
