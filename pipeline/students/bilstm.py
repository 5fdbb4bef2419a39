"""MKD's "attentive student": embeddings -> BiLSTM -> attention pooling -> a head per task.

It takes the teacher's inputs unchanged (BERT word pieces, `[CLS] a [SEP]` or
`[CLS] a [SEP] b [SEP]`, token_type_ids, right padding) and returns the same `Features` as
`EncoderClassifier`, so the one training loop drives both students with the logit losses.

Token choices, stated once: the leading `[CLS]` (position 0 of every row) is dropped and each
segment keeps its closing `[SEP]` as an end marker, so `a [SEP]` and `b [SEP]` are encoded the
same way and a swapped pair gives exactly the swapped vectors. A pair task splits each row into
segment a (token type 0) and b (token type 1), left-aligns each in its own tensor and runs both
through the same LSTM (siamese); `cls` is then `[h1; h2; h1*h2; |h1-h2|]`. An empty segment
(e.g. all padding) is run over a single pad token and pooled to the zero vector.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.encoder import Capture, Features
from pipeline.errors import ConfigError

CONFIG_FILE = "bilstm_config.json"
WEIGHTS_FILE = "model.safetensors"
README_FILE = "README.md"
LOGIT_LOSSES = "kd, soft_ce, logit_mse, hard"


@dataclass(frozen=True, kw_only=True)
class BiLSTMConfig:
    vocab_size: int  # the teacher's word-piece vocabulary size (same tokenizer)
    embed_dim: int  # token embedding width (the LSTM input)
    lstm_hidden: int  # hidden size per direction; the sentence vector is 2 * lstm_hidden wide
    layers: int = 1  # stacked BiLSTM layers
    dropout: float = 0.1  # on embeddings, between LSTM layers and inside each head
    pad_token_id: int = 0  # the tokenizer's [PAD] id (its embedding row stays zero)
    tasks: dict[str, int]  # task -> num_outputs (1 = regression); the first is the default
    pair_tasks: tuple[str, ...] = ()  # tasks whose inputs are sentence pairs (siamese encoding)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", {str(t): int(n) for t, n in self.tasks.items()})
        object.__setattr__(self, "pair_tasks", tuple(self.pair_tasks))
        for key in ("vocab_size", "embed_dim", "lstm_hidden", "layers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"BiLSTMConfig.{key}={getattr(self, key)} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"BiLSTMConfig.dropout={self.dropout} must be in [0, 1)")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"BiLSTMConfig.pad_token_id={self.pad_token_id} must be in "
                              f"[0, vocab_size={self.vocab_size}); use the tokenizer's pad id")
        if not self.tasks:
            raise ConfigError("BiLSTMConfig.tasks is empty; give task -> num_outputs, e.g. "
                              "{'sst2': 2, 'stsb': 1}")
        bad = {t: n for t, n in self.tasks.items() if n < 1}
        if bad:
            raise ConfigError(f"BiLSTMConfig.tasks {bad}: num_outputs must be >= 1 "
                              "(1 = regression)")
        unknown = [t for t in self.pair_tasks if t not in self.tasks]
        if unknown:
            raise ConfigError(f"BiLSTMConfig.pair_tasks {unknown} are not in tasks "
                              f"{list(self.tasks)}; add them to tasks or drop them")


class AttentionPool(nn.Module):
    """h = sum_t a_t h_t with a = masked softmax over real tokens of v . tanh(W h_t)."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.score = nn.Linear(width, 1, bias=False)

    def forward(self, seq: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """seq [B,T,D], real [B,T] bool (at least one True per row) -> [B,D]."""
        scores = self.score(torch.tanh(self.proj(seq))).squeeze(-1).float()
        scores = scores.masked_fill(~real, float("-inf"))
        alpha = torch.softmax(scores, dim=-1).to(seq.dtype)
        return torch.einsum("bt,btd->bd", alpha, seq)


class BiLSTMClassifier(nn.Module):
    """Shared embedding + BiLSTM + attention pooling, and a small MLP head per task."""

    def __init__(self, cfg: BiLSTMConfig):
        super().__init__()
        self.cfg = cfg
        self.tasks = dict(cfg.tasks)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.pad_token_id)
        self.dropout = nn.Dropout(cfg.dropout)
        # nn.LSTM applies its dropout only between layers (and warns when there is none)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.lstm_hidden, num_layers=cfg.layers,
                            batch_first=True, bidirectional=True,
                            dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.pool = AttentionPool(self.width)
        self.heads = nn.ModuleDict({
            task: nn.Sequential(nn.Linear(self._head_input(task), self.width), nn.Tanh(),
                                nn.Dropout(cfg.dropout), nn.Linear(self.width, n))
            for task, n in self.tasks.items()})

    @property
    def config(self) -> BiLSTMConfig:
        return self.cfg

    @property
    def num_layers(self) -> int:
        return self.cfg.layers

    @property
    def width(self) -> int:
        """Width of one sentence vector (a pair task's `cls` is 4x this)."""
        return 2 * self.cfg.lstm_hidden

    @property
    def num_heads(self) -> int:
        return 1

    def _head_input(self, task: str) -> int:
        return 4 * self.width if task in self.cfg.pair_tasks else self.width

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, task: str | None = None,
                capture: Capture = Capture()) -> Features:
        """input_ids, attention_mask, token_type_ids [B,T] in BERT format -> Features.

        logits [B, num_outputs]; cls [B, width] (single) or [B, 4*width] (pair tasks).
        """
        _reject_capture(capture)
        task = task if task is not None else next(iter(self.tasks))
        if task not in self.tasks:
            raise ConfigError(f"unknown task {task!r} for this BiLSTM student; "
                              f"it has heads for {list(self.tasks)}")
        real = attention_mask.bool().clone()
        real[:, 0] = False  # drop [CLS]: see the module docstring
        if task in self.cfg.pair_tasks:
            if token_type_ids is None:
                raise ConfigError(f"task {task!r} is a pair task: pass token_type_ids "
                                  "(0 for [CLS] a [SEP], 1 for b [SEP]) to split the pair")
            h1 = self._encode(*left_align(input_ids, real & (token_type_ids == 0),
                                          self.cfg.pad_token_id))
            h2 = self._encode(*left_align(input_ids, real & (token_type_ids == 1),
                                          self.cfg.pad_token_id))
            pooled = torch.cat([h1, h2, h1 * h2, (h1 - h2).abs()], dim=-1)
        else:
            pooled = self._encode(*left_align(input_ids, real, self.cfg.pad_token_id))
        return Features(logits=self.heads[task](pooled), cls=pooled)

    def _encode(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Left-aligned ids [B,L], lengths [B] (may be 0) -> sentence vectors [B, width]."""
        x = self.dropout(self.embedding(ids))
        # pack_padded_sequence needs lengths >= 1: an empty row runs over one pad token
        run = lengths.clamp(min=1)
        packed = pack_padded_sequence(x, run.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        seq, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        real = torch.arange(ids.shape[1], device=ids.device) < run.unsqueeze(1)
        h = self.pool(seq, real)
        return h * (lengths > 0).unsqueeze(1).to(h.dtype)  # empty segment -> zero vector

    def save(self, folder: str | Path) -> None:
        """Write `bilstm_config.json`, `model.safetensors` and a README on how to load it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2),
                                          encoding="utf-8")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(folder / WEIGHTS_FILE))
        (folder / README_FILE).write_text(_readme(self.cfg), encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> "BiLSTMClassifier":
        folder = Path(folder)
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a BiLSTM student folder (no {CONFIG_FILE});"
                                    " write one with BiLSTMClassifier.save(folder)")
        raw = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(BiLSTMConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        model = cls(BiLSTMConfig(**raw))
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return model


def left_align(input_ids: torch.Tensor, keep: torch.Tensor,
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the tokens where keep [B,T] is True to the left of each row.

    Returns ids [B,L] padded with pad_id (L = longest kept row, at least 1) and lengths [B].
    """
    lengths = keep.sum(dim=1)
    width = max(int(lengths.max()), 1) if keep.numel() else 1
    out = input_ids.new_full((input_ids.shape[0], width), pad_id)
    pos = keep.long().cumsum(dim=1) - 1
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(keep)
    out[rows[keep], pos[keep]] = input_ids[keep]
    return out, lengths


@torch.no_grad()
def init_embeddings_from(model: BiLSTMClassifier, word_embeddings: torch.Tensor,
                         seed: int = 0) -> None:
    """Start the student's embeddings from the teacher's word pieces [V, D_teacher].

    D_teacher == embed_dim: copied. D_teacher > embed_dim: PCA, i.e. the centred rows projected
    on the top embed_dim right singular vectors (torch.linalg.svd), which keeps as much of the
    vocabulary's geometry as a linear map to that width can; the result is rescaled to the
    teacher's per-entry std so the LSTM sees inputs of the usual size. D_teacher < embed_dim:
    a random map with orthonormal rows (seeded), which preserves all dot products. The pad row
    is zeroed in every case, as nn.Embedding's padding_idx expects.
    """
    weight = model.embedding.weight
    vocab, dim = model.cfg.vocab_size, model.cfg.embed_dim
    if word_embeddings.ndim != 2 or word_embeddings.shape[0] != vocab:
        raise ConfigError(f"teacher word embeddings have shape {tuple(word_embeddings.shape)}, "
                          f"expected [{vocab}, D]: build the student with the teacher's "
                          f"vocab_size ({word_embeddings.shape[0]} rows)")
    emb = word_embeddings.detach().to(device="cpu", dtype=torch.float32)
    d_teacher = emb.shape[1]
    if d_teacher == dim:
        new = emb.clone()
    elif d_teacher > dim:
        centred = emb - emb.mean(dim=0, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        new = centred @ vh[:dim].T
        new = new * (emb.std() / new.std().clamp_min(1e-12))
    else:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, d_teacher, generator=g))  # [dim, d_teacher]
        new = emb @ q.T  # q.T has orthonormal rows
    new[model.cfg.pad_token_id] = 0.0
    weight.copy_(new.to(device=weight.device, dtype=weight.dtype))


def _reject_capture(capture: Capture) -> None:
    asked = [name for name in ("embeddings", "hidden", "attn", "qkv") if getattr(capture, name)]
    if asked:
        raise ValueError(f"the BiLSTM student has no {', '.join(asked)}; use logit losses "
                         f"({LOGIT_LOSSES}) with arch=bilstm")


def _readme(cfg: BiLSTMConfig) -> str:
    pair = ", ".join(cfg.pair_tasks) or "none"
    return f"""# raykd BiLSTM student (MKD attentive student)

Embeddings ({cfg.vocab_size} x {cfg.embed_dim}) -> {cfg.layers}-layer BiLSTM ({cfg.lstm_hidden} per
direction) -> attention pooling -> one MLP head per task.

Tasks (num_outputs, 1 = regression): {json.dumps(cfg.tasks)}. Pair tasks: {pair}.

## Load

```python
from pipeline.students.bilstm import BiLSTMClassifier
model = BiLSTMClassifier.load("path/to/this/folder").eval()
out = model(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"), task="<task>")
out.logits  # [B, num_outputs]
```

## Input format

Tokenize with the teacher's tokenizer (the same word-piece vocabulary, pad id
{cfg.pad_token_id}), exactly as for the teacher: `tokenizer(a, return_tensors="pt",
padding=True)` for single sentences, `tokenizer(a, b, ...)` for pairs, i.e. `[CLS] a [SEP]`
or `[CLS] a [SEP] b [SEP]` with token_type_ids 0 / 1, right-padded with attention_mask 0.
Pair tasks need token_type_ids: the two segments are encoded separately by the same LSTM and
combined as [h1; h2; h1*h2; |h1-h2|]. [CLS] is dropped, each [SEP] is kept.

Files: `{CONFIG_FILE}` (BiLSTMConfig fields), `{WEIGHTS_FILE}` (the state dict).
"""
