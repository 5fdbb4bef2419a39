"""The results table: teachers, the no-distillation baseline and every recipe on the GLUE tasks.

  python -m jobs.results --config jobs/configs/results.yaml [--rows a,b] [--table-only] [key=value ...]
Each row runs as ordinary `jobs.pipeline` runs under <run dir>/runs/, sharing trained teachers
(<run dir>/teachers/) and the teacher-output cache. Finished runs are reused, so rerunning the
command resumes and only runs what is missing. Writes results.output (RESULTS.md) with a CSV
of every run and a PNG of average metric vs latency beside it.
"""
import argparse
import os
import shlex
import sys

from jobs import pipeline as pipeline_job
from jobs.cli import absolute_outputs, main, save_resolved
from pipeline.config import replace
from pipeline.results import collect, run_all, runs_dir, summarize, write_outputs


def options(parser) -> None:
    parser.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument("--table-only", action="store_true", help="rebuild the table from finished runs")


def run(cfg, args) -> None:
    if "://" not in cfg.results.output:
        cfg = replace(cfg, {"results.output": os.path.abspath(cfg.results.output)})
    save_resolved(cfg, runs_dir(cfg))
    failed = []
    if not args.table_only:
        only = tuple(r for r in args.rows.split(",") if r)
        def run_one(run_cfg) -> None:  # one row's run: the pipeline job itself, in this process
            pipeline_job.run(absolute_outputs(run_cfg), argparse.Namespace(address=args.address))
        failed = run_all(cfg, run_one, only)
    records = collect(cfg)
    command = shlex.join(["python", "-m", "jobs.results", *(a for a in sys.argv[1:] if a != "--table-only")])
    write_outputs(cfg, records, summarize(cfg, records), command)
    if failed:
        print(f"error: {len(failed)} run(s) failed: {failed}; rerun the command to retry them", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(run, __doc__, options)
