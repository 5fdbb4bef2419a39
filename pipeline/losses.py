"""Distillation losses as pure tensor functions.

Conventions shared by every loss here:

* Shapes: ``B`` batch, ``T`` tokens, ``C`` classes, ``D``/``Ds``/``Dt`` feature widths
  (``Ds`` student, ``Dt`` teacher).
* ``mask [B,T]`` marks real tokens with 1/True and padding with 0/False (bool or int).
* Softmax / log-softmax and all arithmetic run in float32, whatever the input dtype
  (bf16 caches are fine); every loss returns a float32 scalar.
* Teacher arguments are constants: they are detached, so gradients reach only the student.
* Relation matrices ``softmax(X Xᵀ / sqrt(d))`` mask padded keys (columns) before the softmax;
  the row-wise ``KL(R_T || R_S)`` (summed over keys) is averaged over the real query rows of
  all examples in the batch (every real token row weighs the same; padded rows are ignored).

Nothing here imports ray or holds state; learned projections (e.g. MLKD's ``W`` for
``L_FFN``) belong to the training loop, which applies them before calling a loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "soft_kl",
    "soft_ce",
    "logit_mse",
    "hard_loss",
    "hidden_mse",
    "token_relation_kl",
    "mha_relation_kl",
    "qkv_relation_kl",
    "sample_relation_kl",
    "supcon_loss",
    "attention_map_mse",
    "map_layers",
]

# Large negative logit for masked keys. Finite (unlike -inf) so a fully padded example still
# gives a uniform, NaN-free row; exp(_MASKED) underflows to exactly 0 in float32.
_MASKED = -1e9
# PyTorch's CPU (log_)softmax, forward and backward, takes a scalar path when the softmax
# dimension is shorter than 16: [6144, 15] costs 15x [6144, 16]. Relations over short sequences
# (SST-2 batches average 15 tokens) get masked extra keys up to 16.
_MIN_SOFTMAX_KEYS = 16


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _student(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def _teacher(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float()


def _bool_mask(mask: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    if mask.shape != (batch, tokens):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected [B,T] = [{batch},{tokens}] "
            "matching the hidden states (1 = real token, 0 = padding)."
        )
    return mask.bool() if mask.dtype != torch.bool else mask


def _check_tokens(s: torch.Tensor, t: torch.Tensor, name: str) -> None:
    if s.dim() != 3 or t.dim() != 3 or s.shape[:2] != t.shape[:2]:
        raise ValueError(
            f"{name}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must both be "
            "[B,T,D] with the same B and T (widths may differ)."
        )


def _split_heads(x: torch.Tensor, heads: int, what: str) -> torch.Tensor:
    """[B,T,D] -> float32 [B,H,T,D/H], contiguous (the upcast and the head transpose in one
    copy); ValueError if heads does not divide D."""
    b, t, d = x.shape
    if heads < 1 or d % heads != 0:
        raise ValueError(
            f"{what}: cannot split width {d} into {heads} equal heads/chunks; "
            f"choose a count that divides {d}."
        )
    return x.reshape(b, t, heads, d // heads).transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)


def _relation_scores(x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """x [N,T,d], key_bias [N,1,K] (K >= T) -> X Xᵀ / sqrt(d) + key_bias as [N,T,K]; the scale
    and the mask are fused into the matmul, keys past T are the bias alone."""
    n, tokens, keys = x.shape[0], x.shape[1], key_bias.shape[-1]
    alpha = 1.0 / math.sqrt(x.shape[-1])
    if keys == tokens:
        return torch.baddbmm(key_bias, x, x.transpose(1, 2), alpha=alpha)
    out = key_bias.expand(n, tokens, keys).clone()
    out[..., :tokens] = torch.baddbmm(key_bias[..., :tokens], x, x.transpose(1, 2), alpha=alpha)
    return out


class _RelationKL(torch.autograd.Function):
    """Row-wise KL(R_T || R_S), R = softmax(X Xᵀ / sqrt(d) + key_bias), forward and backward by
    hand. Autograd would keep a dozen [N,T,K] passes (scale, mask, two log-softmaxes, sub, mul,
    sum and each one's backward); on CPU these elementwise passes, not the matmuls, are what
    relation losses cost. With G = (softmax(S_S) - R_T) * row gradient (rows of R_T sum to 1),
    d/dX_S = (G + Gᵀ) X_S / sqrt(d_S). The teacher's X_T gets no gradient."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, xt: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        s_scores = _relation_scores(xs, key_bias)
        t_scores = _relation_scores(xt, key_bias)
        r_t = torch.softmax(t_scores, -1)
        kl = torch.log_softmax(t_scores, -1).sub_(torch.log_softmax(s_scores, -1)).mul_(r_t).sum(-1)
        ctx.save_for_backward(xs, s_scores, r_t)
        return kl  # [N,T]

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        xs, s_scores, r_t = ctx.saved_tensors
        g = torch.softmax(s_scores, -1).sub_(r_t).mul_(grad_rows.unsqueeze(-1))[..., :xs.shape[1]]
        return torch.bmm(g + g.transpose(1, 2), xs).mul_(1.0 / math.sqrt(xs.shape[-1])), None, None


def _relation_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(R_T || R_S) of self-relations, averaged over heads and real rows.

    s [B,H,T,ds], t [B,H,T,dt] (already float32, teacher detached), mask [B,T] bool.
    R = softmax(X Xᵀ / sqrt(d)) with d each side's own head width; padded keys masked.
    """
    batch, heads, tokens = s.shape[:3]
    keys = max(tokens, _MIN_SOFTMAX_KEYS)
    # Additive key mask: 0 for real keys, _MASKED for padding and for the extra keys that keep
    # the softmax dimension >= 16. R_T is exactly 0 there, so masked keys add nothing to the KL.
    key_bias = torch.full((batch, keys), _MASKED, dtype=torch.float32, device=mask.device)
    key_bias[:, :tokens].masked_fill_(mask, 0.0)
    key_bias = key_bias[:, None, None, :].expand(batch, heads, 1, keys).reshape(batch * heads, 1, keys)
    row_kl = _RelationKL.apply(s.reshape(batch * heads, tokens, -1), t.reshape(batch * heads, tokens, -1),
                               key_bias).view(batch, heads, tokens)
    row_weight = mask[:, None, :].to(row_kl.dtype).expand_as(row_kl)  # [B,H,T]
    return (row_kl * row_weight).sum() / row_weight.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# prediction-level losses
# ---------------------------------------------------------------------------------------------
def soft_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft-target KD: ``T² · KL(softmax(t/T) || softmax(s/T))``, mean over the batch.

    s_logits [B,C], t_logits [B,C] -> scalar. KL is summed over classes and divided by B
    ("batchmean"); the T² factor keeps gradient scale independent of the temperature.
    """
    if temperature <= 0:
        raise ValueError(f"soft_kl: temperature must be > 0, got {temperature}.")
    log_ps = torch.log_softmax(_student(s_logits) / temperature, dim=-1)
    log_pt = torch.log_softmax(_teacher(t_logits) / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1).mean()
    return kl * temperature**2


def soft_ce(s_logits: torch.Tensor, t_probs: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy ``CE(Q, p_S) = -Σ_c Q_c log softmax(s)_c``, mean over the batch.

    s_logits [B,C], t_probs [B,C] (probabilities, e.g. MT-DNN-KD's ensemble mean) -> scalar.
    """
    log_ps = torch.log_softmax(_student(s_logits), dim=-1)
    return -(_teacher(t_probs) * log_ps).sum(dim=-1).mean()


def logit_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error between student and teacher outputs, s [B,C], t [B,C] -> scalar.

    Mean over all B·C elements (MKD's logit loss; also regression-score distillation).
    """
    return F.mse_loss(_student(s), _teacher(t))


def hard_loss(s_out: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Task loss on gold labels.

    kind "classification": s_out [B,C] logits, labels [B] int -> cross-entropy (mean).
    kind "regression": s_out [B,1] or [B], labels [B] float -> MSE (mean).
    """
    if kind == "classification":
        return F.cross_entropy(_student(s_out), labels.long())
    if kind == "regression":
        pred = _student(s_out)
        if pred.dim() == 2:
            pred = pred.squeeze(-1)
        return F.mse_loss(pred, labels.float())
    raise ValueError(f"hard_loss: kind must be 'classification' or 'regression', got {kind!r}.")


# ---------------------------------------------------------------------------------------------
# feature- and relation-level losses
# ---------------------------------------------------------------------------------------------
def hidden_mse(s_proj: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MLKD ``L_FFN`` / hidden-state MSE over real tokens only.

    s_proj [B,T,D]: student hidden states *already projected* to the teacher width by the
    caller (the training loop owns the learned nn.Linear d_S -> d_T); t [B,T,D]; mask [B,T].
    Returns the mean of squared errors over real tokens and all D features.
    """
    _check_tokens(s_proj, t, "hidden_mse")
    if s_proj.shape != t.shape:
        raise ValueError(
            f"hidden_mse: student {tuple(s_proj.shape)} and teacher {tuple(t.shape)} differ; "
            "project the student to the teacher width before calling."
        )
    m = _bool_mask(mask, *t.shape[:2])
    sq = (_student(s_proj) - t.detach()).float().square().sum(dim=-1)  # [B,T]; a 16-bit t is promoted on the fly
    n_values = m.sum().clamp_min(1) * t.shape[-1]
    return (sq * m).sum() / n_values


def token_relation_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MLKD ``L_EMB``: token-token relation KL.

    s [B,T,Ds], t [B,T,Dt], mask [B,T] -> scalar. R = softmax(X Xᵀ / sqrt(d)) (T×T, d each
    side's own width, padded keys masked); KL(R_T || R_S) per row, averaged over real rows.
    """
    _check_tokens(s, t, "token_relation_kl")
    m = _bool_mask(mask, *s.shape[:2])
    return _relation_kl(_student(s)[:, None], _teacher(t)[:, None], m)


def mha_relation_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, splits: int) -> torch.Tensor:
    """MLKD ``L_MHA``: relation KL of attention-output chunks.

    s [B,T,Ds], t [B,T,Dt] (concatenated head outputs, before W_O), mask [B,T] -> scalar.
    Each side's last dim is cut into ``splits`` equal chunks (width Ds/splits resp.
    Dt/splits; MLKD uses splits = student head count). Per chunk
    R = softmax(O_a O_aᵀ / sqrt(d/splits)); KL(R_T || R_S) averaged over chunks and real rows.
    Raises ValueError if ``splits`` does not divide Ds or Dt.
    """
    _check_tokens(s, t, "mha_relation_kl")
    m = _bool_mask(mask, *s.shape[:2])
    s_h = _split_heads(s, splits, "mha_relation_kl (student)")
    t_h = _split_heads(t.detach(), splits, "mha_relation_kl (teacher)")
    return _relation_kl(s_h, t_h, m)


def qkv_relation_kl(
    s_qkv: Sequence[torch.Tensor],
    t_qkv: Sequence[torch.Tensor],
    mask: torch.Tensor,
    relation_heads: int,
) -> torch.Tensor:
    """MiniLMv2 self-attention relation loss.

    s_qkv: (Q, K, V) each [B,T,Ds]; t_qkv: (Q, K, V) each [B,T,Dt]; mask [B,T] -> scalar.
    Each of Q, K, V is split into ``relation_heads`` heads (width d_h per side);
    R = softmax(X_h X_hᵀ / sqrt(d_h)); KL(R_T || R_S) averaged over Q/K/V, heads and real rows.
    Raises ValueError if relation_heads does not divide Ds or Dt.
    """
    if len(s_qkv) != 3 or len(t_qkv) != 3:
        raise ValueError("qkv_relation_kl: s_qkv and t_qkv must each be a (Q, K, V) triple.")
    total = None
    for name, s, t in zip("QKV", s_qkv, t_qkv):
        _check_tokens(s, t, f"qkv_relation_kl ({name})")
        m = _bool_mask(mask, *s.shape[:2])
        s_h = _split_heads(s, relation_heads, f"qkv_relation_kl (student {name})")
        t_h = _split_heads(t.detach(), relation_heads, f"qkv_relation_kl (teacher {name})")
        loss = _relation_kl(s_h, t_h, m)
        total = loss if total is None else total + loss
    return total / 3.0


def sample_relation_kl(s_cls: torch.Tensor, t_cls: torch.Tensor) -> torch.Tensor:
    """MLKD ``L_SS``: sample-sample relation KL within the batch.

    s_cls [B,Ds], t_cls [B,Dt] final [CLS] vectors -> scalar. R = softmax(h hᵀ / sqrt(d)) (B×B,
    d each side's own width); KL(R_T || R_S) per row, averaged over the B rows. Depends on the
    batch composition, so compute it per training batch from cached vectors.
    """
    if s_cls.dim() != 2 or t_cls.dim() != 2 or s_cls.shape[0] != t_cls.shape[0]:
        raise ValueError(
            f"sample_relation_kl: expected [B,Ds] and [B,Dt], got {tuple(s_cls.shape)} "
            f"and {tuple(t_cls.shape)}."
        )
    ones = torch.ones(1, s_cls.shape[0], dtype=torch.bool, device=s_cls.device)
    return _relation_kl(_student(s_cls)[None, None], _teacher(t_cls)[None, None], ones)


def supcon_loss(
    s_cls: torch.Tensor,
    t_cls: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
) -> torch.Tensor:
    """MLKD ``L_SC``: supervised contrastive loss (Khosla et al. 2020, L_out) over 2B vectors.

    s_cls [B,D], t_cls [B,D], labels [B] int -> scalar. Student and teacher vectors are stacked
    (2B), L2-normalised, and for each anchor i with positives P(i) (same label, i excluded):
    ``-1/|P(i)| Σ_p log(exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ))``; averaged over anchors that
    have at least one positive. (With both halves stacked every anchor has one: its own
    counterpart on the other side, so no anchor is ever dropped.) The teacher half is detached,
    so gradients reach s_cls only.

    Caller's job: project the student to the teacher width D if they differ, and turn
    regression scores into integer bins to use as labels.
    """
    if s_cls.shape != t_cls.shape or s_cls.dim() != 2:
        raise ValueError(
            f"supcon_loss: s_cls {tuple(s_cls.shape)} and t_cls {tuple(t_cls.shape)} must both "
            "be [B,D]; project the student to the teacher width first."
        )
    if temperature <= 0:
        raise ValueError(f"supcon_loss: temperature must be > 0, got {temperature}.")
    z = F.normalize(torch.cat([_student(s_cls), _teacher(t_cls)]), dim=-1)  # [2B,D]
    lab = torch.cat([labels, labels]).long()
    self_pair = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    sim = z @ z.T / temperature
    log_denominator = torch.logsumexp(sim.masked_fill(self_pair, float("-inf")), dim=-1)
    log_prob = sim - log_denominator[:, None]
    positive = (lab[:, None] == lab[None, :]) & ~self_pair
    n_pos = positive.sum(dim=-1)
    per_anchor = -(log_prob * positive).sum(dim=-1) / n_pos  # n_pos >= 1, see docstring
    return per_anchor.mean()


def attention_map_mse(
    s_q: torch.Tensor,
    s_k: torch.Tensor,
    t_q: torch.Tensor,
    t_k: torch.Tensor,
    mask: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """TinyBERT attention loss (student and teacher with the same head count).

    s_q, s_k [B,T,Ds]; t_q, t_k [B,T,Dt]; mask [B,T] -> scalar. Per head the raw scores
    Q_h K_hᵀ / sqrt(d_h) (before softmax, d_h each side's head width) are compared with MSE,
    averaged over heads and real (query, key) pairs; pairs touching padding are excluded.
    Raises ValueError unless ``heads`` divides both widths.
    """
    for name, s, t in (("Q", s_q, t_q), ("K", s_k, t_k)):
        _check_tokens(s, t, f"attention_map_mse ({name})")
    m = _bool_mask(mask, *s_q.shape[:2])

    def scores(q: torch.Tensor, k: torch.Tensor, side: str) -> torch.Tensor:
        q_h = _split_heads(q, heads, f"attention_map_mse ({side} Q)")
        k_h = _split_heads(k, heads, f"attention_map_mse ({side} K)")
        return q_h @ k_h.transpose(-1, -2) / math.sqrt(q_h.shape[-1])

    diff = scores(s_q, s_k, "student") - scores(t_q.detach(), t_k.detach(), "teacher")  # heads come out float32
    pair = (m[:, :, None] & m[:, None, :])[:, None]  # [B,1,T,T]
    n_values = pair.sum().clamp_min(1) * heads
    return diff.pow(2).masked_fill(~pair, 0.0).sum() / n_values


# ---------------------------------------------------------------------------------------------
# layer mapping
# ---------------------------------------------------------------------------------------------
def map_layers(
    n_student: int,
    n_teacher: int,
    strategy: str = "uniform",
    explicit: Sequence[int] = (),
) -> list[int]:
    """Teacher layer for each student layer n = 1..L_S, as 1-based hidden_states indices.

    Index 0 (embeddings) is not part of the result: embeddings always map to embeddings.

    * "uniform": g(n) = n * L_T / L_S (MLKD, TinyBERT). Exact when L_S divides L_T; otherwise
      rounded half up, e.g. 12 -> 5 gives [2, 5, 7, 10, 12] (still strictly increasing, ends at
      L_T). Requires L_S <= L_T.
    * "last": the top L_S teacher layers, [L_T - L_S + 1, ..., L_T]. Requires L_S <= L_T.
    * "explicit": ``explicit`` as given; must have L_S entries, each in 1..L_T.
    """
    if n_student < 1 or n_teacher < 1:
        raise ValueError(
            f"map_layers: layer counts must be >= 1, got n_student={n_student}, n_teacher={n_teacher}."
        )
    if strategy != "explicit" and len(explicit) > 0:
        raise ValueError(
            f"map_layers: explicit layers {list(explicit)} given with strategy {strategy!r}; "
            "set strategy='explicit' to use them."
        )
    if strategy == "explicit":
        layers = [int(x) for x in explicit]
        if len(layers) != n_student:
            raise ValueError(
                f"map_layers: explicit mapping has {len(layers)} entries but the student has "
                f"{n_student} layers; give one teacher layer per student layer."
            )
        bad = [x for x in layers if not 1 <= x <= n_teacher]
        if bad:
            raise ValueError(
                f"map_layers: explicit teacher layers {bad} out of range 1..{n_teacher} "
                "(1-based; 0 is the embedding output and is mapped separately)."
            )
        return layers
    if strategy not in ("uniform", "last"):
        raise ValueError(
            f"map_layers: unknown strategy {strategy!r}; use 'uniform', 'last' or 'explicit'."
        )
    if n_student > n_teacher:
        raise ValueError(
            f"map_layers: student has {n_student} layers, more than the teacher's {n_teacher}; "
            "use strategy='explicit' to map layers by hand."
        )
    if strategy == "last":
        return list(range(n_teacher - n_student + 1, n_teacher + 1))
    # Integer arithmetic for exact half-up rounding: floor(n*L_T/L_S + 1/2).
    return [(2 * n * n_teacher + n_student) // (2 * n_student) for n in range(1, n_student + 1)]
