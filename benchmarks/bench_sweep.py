"""What a sweep costs besides training, and what ASHA saves, measured on this machine.

The same space and seed are swept twice, with ASHA and with every trial run to the end (FIFO);
the random searcher draws the same configurations in the same order both times. Reported:
  overhead per trial : trial start -> its first optimizer step (Ray Train start-up, data, model)
  training fraction  : sum over trials of (first step -> last report, per stage) divided by
                       the Tune wall time x the trials run at once
  ASHA vs FIFO       : Tune wall time saved, best finished metric of each, same best config?
The cache is built once before both sweeps (not counted); each sweep's Tune run is timed alone.

  python -m benchmarks.bench_sweep [--samples 6]      # tiny: random teacher, synthetic SST-2-format task
  python -m benchmarks.bench_sweep --config jobs/configs/sweep_sst2.yaml [key=value ...]   # real, slow
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd

from pipeline.config import load
from pipeline.sweep import run_sweep, sweep_dirs

TINY = "jobs/configs/sweep_tiny.yaml"


def tiny_setup(root: Path) -> list[str]:
    """A random 2-layer teacher, a random 'pretrained' base and the synthetic task, under root."""
    from tests.conftest import make_tiny_teacher
    from tests.test_sweep import write_toy_glue

    write_toy_glue(root / "glue")
    teacher = make_tiny_teacher(root / "teacher", {"sst2": 2}, seed=0)
    base = make_tiny_teacher(root / "base", {}, seed=1)
    return [f"teacher.path={teacher}", f"teacher.model={base}", f"data.glue_dir={root}/glue",
            f"cache.root={root}/cache", f"run.output_dir={root}/runs"]


def measure(config: str, overrides: list[str], scheduler: str) -> dict:
    cfg = load(config, overrides + [f"sweep.scheduler={scheduler}", "sweep.searcher=random",
                                    f"run.name=bench_{scheduler}"])
    summary = run_sweep(cfg)
    table = pd.read_parquet(Path(sweep_dirs(cfg)["results"]) / "trials.parquet")
    metric = cfg.sweep.metric
    done = table[table["status"] == "finished"]
    best = done.sort_values(metric, ascending=cfg.sweep.mode == "min").iloc[0]
    return {
        "trials": len(table), "stopped_early": int((table["status"] == "stopped early").sum()),
        "epochs_trained": int(table["epochs"].sum()), "tune_s": summary["tune_s"],
        "concurrency": summary["concurrency"],
        "startup_s_median": float(table["startup_s"].median()), "startup_s_max": float(table["startup_s"].max()),
        "train_s_sum": float(table["train_s"].sum()),
        "training_fraction": float(table["train_s"].sum() / (summary["tune_s"] * summary["concurrency"])),
        "metric": metric, "best": float(best[metric]),
        "best_config": {k: best[k].item() if hasattr(best[k], "item") else best[k] for k in cfg.sweep.space},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="", help=f"sweep recipe (default: {TINY} on a generated tiny setup)")
    ap.add_argument("--samples", type=int, default=6, help="trials per sweep")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    overrides = (tiny_setup(root) if not args.config else []) + [f"sweep.num_samples={args.samples}"]
    overrides += args.overrides
    config = args.config or TINY
    out = {s: measure(config, overrides, s) for s in ("asha", "fifo")}
    a, f = out["asha"], out["fifo"]
    metric = a["metric"]
    out["asha_vs_fifo"] = {"tune_time_saved": 1 - a["tune_s"] / f["tune_s"],
                           "epochs_saved": 1 - a["epochs_trained"] / f["epochs_trained"],
                           "same_best_metric": a["best"] == f["best"],
                           "same_best_config": a["best_config"] == f["best_config"]}
    print(f"\n== sweep benchmark: {a['trials']} trials per sweep, {a['concurrency']} at a time ==")
    for name, r in (("ASHA", a), ("FIFO", f)):
        print(f"{name}: Tune wall {r['tune_s']:.0f} s, {r['epochs_trained']} epochs trained, "
              f"{r['stopped_early']} stopped early, best {metric} {r['best']:.2f} with {r['best_config']}")
        print(f"      overhead per trial (start -> first step): median {r['startup_s_median']:.1f} s, "
              f"max {r['startup_s_max']:.1f} s; training fraction {r['training_fraction'] * 100:.0f}%")
    v = out["asha_vs_fifo"]
    print(f"ASHA vs FIFO: {v['tune_time_saved'] * 100:.0f}% Tune wall time and {v['epochs_saved'] * 100:.0f}% "
          f"of epochs saved; same best {metric}: {v['same_best_metric']}; same best config: {v['same_best_config']}")
    (root / "bench_sweep.json").write_text(json.dumps(out, indent=2, default=str))
    print(f"raw numbers: {root / 'bench_sweep.json'}")


if __name__ == "__main__":
    main()
