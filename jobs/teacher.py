"""Fine-tune teacher(s) on Ray Train: python -m jobs.teacher [--config FILE] [key=value ...]"""
from jobs.cli import main, save_resolved
from pipeline.data import check_available
from pipeline.ray_runtime import init_ray
from pipeline.teacher import run_dir, train_teachers


def run(cfg, args) -> None:
    save_resolved(cfg, run_dir(cfg), outputs=("run.output_dir",))  # no cache here
    check_available(cfg.data)
    init_ray(cfg.ray, args.address)
    for group, folders in train_teachers(cfg).items():
        for f in folders:
            print(f"[raykd] teacher {group}: {f}", flush=True)


if __name__ == "__main__":
    main(run, __doc__)
