"""Dev metrics and inference latency, for teachers and students alike (no Ray here)."""
from __future__ import annotations

import functools
import time
from typing import Iterable

import numpy as np
import torch
from torch import nn

from pipeline.tasks import Task, compute_metrics, get_task


@functools.cache
def cpu_bf16_native() -> bool:
    """This CPU multiplies bf16 natively (AMX tiles or AVX512-BF16). Elsewhere CPU autocast to
    bf16 still runs, but emulated: on an AVX2-only AMD EPYC a 1024² bf16 matmul ran at 0.9
    GFLOP/s against 87 in fp32, ~100x slower (an AMX Xeon: ~7x faster than fp32)."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def bf16_supported(device: torch.device) -> bool:
    """Autocast to bf16 pays on this device: a GPU with bf16, or a CPU with native bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_native()


def amp_choices(device: torch.device = torch.device("cpu")) -> tuple[bool, ...]:
    """Autocast settings worth timing here: bf16 and fp32 where bf16 is native, else fp32 only."""
    return (True, False) if bf16_supported(device) else (False,)


def fast_precision(device: torch.device = torch.device("cpu")) -> str:
    """The precision inference runs in here: "bf16" where it is native, else "fp32"."""
    return "bf16" if bf16_supported(device) else "fp32"


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], task: str,
            device: torch.device, amp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outputs [N, C], labels [N] and example ids [N] over collated batches."""
    was_training = model.training
    model.eval()
    outs, labels, ids = [], [], []
    for b in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats = model(b["input_ids"].to(device), b["attention_mask"].to(device),
                          b["token_type_ids"].to(device), task)
        outs.append(feats.logits.float().cpu().numpy())
        labels.append(b["labels"].numpy())
        ids.append(b["example_id"].numpy())
    model.train(was_training)
    return np.concatenate(outs), np.concatenate(labels), np.concatenate(ids)


def evaluate_task(model: nn.Module, batches, task: str | Task, kind: str, device: torch.device,
                  amp: bool, prefix: str = "", custom: dict | None = None) -> dict[str, float]:
    """Dev metrics of `task` (GLUE conventions, percent)."""
    t = task if isinstance(task, Task) else get_task(task, custom)
    outputs, labels, _ = predict(model, batches, t.name, device, amp)
    return {prefix + k: float(v) for k, v in compute_metrics(t, outputs, labels).items()}


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share (percent) of examples where two classifiers' argmax agree; for regression
    (one column) the Pearson correlation of the two score vectors."""
    if a.shape[-1] == 1:
        return float(np.corrcoef(a[:, 0], b[:, 0])[0, 1] * 100)
    return float((a.argmax(-1) == b.argmax(-1)).mean() * 100)


@torch.no_grad()
def latency(model: nn.Module, seq_len: int, batch_size: int, amp: bool, task: str | None = None,
            device: torch.device = torch.device("cpu"), min_time_s: float = 1.0,
            vocab_size: int = 1000) -> dict[str, float]:
    """Median ms per forward at (batch_size, seq_len), after warm-up; and examples/s."""
    model.eval().to(device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab_size, (batch_size, seq_len), generator=gen).to(device)
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)

    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model(ids, mask, types, task)

    for _ in range(3):
        run()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time_s or len(times) < 5:
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ms = float(np.median(times) * 1000)
    return {"ms": ms, "examples_per_s": batch_size / (ms / 1000)}


def latency_table(model: nn.Module, seq_len: int, task: str | None = None,
                  batch_sizes: tuple[int, ...] = (1, 64), min_time_s: float = 1.0) -> dict[str, float]:
    """Latency at batch 1 and 64, in fp32 and (where it is native) bf16: {"bs1_fp32_ms": ...,
    "bs1_bf16_ms": ..., ...}. Emulated bf16 is left out: ~100x slower, nobody would serve it."""
    out = {}
    for bs in batch_sizes:
        for amp in amp_choices():
            r = latency(model, seq_len, bs, amp, task, min_time_s=min_time_s)
            out[f"bs{bs}_{'bf16' if amp else 'fp32'}_ms"] = r["ms"]
    return out
