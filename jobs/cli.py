"""Shared command line for every job: --config FILE, --address, dotted key=value overrides."""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable

from pipeline.config import Config, load, save
from pipeline.errors import RaykdError


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
    return load(args.config, args.overrides), args


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


def save_resolved(cfg: Config, run_dir) -> None:
    """Every run keeps the exact config it ran with."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save(cfg, run_dir / "config.yaml")
