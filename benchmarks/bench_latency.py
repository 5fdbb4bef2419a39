"""Student vs teacher inference latency, timed in alternating rounds (this shared VM's speed
drifts over minutes, so timing one model after the other can favour either): per round, each
model at batch 1 and 64, fp32 and (where the CPU has it natively) bf16, with the same timer the run reports use
(`pipeline.evaluate.latency`). Prints the median speed-up per setting (target: >= 1.8x at batch 64).

  python -m benchmarks.bench_latency --teacher runs/sst2/teacher/sst2 [--students 3x384,2x192]
      [--seq-len 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics

from benchmarks.bench_distill import STUDENTS
from pipeline import models
from pipeline.config import load
from pipeline.encoder import EncoderClassifier
from pipeline.evaluate import amp_choices, latency


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--teacher", required=True, help="a trained teacher folder (any task)")
    ap.add_argument("--students", default="3x384", help=f"comma-separated, of {', '.join(STUDENTS)}")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-s", type=float, default=1.0, help="seconds per timing")
    args = ap.parse_args()
    unknown = set(args.students.split(",")) - set(STUDENTS)
    if unknown:
        ap.error(f"--students: unknown {sorted(unknown)}; choose from {', '.join(STUDENTS)}")
    teacher = EncoderClassifier.load(args.teacher)
    task = next(iter(teacher.tasks))
    nets = {"teacher": teacher}
    for name in args.students.split(","):
        cfg = load(None, STUDENTS[name])
        nets[name] = models.transformer_student(cfg.student, args.teacher, dict(teacher.tasks))
    settings = [(bs, amp) for bs in (1, 64) for amp in amp_choices()]  # emulated bf16: ~100x slower
    ms: dict[tuple, list[float]] = {}
    for r in range(args.rounds):
        for bs, amp in settings:
            for name, net in nets.items():  # the teacher and its students back to back
                t = latency(net, args.seq_len, bs, amp, task, min_time_s=args.min_s)["ms"]
                ms.setdefault((name, bs, amp), []).append(t)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    print(f"\n== latency, seq_len {args.seq_len}, median of {args.rounds} alternating rounds ==")
    for bs, amp in settings:
        t = statistics.median(ms[("teacher", bs, amp)])
        line = f"bs{bs:<3d}{'bf16' if amp else 'fp32'}: teacher {t:7.2f} ms"
        for name in nets:
            if name != "teacher":
                s = statistics.median(ms[(name, bs, amp)])
                ratios = [a / b for a, b in zip(ms[("teacher", bs, amp)], ms[(name, bs, amp)])]
                line += (f" | {name} {s:7.2f} ms, {t / s:.2f}x faster (per round "
                         + "/".join(f"{x:.2f}" for x in ratios) + ")")
        print(line)


if __name__ == "__main__":
    main()
