"""Sweep student size, head count and loss weights with Ray Tune; every trial reads one cache.

  python -m jobs.sweep --config jobs/configs/sweep_sst2.yaml [--no-build-cache] [key=value ...]
The teacher must be trained (jobs.teacher, or teacher.path). The cache is built once up front
(unless --no-build-cache); trials never load the teacher. Rerunning the same command resumes an
interrupted sweep without repeating finished trials. Results in <run dir>/sweep_results/:
trials.parquet/.csv, pareto.png, summary.json, export/<best|constraint>/<task>/.
"""
import os

from jobs.cli import main, save_resolved
from pipeline.config import replace
from pipeline.sweep import run_sweep
from pipeline.teacher import run_dir


def options(parser) -> None:
    parser.add_argument("--no-build-cache", action="store_true",
                        help="fail, naming the cache and the command that builds it, if it is missing")


def run(cfg, args) -> None:
    outputs = ("run.output_dir", "cache.root")
    if cfg.sweep.storage_path:  # "" = <run dir>/sweep
        outputs += ("sweep.storage_path",)
        if "://" not in cfg.sweep.storage_path:
            cfg = replace(cfg, {"sweep.storage_path": os.path.abspath(cfg.sweep.storage_path)})
    save_resolved(cfg, run_dir(cfg), outputs)
    run_sweep(cfg, build_cache=not args.no_build_cache, address=args.address,
              config_path=args.config or "<recipe>")


if __name__ == "__main__":
    main(run, __doc__, options)
