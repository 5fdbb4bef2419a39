"""Augmented copies of a task's training rows, for distillation on a larger transfer set.

Small tasks (MRPC, RTE, CoLA, STS-B) leave a student few examples to match the teacher on. The
teacher can label any input, so distillation stages with `augmented: true` train on the rows
plus `data.augment.copies` perturbed copies of each, and learn the teacher's outputs on them
(never gold labels: a perturbed sentence may not keep its label). The rules are those of Tang
et al. 2019 ("Distilling task-specific knowledge from BERT into simple neural networks"), with
the part-of-speech-guided replacement simplified to a word drawn from the split's own words:
each word is masked with p `mask_p`, else replaced with p `replace_p`; then, with p `ngram_p`,
only a random n-gram (n in 1..max_ngram) of the text is kept. Pair tasks perturb each text.

Pure pandas/numpy; seeded, so the same config gives the same frame (and the same cache key).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.config import AugmentConfig

UNLABELED = -1  # the label of a copy: the hard loss must not use it (config forbids it)


def augment_frame(df: pd.DataFrame, cfg: AugmentConfig, seed_key: str = "") -> pd.DataFrame:
    """`df` (example_id, text_a, text_b, label) followed by up to `cfg.copies` copies of each row.

    Copy k (1-based) of the row with id e gets id e + k·(max id + 1), so ids stay unique and
    stable; a copy identical to its row or to an earlier copy is dropped. Copies are labelled
    UNLABELED. seed_key (e.g. the task name) varies the draws between tasks with one seed.
    """
    if cfg.copies == 0 or df.empty:
        return df
    rng = np.random.default_rng([cfg.seed, *seed_key.encode()])
    pair = bool((df["text_b"] != "").any())
    words_a = [t.split() for t in df["text_a"]]
    words_b = [t.split() for t in df["text_b"]] if pair else [[] for _ in words_a]
    pool = np.array([w for ws in words_a + words_b for w in ws] or [cfg.mask_token], dtype=object)
    stride = int(df["example_id"].max()) + 1
    ids, texts_a, texts_b = [], [], []
    for eid, wa, wb in zip(df["example_id"].to_numpy(), words_a, words_b):
        seen = {(" ".join(wa), " ".join(wb))}  # the row itself, whitespace normalised
        for k in range(1, cfg.copies + 1):
            text = (_perturb(wa, cfg, pool, rng), _perturb(wb, cfg, pool, rng) if pair else "")
            if text in seen:
                continue
            seen.add(text)
            ids.append(eid + k * stride)
            texts_a.append(text[0])
            texts_b.append(text[1])
    label = np.full(len(ids), UNLABELED, dtype=df["label"].to_numpy().dtype)
    copies = pd.DataFrame({"example_id": np.asarray(ids, dtype=np.int64), "text_a": texts_a,
                           "text_b": texts_b, "label": label})
    return pd.concat([df, copies], ignore_index=True)


def _perturb(words: list[str], cfg: AugmentConfig, pool: np.ndarray, rng: np.random.Generator) -> str:
    """One perturbed copy of a text (its words): mask / replace per word, then maybe an n-gram."""
    if not words:
        return ""
    draw = rng.random(len(words))
    out = [cfg.mask_token if d < cfg.mask_p else
           pool[rng.integers(len(pool))] if d < cfg.mask_p + cfg.replace_p else w
           for w, d in zip(words, draw)]
    if len(out) > 1 and rng.random() < cfg.ngram_p:
        n = int(rng.integers(1, min(cfg.max_ngram, len(out) - 1) + 1))
        start = int(rng.integers(0, len(out) - n + 1))
        out = out[start:start + n]
    return " ".join(out)
