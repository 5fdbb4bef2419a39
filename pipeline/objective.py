"""What a stage optimises: its loss terms, the teacher quantities they read, and the
student internals they need.

A stage names losses with weights (`{"hard": 0.5, "soft_ce": 0.5}`). This module maps each
name to a pure function of `losses.py`, to the teacher quantities it reads from a batch
(`t_logits`, `t_hidden_4`, ...; the same keys whether they come from the cache or from an
online teacher forward) and to what the student must capture. A new method is a new loss here
plus a recipe file; the training loop never changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline import losses as L
from pipeline.config import StageConfig
from pipeline.encoder import Capture, Features
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Plan:
    """Layer mapping and captures for one stage (student layer n -> teacher layer g(n))."""

    layer_map: tuple[int, ...]  # teacher layer for student layers 1..L_S
    student: Capture
    teacher: Capture
    needs_logits: bool
    needs_cls: bool


LAYER_LOSSES = ("hidden_mse", "mha_relation", "qkv_relation", "attention_mse")
INTERNAL_LOSSES = LAYER_LOSSES + ("emb_relation",)


def make_plan(stage: StageConfig, n_student: int, n_teacher: int) -> Plan:
    names = {k for k, w in stage.losses.items() if w > 0}
    # map layers only when a loss reads them (a BiLSTM may have more layers than the teacher)
    mapping = tuple(L.map_layers(n_student, n_teacher, stage.layer_map, stage.layer_map_explicit)) \
        if names & set(LAYER_LOSSES) else ()
    s_layers = tuple(range(1, n_student + 1))
    t_layers = tuple(sorted(set(mapping)))  # an explicit map may use a teacher layer twice
    top = ((n_student,), (mapping[-1],)) if mapping else ((), ())  # MiniLMv2: last <- its mapped
    hidden = "hidden_mse" in names
    attn = "mha_relation" in names
    qkv_s = tuple(sorted(set((top[0] if "qkv_relation" in names else ())
                             + (s_layers if "attention_mse" in names else ()))))
    qkv_t = tuple(sorted(set((top[1] if "qkv_relation" in names else ())
                             + (mapping if "attention_mse" in names else ()))))
    return Plan(
        layer_map=mapping,
        student=Capture(embeddings="emb_relation" in names, hidden=s_layers if hidden else (),
                        attn=s_layers if attn else (), qkv=qkv_s),
        teacher=Capture(embeddings="emb_relation" in names, hidden=t_layers if hidden else (),
                        attn=t_layers if attn else (), qkv=qkv_t),
        needs_logits=bool(names & {"kd", "soft_ce", "logit_mse"}),
        needs_cls=bool(names & {"sample_relation", "supcon"}),
    )


def check_stage(stage: StageConfig, arch: str, student_heads: int, student_width: int,
                teacher_heads: int, teacher_width: int) -> None:
    """Fail before any work when the stage's losses cannot fit these student/teacher shapes."""
    names = {k for k, w in stage.losses.items() if w > 0}
    where = f"stage {stage.name!r}"
    if arch == "bilstm":
        inner = sorted(names & set(INTERNAL_LOSSES))
        if inner:
            raise ConfigError(f"{where}: the BiLSTM student has no layers to match for {inner}; "
                              "use kd, soft_ce, logit_mse, hard, sample_relation or supcon")
        return
    if "mha_relation" in names:
        splits = stage.relation_splits or student_heads
        if teacher_heads % splits or student_width % splits:
            raise ConfigError(
                f"{where}: mha_relation splits the attention outputs into {splits} chunks "
                f"(relation_splits={stage.relation_splits}, 0 = the student's {student_heads} heads), "
                f"which must divide the teacher's {teacher_heads} heads and the student's width "
                f"{student_width}; set relation_splits to a divisor of {teacher_heads}")
    if "qkv_relation" in names and (student_width % stage.relation_heads
                                    or teacher_width % stage.relation_heads):
        raise ConfigError(f"{where}: qkv_relation's relation_heads={stage.relation_heads} must divide "
                          f"the student width {student_width} and the teacher width {teacher_width}")
    if "attention_mse" in names and student_heads != teacher_heads:
        raise ConfigError(f"{where}: attention_mse compares per-head attention maps and needs the "
                          f"student's head count ({student_heads}) to equal the teacher's "
                          f"({teacher_heads}); use mha_relation or qkv_relation for other head counts")


def teacher_quantities(plan: Plan) -> list[str]:
    """Names of the cached quantities a stage reads (see cache.schema)."""
    cap = plan.teacher
    out = (["logits"] if plan.needs_logits else []) + (["cls"] if plan.needs_cls else [])
    out += ["embeddings"] if cap.embeddings else []
    out += [f"hidden_{i}" for i in cap.hidden] + [f"attn_{i}" for i in cap.attn]
    out += [f"qkv_{i}" for i in cap.qkv]
    return out


