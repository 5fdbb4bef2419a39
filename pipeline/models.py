"""Building models from plain specs (what Ray workers receive), and saving/loading them.

A spec is a small dict, so a worker rebuilds its model from data, never from pickled modules:
  {"kind": "pretrained", "path": <HF folder or hub id>, "dropout": 0.1, "pooling": "cls"}   teacher to fine-tune
  {"kind": "folder", "path": <raykd model folder>}                         a trained model
  {"kind": "student", "student": <StudentConfig dict>, "source": <folder>, "pair_tasks": [...]}
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, BertConfig, BertModel

from pipeline.config import StudentConfig, from_dict
from pipeline.encoder import EncoderClassifier, pretrained_encoder
from pipeline.losses import map_layers

BILSTM_MARKER = "bilstm_config.json"


def build(spec: dict, tasks: dict[str, int]) -> nn.Module:
    kind = spec["kind"]
    if kind == "pretrained":
        pooling = spec.get("pooling", "cls")
        return EncoderClassifier(pretrained_encoder(spec["path"], spec.get("dropout", 0.1), pooling == "cls"),
                                 tasks, spec.get("dropout", 0.1), pooling)
    if kind == "folder":
        return load_model(spec["path"])
    if kind == "student":
        scfg = from_dict(StudentConfig, spec["student"])
        if scfg.arch == "bilstm":
            return bilstm_student(scfg, spec["source"], tasks, tuple(spec.get("pair_tasks", ())))
        return transformer_student(scfg, spec["source"], tasks)
    raise ValueError(f"unknown model spec kind {kind!r}")


def load_model(folder: str | Path) -> nn.Module:
    folder = Path(folder)
    if (folder / BILSTM_MARKER).is_file():
        from pipeline.students.bilstm import BiLSTMClassifier
        return BiLSTMClassifier.load(folder)
    # the head dropout is not saved separately; it is the encoder's (see transformer_student)
    return EncoderClassifier.load(folder, AutoConfig.from_pretrained(folder).hidden_dropout_prob)


def save_folder(model: nn.Module, folder: str | Path) -> None:
    model.save(folder)


def load_folder(folder: str | Path, like: nn.Module) -> nn.Module:
    """Weights of a saved model into a module built like `like` (used on resume)."""
    loaded = load_model(folder)
    like.load_state_dict(loaded.state_dict())
    return like


def num_layers(model: nn.Module) -> int:
    return model.config.num_hidden_layers if isinstance(model, EncoderClassifier) else model.num_layers


def width(model: nn.Module) -> int:
    return model.config.hidden_size if isinstance(model, EncoderClassifier) else model.width


def num_heads(model: nn.Module) -> int:
    return model.config.num_attention_heads if isinstance(model, EncoderClassifier) else 1


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def transformer_student(scfg: StudentConfig, source: str, tasks: dict[str, int]) -> EncoderClassifier:
    """A BERT student of any size and head count, seeded from `source`'s layers when widths match.

    Q/K/V/O weights are [d, d] whatever the head count, so a 12-head teacher layer seeds a
    3-head student layer directly; only hidden and FFN widths must match to copy a layer.
    """
    src = EncoderClassifier.load(source) if (Path(source) / "raykd.json").is_file() else None
    src_enc = src.encoder if src is not None else pretrained_encoder(source)
    t_cfg = src_enc.config
    cfg = BertConfig(
        vocab_size=t_cfg.vocab_size, hidden_size=scfg.hidden, num_hidden_layers=scfg.layers,
        num_attention_heads=scfg.heads, intermediate_size=scfg.ffn,
        max_position_embeddings=t_cfg.max_position_embeddings, type_vocab_size=t_cfg.type_vocab_size,
        hidden_dropout_prob=scfg.dropout, attention_probs_dropout_prob=scfg.dropout,
        pad_token_id=t_cfg.pad_token_id, attn_implementation="sdpa",
        hidden_act=t_cfg.hidden_act, layer_norm_eps=t_cfg.layer_norm_eps)  # as the copied layers
    student = BertModel(cfg, add_pooling_layer=True)
    if scfg.hidden == t_cfg.hidden_size:
        student.embeddings.load_state_dict(src_enc.embeddings.state_dict())
        if src_enc.pooler is not None:  # a mean-pooled teacher has none: the student's stays fresh
            student.pooler.load_state_dict(src_enc.pooler.state_dict())
        if scfg.init != "random" and scfg.ffn == t_cfg.intermediate_size:
            for s_layer, t_index in zip(student.encoder.layer, init_layers(scfg, t_cfg.num_hidden_layers)):
                s_layer.load_state_dict(src_enc.encoder.layer[t_index - 1].state_dict())
    else:
        project_embeddings(src_enc.embeddings, student.embeddings)
    model = EncoderClassifier(student, tasks, scfg.dropout)
    if src is not None and scfg.hidden == t_cfg.hidden_size:  # task-tuned teacher: keep its heads
        for t in tasks:
            if t in src.heads and src.tasks[t] == tasks[t]:
                model.heads[t].load_state_dict(src.heads[t].state_dict())
    return model


def init_layers(scfg: StudentConfig, n_teacher: int) -> list[int]:
    """1-based teacher layers that seed student layers 1..L_S."""
    if scfg.init == "first":
        if scfg.layers > n_teacher:
            raise ValueError(f"student.init=first: the student has {scfg.layers} layers, the teacher "
                             f"only {n_teacher}; use init=explicit with student.init_layers")
        return list(range(1, scfg.layers + 1))
    if scfg.init == "explicit":
        return map_layers(scfg.layers, n_teacher, "explicit", scfg.init_layers)
    return map_layers(scfg.layers, n_teacher, "uniform")


@torch.no_grad()
def pca_projection(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """[D_t, dim] map of the rows of `weight` to width `dim`: the top principal directions when
    dim <= D_t; else a fixed random map with orthonormal rows, which keeps every dot product."""
    if dim > weight.shape[1]:
        gen = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(dim, weight.shape[1], generator=gen))  # [dim, D_t]
        return q.T.contiguous()
    centered = weight.float() - weight.float().mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    return vh[:dim].T.contiguous()


@torch.no_grad()
def project_embeddings(src: nn.Module, dst: nn.Module) -> None:
    """Word/position/type embeddings mapped to the student width (see `pca_projection`)."""
    proj = pca_projection(src.word_embeddings.weight, dst.word_embeddings.weight.shape[1])
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        getattr(dst, name).weight.copy_(getattr(src, name).weight.float() @ proj)


def bilstm_student(scfg: StudentConfig, source: str, tasks: dict[str, int],
                   pair_tasks: tuple[str, ...]) -> nn.Module:
    from pipeline.students.bilstm import BiLSTMClassifier, BiLSTMConfig, init_embeddings_from

    src = EncoderClassifier.load(source).encoder if (Path(source) / "raykd.json").is_file() \
        else pretrained_encoder(source)
    word = src.embeddings.word_embeddings.weight.detach()
    cfg = BiLSTMConfig(vocab_size=word.shape[0], embed_dim=scfg.hidden, lstm_hidden=scfg.lstm_hidden,
                       layers=scfg.layers, dropout=scfg.dropout, pad_token_id=src.config.pad_token_id,
                       tasks=dict(tasks), pair_tasks=tuple(pair_tasks))
    model = BiLSTMClassifier(cfg)
    init_embeddings_from(model, word)
    return model


def describe(model: nn.Module) -> dict:
    """Size facts for reports."""
    return {"params": count_parameters(model), "layers": num_layers(model), "width": width(model),
            "heads": num_heads(model)}


