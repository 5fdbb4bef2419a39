"""A BERT encoder with one head per task, and capture of its internal features.

The same module is the teacher (a pretrained HF encoder) and the Transformer student (a
smaller `BertConfig`, any head count dividing its width). `forward` returns `Features`: logits
plus whichever internals a loss or the cache asks for (embedding output, hidden states, the
attention output before W_O, Q/K/V), taken with forward hooks so any attention kernel works.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, BertForSequenceClassification

from pipeline.dropout import Dropout, use_fast_dropout

HEADS_FILE = "heads.safetensors"
META_FILE = "raykd.json"
# What the task heads read: "cls" = BERT's pooler over [CLS] (what BertForSequenceClassification
# does, so the export is exact); "mean" = the mean of the real tokens' last hidden states (how
# sentence-transformers models such as all-MiniLM-L6-v2 were trained; their pooler never was).
POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class Capture:
    """Which internals `forward` returns; layers are 1-based (hidden_states index)."""

    embeddings: bool = False
    hidden: tuple[int, ...] = ()
    attn: tuple[int, ...] = ()
    qkv: tuple[int, ...] = ()


@dataclass
class Features:
    logits: torch.Tensor  # [B, C] (C = 1 for regression)
    cls: torch.Tensor  # [B, D] final-layer [CLS] vector (before the pooler)
    embeddings: torch.Tensor | None = None  # [B, T, D]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, T, D]
    attn: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, T, D]
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def token_tensors(self) -> dict[str, torch.Tensor]:
        """Captured token-level internals keyed by their cache column names
        (embeddings, hidden_<l>, attn_<l>, q_<l>, k_<l>, v_<l>; see cache/schema.py)."""
        out = {"embeddings": self.embeddings} if self.embeddings is not None else {}
        out.update({f"hidden_{i}": v for i, v in self.hidden.items()})
        out.update({f"attn_{i}": v for i, v in self.attn.items()})
        for i, (q, k, v) in self.qkv.items():
            out.update({f"q_{i}": q, f"k_{i}": k, f"v_{i}": v})
        return out


class EncoderClassifier(nn.Module):
    """HF BERT encoder, its pooling (see POOLINGS) and a `Linear` head per task (num_outputs each)."""

    def __init__(self, encoder: nn.Module, tasks: dict[str, int], dropout: float = 0.1,
                 pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling == "mean" and getattr(encoder, "pooler", None) is not None:
            raise ValueError("mean pooling leaves the encoder's pooler unused (DDP rejects unused "
                             "parameters); build the encoder with add_pooling_layer=False")
        self.encoder = use_fast_dropout(encoder)
        self.pooling = pooling
        self.tasks = dict(tasks)
        width = encoder.config.hidden_size
        self.dropout = Dropout(dropout)
        self.heads = nn.ModuleDict({t: nn.Linear(width, n) for t, n in self.tasks.items()})
        for head in self.heads.values():
            nn.init.normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)

    @property
    def config(self) -> BertConfig:
        return self.encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, task: str | None = None,
                capture: Capture = Capture()) -> Features:
        feats = Features(logits=torch.empty(0), cls=torch.empty(0))
        hooks = _register_hooks(self.encoder, capture, feats)
        try:
            need_hidden = capture.embeddings or bool(capture.hidden)
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids, output_hidden_states=need_hidden)
        finally:
            for h in hooks:
                h.remove()
        seq = out.last_hidden_state
        feats.cls = seq[:, 0]
        if self.pooling == "mean":
            real = attention_mask.unsqueeze(-1).to(seq.dtype)
            pooled = (seq * real).sum(1) / real.sum(1).clamp_min(1)
        else:
            pooled = out.pooler_output if out.pooler_output is not None else seq[:, 0]
        task = task or next(iter(self.tasks))
        feats.logits = self.heads[task](self.dropout(pooled))
        if need_hidden:
            states = out.hidden_states
            feats.embeddings = states[0] if capture.embeddings else None
            feats.hidden = {i: states[i] for i in capture.hidden}
        return feats

    def save(self, folder: str | Path, extra: dict | None = None) -> str:
        """Write encoder (HF format), heads and metadata; return the content fingerprint."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(folder)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()},
                  str(folder / HEADS_FILE))
        meta = {"tasks": self.tasks, "pooling": self.pooling, **(extra or {})}
        meta["fingerprint"] = fingerprint(folder, self.pooling)
        (folder / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return meta["fingerprint"]

    @classmethod
    def load(cls, folder: str | Path, dropout: float = 0.1) -> "EncoderClassifier":
        folder = Path(folder)
        meta = read_meta(folder)
        pooling = meta.get("pooling", "cls")
        encoder = AutoModel.from_pretrained(folder, attn_implementation="sdpa",
                                            add_pooling_layer=pooling == "cls")
        model = cls(encoder, {t: int(n) for t, n in meta["tasks"].items()}, dropout, pooling)
        model.heads.load_state_dict(load_file(str(folder / HEADS_FILE)))
        return model


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a raykd model folder (no {META_FILE}); "
                                "train one with `python -m jobs.teacher` or pass teacher.model")
    return json.loads(path.read_text(encoding="utf-8"))


