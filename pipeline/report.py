"""The student report: size, dev metrics, agreement with the teacher, latency vs the teacher."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline import data, evaluate, models
from pipeline.batching import collate_inputs
from pipeline.cache.reader import read_cache
from pipeline.config import Config
from pipeline.tasks import compute_metrics


def dev_batches(table, batch_size: int = 128):
    for i in range(0, len(table), batch_size):
        yield collate_inputs(table.slice(i, batch_size))


def build_report(cfg: Config, students: dict[str, Path], teachers: dict[str, Path],
                 dev_cache_keys: dict[str, str], tokenizer, latency_seq_len: int = 64,
                 min_time_s: float = 1.0) -> dict:
    """Per task: the task's final student (`<folder>/model`) against its teacher folder."""
    cpu = torch.device("cpu")
    report: dict = {"tasks": {}}
    for task in cfg.data.tasks:
        t = data.task_of(cfg.data, task)
        student = models.load_model(students[task] / "model")
        dev = data.load_tokenized(cfg.data, task, "dev", tokenizer)
        s_out, labels, ids = evaluate.predict(student, dev_batches(dev), task, cpu,
                                              amp=evaluate.bf16_supported(cpu))
        cached = read_cache(cfg.cache.root, dev_cache_keys[task], ["logits"])
        t_logits = np.stack(cached.column("logits").to_numpy(zero_copy_only=False))
        order = {int(e): i for i, e in enumerate(cached.column("example_id").to_numpy())}
        t_out = t_logits[[order[int(e)] for e in ids]]
        report["tasks"][task] = {
            "student": compute_metrics(t, s_out, labels), "teacher": compute_metrics(t, t_out, labels),
            "agreement": evaluate.agreement(s_out, t_out), "student_path": str(students[task])}
    first = cfg.data.tasks[0]
    student = models.load_model(students[first] / "model")
    teacher = models.load_model(teachers[first])
    report["student"] = {**models.describe(student), "path": str(students[first])}
    report["teacher"] = {**models.describe(teacher), "path": str(teachers[first])}
    lat_s = evaluate.latency_table(student, latency_seq_len, first, min_time_s=min_time_s)
    lat_t = evaluate.latency_table(teacher, latency_seq_len, first, min_time_s=min_time_s)
    report["latency_ms"] = {"seq_len": latency_seq_len, "student": lat_s, "teacher": lat_t,
                            "speedup": {k: lat_t[k] / lat_s[k] for k in lat_s}}
    report["params_ratio"] = report["student"]["params"] / report["teacher"]["params"]
    return report


def write_report(report: dict, folder: Path) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Student report\n", f"student: {report['student']}", f"teacher: {report['teacher']}",
             f"params ratio: {report['params_ratio']:.3f}", ""]
    for task, r in report["tasks"].items():
        lines.append(f"{task}: student {fmt(r['student'])} | teacher {fmt(r['teacher'])} | "
                     f"agreement {r['agreement']:.1f}%")
    lat = report["latency_ms"]
    lines.append(f"\nlatency (ms, seq_len {lat['seq_len']}):")
    for k in lat["student"]:
        lines.append(f"  {k}: student {lat['student'][k]:.2f}  teacher {lat['teacher'][k]:.2f}  "
                     f"speed-up {lat['speedup'][k]:.2f}x")
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in metrics.items())


class RunClock:
    """Wall time of a run folder summed over every invocation of the job that filled it: a run
    resumed after a crash, or a rerun that only rebuilt the report, adds its own time to the
    earlier ones' (`wall_time.json`: one entry per invocation). Used as a context manager, it
    records this invocation's time every `every_s` and on exit, so a killed job loses at most
    `every_s` of it."""

    FILE = "wall_time.json"

    def __init__(self, folder: Path, every_s: float = 30.0):
        import threading
        import time

        self.path, self._now, self.every_s = Path(folder) / self.FILE, time.perf_counter, every_s
        self.t0 = self._now()
        self.earlier = json.loads(self.path.read_text())["invocations_s"] if self.path.is_file() else []
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._thread = threading.Thread(target=self._tick, name="raykd-run-clock", daemon=True)

    def __enter__(self) -> "RunClock":
        self.lap()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.lap()

    def _tick(self) -> None:
        while not self._stop.wait(self.every_s):
            self.lap()

    def lap(self) -> float:
        """Record this invocation's time so far; return the total over all invocations."""
        with self._lock:
            mine = round(self._now() - self.t0, 1)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"invocations_s": self.earlier + [mine]}))
            tmp.replace(self.path)
            return round(sum(self.earlier) + mine, 1)

    @property
    def invocations(self) -> int:
        return len(self.earlier) + 1