def build_projections(stage: StageConfig, plan: Plan, d_student: int, d_teacher: int) -> nn.ModuleDict:
    """Learned student->teacher width maps (hidden MSE per layer; supervised contrastive)."""
    proj = nn.ModuleDict()
    if stage.losses.get("hidden_mse", 0) > 0:
        for n in plan.student.hidden:
            proj[f"hidden_{n}"] = nn.Linear(d_student, d_teacher)
    if stage.losses.get("supcon", 0) > 0 and d_student != d_teacher:
        proj["cls"] = nn.Linear(d_student, d_teacher)
    return proj


def score_bins(labels: torch.Tensor) -> torch.Tensor:
    """Regression labels -> int classes for the contrastive loss: scores rounded to integers
    (STS-B 0..5 -> 6 classes). A stated choice: MLKD does not say how it treats regression."""
    return torch.round(labels.float()).long()


def compute_loss(stage: StageConfig, plan: Plan, s: Features, batch: dict[str, torch.Tensor],
                 proj: nn.ModuleDict, kind: str, student_heads: int
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the stage's loss terms, and each term's value for logging."""
    mask = batch["attention_mask"]
    terms: dict[str, torch.Tensor] = {}
    for name, weight in stage.losses.items():
        if weight > 0:
            terms[name] = _term(name, stage, plan, s, batch, proj, kind, student_heads, mask)
    total = sum(stage.losses[n] * v for n, v in terms.items())
    return total, {n: float(v.detach()) for n, v in terms.items()}


def _term(name: str, stage: StageConfig, plan: Plan, s: Features, b: dict, proj: nn.ModuleDict,
          kind: str, student_heads: int, mask: torch.Tensor) -> torch.Tensor:
    regression = kind == "regression"
    if name == "hard":
        return L.hard_loss(s.logits, b["labels"], kind)
    if name in ("kd", "soft_ce", "logit_mse") and regression:
        return L.logit_mse(s.logits, b["t_logits"])  # regression: MSE to the teacher's score
    if name == "kd":
        return L.soft_kl(s.logits, b["t_logits"], stage.temperature)
    if name == "soft_ce":
        return L.soft_ce(s.logits, b["t_probs"] if "t_probs" in b else b["t_logits"].float().softmax(-1))
    if name == "logit_mse":
        return L.logit_mse(s.logits, b["t_logits"])
    pairs = list(zip(range(1, len(plan.layer_map) + 1), plan.layer_map))
    if name == "hidden_mse":
        return torch.stack([L.hidden_mse(_project(proj[f"hidden_{n}"], s.hidden[n]), b[f"t_hidden_{t}"],
                                         mask) for n, t in pairs]).mean()
    if name == "emb_relation":
        return L.token_relation_kl(s.embeddings, b["t_embeddings"], mask)
    if name == "mha_relation":
        splits = stage.relation_splits or student_heads
        return torch.stack([L.mha_relation_kl(s.attn[n], b[f"t_attn_{t}"], mask, splits)
                            for n, t in pairs]).mean()
    if name == "qkv_relation":
        n, t = pairs[-1]
        t_qkv = tuple(b[f"t_{p}_{t}"] for p in "qkv")
        return L.qkv_relation_kl(s.qkv[n], t_qkv, mask, stage.relation_heads)
    if name == "attention_mse":
        return torch.stack([L.attention_map_mse(s.qkv[n][0], s.qkv[n][1], b[f"t_q_{t}"],
                                                b[f"t_k_{t}"], mask, student_heads)
                            for n, t in pairs]).mean()
    if name == "sample_relation":
        return L.sample_relation_kl(s.cls, b["t_cls"])
    if name == "supcon":
        s_cls = _project(proj["cls"], s.cls) if "cls" in proj else s.cls
        labels = score_bins(b["labels"]) if regression else b["labels"]
        return L.supcon_loss(s_cls, b["t_cls"], labels, stage.supcon_temperature)
    raise KeyError(name)


def _project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A learned student -> teacher width map, run at the precision the student ran in (bf16
    under the loop's autocast, like the student's own layers: in fp32 the three MLKD hidden
    projections cost a third of the loss step); the loss on its output is fp32."""
    if x.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(x.device.type, dtype=x.dtype):
            return linear(x)
    return linear(x.float())


def teacher_batch(feats: Features, plan: Plan) -> dict[str, torch.Tensor]:
    """An online teacher forward -> the same `t_*` batch keys the cache reader gives for
    `teacher_quantities(plan)` (single teacher: `t_probs` is its softmax)."""
    out = {}
    if plan.needs_logits:
        out |= {"t_logits": feats.logits.float(), "t_probs": feats.logits.float().softmax(-1)}
    if plan.needs_cls:
        out["t_cls"] = feats.cls
    out.update({f"t_{name}": v for name, v in feats.token_tensors().items()})
    return {k: v.detach().float() for k, v in out.items()}