def fingerprint(folder: str | Path, pooling: str | None = None) -> str:
    """sha256 over the weights, config, heads and tokenizer files of a model folder, and its
    pooling when not the default [CLS] (None = the pooling its META_FILE records)."""
    h = hashlib.sha256()
    if pooling is None:
        pooling = read_meta(folder).get("pooling", "cls") if (Path(folder) / META_FILE).is_file() else "cls"
    if pooling != "cls":
        h.update(f"pooling={pooling}".encode())
    names = ("config.json", "model.safetensors", HEADS_FILE, "tokenizer.json", "vocab.txt",
             "tokenizer_config.json", "special_tokens_map.json")
    for name in names:
        path = Path(folder) / name
        if path.is_file():
            h.update(name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:32]


def pretrained_encoder(name_or_path: str, dropout: float = 0.1, pooler: bool = True) -> nn.Module:
    """Load an HF encoder (local folder or hub id), with or without its pooler, sdpa attention."""
    cfg = AutoConfig.from_pretrained(name_or_path, hidden_dropout_prob=dropout,
                                     attention_probs_dropout_prob=dropout)
    return AutoModel.from_pretrained(name_or_path, config=cfg, attn_implementation="sdpa",
                                     add_pooling_layer=pooler)


def sentence_pooling(name_or_path: str) -> str:
    """"mean" when a local folder is a sentence-transformers model trained with mean pooling
    (its 1_Pooling/config.json says so), else "cls" (hub ids included: nothing is fetched)."""
    config = Path(name_or_path) / "1_Pooling" / "config.json"
    if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls"


def bert_layers(encoder: nn.Module) -> nn.ModuleList:
    return encoder.encoder.layer


def _register_hooks(encoder: nn.Module, capture: Capture, feats: Features) -> list:
    hooks = []
    layers = bert_layers(encoder)
    for i in capture.attn:
        def keep_attn(_m, _inp, out, i=i):
            feats.attn[i] = out[0]
        hooks.append(layers[i - 1].attention.self.register_forward_hook(keep_attn))
    for i in capture.qkv:
        attn = layers[i - 1].attention.self
        parts: dict[str, torch.Tensor] = {}

        def keep(name, i=i, parts=parts):
            def hook(_m, _inp, out):
                parts[name] = out
                if len(parts) == 3:
                    feats.qkv[i] = (parts["q"], parts["k"], parts["v"])
            return hook
        hooks += [attn.query.register_forward_hook(keep("q")),
                  attn.key.register_forward_hook(keep("k")),
                  attn.value.register_forward_hook(keep("v"))]
    return hooks


def to_hf_classifier(model: EncoderClassifier, task: str, labels: tuple[str, ...]) -> nn.Module:
    """A `BertForSequenceClassification` with this encoder and the head of `task`."""
    if model.pooling != "cls":
        raise ValueError(f"only [CLS]-pooled models export to BertForSequenceClassification; this one "
                         f"uses {model.pooling!r} pooling (keep it as a raykd folder: EncoderClassifier.load)")
    n = model.tasks[task]
    cfg = BertConfig.from_dict({**model.config.to_dict(), "num_labels": n,
                                "architectures": ["BertForSequenceClassification"]})
    if labels:
        cfg.id2label = dict(enumerate(labels))
        cfg.label2id = {label: i for i, label in enumerate(labels)}
    cfg.problem_type = "regression" if n == 1 else "single_label_classification"
    hf = BertForSequenceClassification(cfg)
    hf.bert.load_state_dict(model.encoder.state_dict())
    hf.classifier.load_state_dict(model.heads[task].state_dict())
    return hf
