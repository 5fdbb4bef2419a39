"""Shared command line for every job: --config FILE, --address, dotted key=value overrides."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Callable

from pipeline.config import Config, load, replace, save
from pipeline.errors import ConfigError, RaykdError


def parse(description: str, argv: list[str] | None = None,
          extra: Callable[[argparse.ArgumentParser], None] | None = None
          ) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Overrides use the config's dotted keys, e.g. teacher.optim.lr=3e-5 "
               "data.train_limit=2000 distill.stages.0.optim.epochs=2 ray.num_workers=2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (jobs/configs/*.yaml); default: built-in defaults")
    parser.add_argument("--address", default="", help="Ray cluster address (default: $RAY_ADDRESS, "
                        "else a local Ray on 127.0.0.1)")
    if extra:
        extra(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    return absolute_outputs(load(args.config, args.overrides)), args


def absolute_outputs(cfg: Config) -> Config:
    """run.output_dir, run.storage_path, cache.root and teacher.dir as absolute paths (URIs
    unchanged), so the driver and the workers on every node mean the same place whatever their
    working directory."""
    relative = {key: value for key, value in (("run.output_dir", cfg.run.output_dir),
                                              ("run.storage_path", cfg.run.storage_path),
                                              ("cache.root", cfg.cache.root), ("teacher.dir", cfg.teacher.dir))
                if value and "://" not in value and not os.path.isabs(value)}
    return replace(cfg, {k: os.path.abspath(v) for k, v in relative.items()}) if relative else cfg


def check_outputs_kept(cfg: Config, keys: tuple[str, ...]) -> None:
    """In a job submitted with a working dir, the cwd is Ray's temporary copy of that dir on the
    head node: refuse outputs there (they would not land where the job was submitted from)."""
    if not _in_submitted_working_dir():
        return
    cwd = os.getcwd()
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if "://" not in value and os.path.commonpath([cwd, value]) == cwd:
            uri = " or a URI (s3://bucket/cache)" if key == "cache.root" else ""
            raise ConfigError(
                f"{key}={value} is inside this job's temporary copy of the working dir ({cwd}), "
                "which Ray may delete once the job ends; pass a path every node shares, e.g. "
                f"{key}=/shared/{os.path.relpath(value, cwd)}{uri}")


def _in_submitted_working_dir() -> bool:
    """True in the driver of a `ray job submit --working-dir ...` job (Ray sets this variable)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")
    try:
        return bool(raw and json.loads(raw).get("runtime_env", {}).get("working_dir"))
    except ValueError:
        return False


def main(run: Callable[[Config, argparse.Namespace], None], description: str,
         extra: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Parse, run, and turn our errors into one clear line and exit code 2."""
    try:
        cfg, args = parse(description, extra=extra)
        run(cfg, args)
    except RaykdError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # Ray wraps worker errors; surface ours plainly
        cause = _our_error(e)
        if cause is None:
            traceback.print_exc()
            sys.exit(1)
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def _our_error(e: BaseException) -> BaseException | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RaykdError):
            return e
        e = e.__cause__ or e.__context__
    return None


def save_resolved(cfg: Config, run_dir, outputs: tuple[str, ...] = ("run.output_dir", "cache.root")) -> None:
    """Every run keeps the exact config it ran with (after checking its `outputs` will be kept,
    Ray Train's checkpoints in run.storage_path too)."""
    check_outputs_kept(cfg, outputs + (("run.storage_path",) if cfg.run.storage_path else ()))
    run_dir.mkdir(parents=True, exist_ok=True)
    save(cfg, run_dir / "config.yaml")
