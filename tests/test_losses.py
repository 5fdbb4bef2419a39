"""Tests for pipeline.losses: direct loop-based formulas and invariants.

The reference implementations below work example by example and row by row in float64,
slicing out real tokens instead of masking, so they share no code with the module.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import losses as L

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def lengths_mask(lengths: list[int], tokens: int) -> torch.Tensor:
    return torch.tensor([[1 if i < n else 0 for i in range(tokens)] for n in lengths])


def pad_with_garbage(x: torch.Tensor, extra: int, seed: int) -> torch.Tensor:
    """Append `extra` garbage tokens along dim 1 (large values, to make leaks visible)."""
    b, _, d = x.shape
    return torch.cat([x, rand(b, extra, d, seed=seed, scale=50.0).to(x.dtype)], dim=1)


def pad_mask(mask: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=mask.dtype)], dim=1)


def row_kl(p_logits: list[float], q_logits: list[float]) -> float:
    """KL(softmax(p) || softmax(q)) for one row, with plain math."""
    def softmax(z: list[float]) -> list[float]:
        top = max(z)
        e = [math.exp(v - top) for v in z]
        tot = sum(e)
        return [v / tot for v in e]

    p, q = softmax(p_logits), softmax(q_logits)
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def ref_relation_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, heads: int) -> float:
    """Mean over heads and real rows of KL(R_T || R_S), R = softmax(X_h X_hᵀ / sqrt(d_h))."""
    s, t = s.double(), t.double()
    ds, dt = s.shape[-1] // heads, t.shape[-1] // heads
    total, rows = 0.0, 0
    for b in range(s.shape[0]):
        real = [i for i in range(s.shape[1]) if mask[b, i]]
        for h in range(heads):
            xs = s[b, real, h * ds:(h + 1) * ds]
            xt = t[b, real, h * dt:(h + 1) * dt]
            for i in range(len(real)):
                zs = [float(xs[i] @ xs[j]) / math.sqrt(ds) for j in range(len(real))]
                zt = [float(xt[i] @ xt[j]) / math.sqrt(dt) for j in range(len(real))]
                total += row_kl(zt, zs)
                rows += 1
    return total / rows


def ref_supcon(s: torch.Tensor, t: torch.Tensor, labels: list[int], tau: float) -> float:
    z = [v / v.norm() for v in torch.cat([s, t]).double()]
    lab = labels + labels
    n = len(z)
    per_anchor = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and lab[p] == lab[i]]
        if not positives:
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(n) if a != i)
        terms = [math.log(math.exp(float(z[i] @ z[p]) / tau) / denom) for p in positives]
        per_anchor.append(-sum(terms) / len(positives))
    return sum(per_anchor) / len(per_anchor)


def ref_attention_mse(sq, sk, tq, tk, mask, heads: int) -> float:
    ds, dt = sq.shape[-1] // heads, tq.shape[-1] // heads
    total, count = 0.0, 0
    for b in range(sq.shape[0]):
        real = [i for i in range(sq.shape[1]) if mask[b, i]]
        for h in range(heads):
            for i in real:
                for j in real:
                    a_s = sum(
                        sq[b, i, h * ds + c].item() * sk[b, j, h * ds + c].item() for c in range(ds)
                    )
                    a_t = sum(
                        tq[b, i, h * dt + c].item() * tk[b, j, h * dt + c].item() for c in range(dt)
                    )
                    total += (a_s / math.sqrt(ds) - a_t / math.sqrt(dt)) ** 2
                    count += 1
    return total / count


def close(value: torch.Tensor, expected: float, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    return math.isclose(float(torch.as_tensor(value).detach()), expected, rel_tol=rtol, abs_tol=atol)


B, T = 3, 6
MASK = lengths_mask([6, 4, 2], T)  # ragged on purpose


# ---------------------------------------------------------------------------------------------
# prediction-level losses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_kl_matches_formula(temperature: float) -> None:
    s, t = rand(4, 5, seed=0), rand(4, 5, seed=1)
    expected = sum(
        row_kl((t[b] / temperature).tolist(), (s[b] / temperature).tolist()) for b in range(4)
    ) / 4 * temperature**2
    assert close(L.soft_kl(s, t, temperature), expected)
    assert float(L.soft_kl(s, s.clone(), temperature)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        L.soft_kl(s, t, 0.0)


def test_soft_ce_matches_formula_and_relates_to_kl() -> None:
    s, t = rand(4, 3, seed=2), rand(4, 3, seed=3)
    q = torch.softmax(t, dim=-1)
    expected = 0.0
    for b in range(4):
        log_norm = math.log(sum(math.exp(v) for v in s[b].tolist()))
        expected -= sum(q[b, c].item() * (s[b, c].item() - log_norm) for c in range(3))
    expected /= 4
    assert close(L.soft_ce(s, q), expected)
    # CE(Q, p_S) = KL(Q || p_S) + H(Q)
    entropy = float(-(q * q.log()).sum(-1).mean())
    assert close(L.soft_ce(s, q), float(L.soft_kl(s, t)) + entropy)


def test_logit_mse_matches_formula() -> None:
    s, t = rand(4, 3, seed=4), rand(4, 3, seed=5)
    expected = sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist())) / 12
    assert close(L.logit_mse(s, t), expected)
    assert float(L.logit_mse(s, s.clone())) == 0.0


def test_hard_loss_classification_and_regression() -> None:
    logits, labels = rand(4, 3, seed=6), torch.tensor([0, 2, 1, 2])
    expected = sum(
        -logits[b, labels[b]].item() + math.log(sum(math.exp(v) for v in logits[b].tolist()))
        for b in range(4)
    ) / 4
    assert close(L.hard_loss(logits, labels, "classification"), expected)

    scores, gold = rand(4, 1, seed=7), torch.tensor([0.5, 1.0, 4.2, 3.0])
    expected = sum((scores[b, 0].item() - gold[b].item()) ** 2 for b in range(4)) / 4
    assert close(L.hard_loss(scores, gold, "regression"), expected)
    assert close(L.hard_loss(scores.squeeze(-1), gold, "regression"), expected)
    with pytest.raises(ValueError, match="classification"):
        L.hard_loss(logits, labels, "ranking")


# ---------------------------------------------------------------------------------------------
# hidden-state MSE
# ---------------------------------------------------------------------------------------------


def test_hidden_mse_matches_formula_and_ignores_padding() -> None:
    s, t = rand(B, T, 8, seed=8), rand(B, T, 8, seed=9)
    total, count = 0.0, 0
    for b in range(B):
        for i in range(T):
            if MASK[b, i]:
                total += sum((x - y) ** 2 for x, y in zip(s[b, i].tolist(), t[b, i].tolist()))
                count += 8
    assert close(L.hidden_mse(s, t, MASK), total / count)
    padded = L.hidden_mse(pad_with_garbage(s, 3, 10), pad_with_garbage(t, 3, 11), pad_mask(MASK, 3))
    assert close(padded, total / count)
    assert float(L.hidden_mse(t.clone(), t, MASK)) == 0.0
    with pytest.raises(ValueError, match="project"):
        L.hidden_mse(rand(B, T, 4, seed=0), t, MASK)


# ---------------------------------------------------------------------------------------------
# relation losses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ds,dt", [(16, 16), (12, 20), (32, 8)])
def test_token_relation_kl_matches_formula(ds: int, dt: int) -> None:
    s, t = rand(B, T, ds, seed=12), rand(B, T, dt, seed=13)
    assert close(L.token_relation_kl(s, t, MASK), ref_relation_kl(s, t, MASK, 1))


@pytest.mark.parametrize("dt", [384])
@pytest.mark.parametrize("splits", [12, 6, 3])
@pytest.mark.parametrize("ds", [384, 312, 288, 192])
def test_mha_relation_kl_matches_formula(ds: int, dt: int, splits: int) -> None:
    s, t = rand(2, 4, ds, seed=14, scale=0.5), rand(2, 4, dt, seed=15, scale=0.5)
    mask = lengths_mask([4, 3], 4)
    assert close(L.mha_relation_kl(s, t, mask, splits), ref_relation_kl(s, t, mask, splits))


@pytest.mark.parametrize("tokens", [1, 9, 15, 16, 17, 40])
def test_relation_kl_same_on_both_sides_of_the_16_key_threshold(tokens: int) -> None:
    """Below 16 tokens the relations get masked extra keys (torch's CPU softmax is 15x slower
    on rows shorter than 16); values and gradients must not depend on it: the formula, and the
    gradient of the same rows padded past 16 with garbage."""
    lengths = [tokens, max(1, tokens - 5)]
    mask = lengths_mask(lengths, tokens)
    s, t = rand(2, tokens, 48, seed=40), rand(2, tokens, 64, seed=41)
    assert close(L.mha_relation_kl(s, t, mask, 4), ref_relation_kl(s, t, mask, 4))
    extra = 20 - tokens if tokens < 16 else 3
    grads = []
    for x, xt, m in ((s, t, mask), (pad_with_garbage(s, extra, 42), pad_with_garbage(t, extra, 43),
                                   pad_mask(mask, extra))):
        x = x.clone().requires_grad_()
        L.mha_relation_kl(x, xt, m, 4).backward()
        grads.append(x.grad[:, :tokens])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def autograd_relation_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """The relation KL written plainly in float64 and left to autograd: the reference for the
    hand-written backward."""
    def log_r(x: torch.Tensor) -> torch.Tensor:
        h = x.double().reshape(*x.shape[:2], heads, -1).transpose(1, 2)  # [B,H,T,d]
        scores = h @ h.transpose(-1, -2) / math.sqrt(h.shape[-1])
        return scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf")).log_softmax(-1)

    log_rs, log_rt = log_r(s), log_r(t.detach())
    kl = torch.where(log_rt.isfinite(), log_rt.exp() * (log_rt - log_rs), 0.0).sum(-1)  # [B,H,T]
    rows = mask.bool()[:, None, :].expand_as(kl)
    return kl[rows].mean()


@pytest.mark.parametrize("tokens", [1, 9, 16, 23])
def test_relation_kl_gradient_matches_autograd_of_the_formula(tokens: int) -> None:
    mask = lengths_mask([tokens, max(1, tokens - 4), max(1, tokens // 2)], tokens)
    s, t = rand(3, tokens, 24, seed=44), rand(3, tokens, 36, seed=45)
    ours, ref = s.clone().requires_grad_(), s.clone().requires_grad_()
    L.mha_relation_kl(ours, t, mask, 3).backward()
    autograd_relation_kl(ref, t, mask, 3).backward()
    torch.testing.assert_close(ours.grad, ref.grad.float(), rtol=1e-4, atol=1e-6)


def test_fused_relation_kl_backward_passes_gradcheck() -> None:
    """The hand-written backward against finite differences, in float64, with padded keys and
    the extra keys below 16."""
    xs = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(4, 5, 6, dtype=torch.float64)
    bias = torch.zeros(4, 1, 16, dtype=torch.float64)
    bias[:, :, 5:] = -1e9
    bias[1, :, 3:] = -1e9
    assert torch.autograd.gradcheck(lambda x: L._RelationKL.apply(x, xt, bias), (xs,))


def test_mha_relation_kl_odd_head_count() -> None:
    # 3 heads of width 96 (D=288) on both sides, and against a 384-wide teacher.
    s = rand(B, T, 288, seed=16, scale=0.3)
    t288 = rand(B, T, 288, seed=17, scale=0.3)
    t384 = rand(B, T, 384, seed=18, scale=0.3)
    assert close(L.mha_relation_kl(s, t288, MASK, 3), ref_relation_kl(s, t288, MASK, 3))
    assert close(L.mha_relation_kl(s, t384, MASK, 3), ref_relation_kl(s, t384, MASK, 3))


def test_mha_relation_kl_rejects_bad_splits() -> None:
    s, t = rand(B, T, 312, seed=0), rand(B, T, 384, seed=1)
    with pytest.raises(ValueError, match="384"):
        L.mha_relation_kl(rand(B, T, 384, seed=2), t, MASK, 5)
    with pytest.raises(ValueError, match="312"):
        L.mha_relation_kl(s, t, MASK, 16)  # divides 384, not 312


@pytest.mark.parametrize("heads,ds,dt", [(1, 16, 24), (4, 16, 32), (3, 288, 384)])
def test_qkv_relation_kl_matches_formula(heads: int, ds: int, dt: int) -> None:
    s_qkv = tuple(rand(B, T, ds, seed=20 + i, scale=0.3) for i in range(3))
    t_qkv = tuple(rand(B, T, dt, seed=30 + i, scale=0.3) for i in range(3))
    expected = sum(ref_relation_kl(s, t, MASK, heads) for s, t in zip(s_qkv, t_qkv)) / 3
    assert close(L.qkv_relation_kl(s_qkv, t_qkv, MASK, heads), expected)
    with pytest.raises(ValueError, match="divides"):
        L.qkv_relation_kl(s_qkv, t_qkv, MASK, 5)


def test_relation_losses_zero_when_equal() -> None:
    x = rand(B, T, 24, seed=40)
    assert float(L.token_relation_kl(x, x.clone(), MASK)) == pytest.approx(0.0, abs=1e-6)
    assert float(L.mha_relation_kl(x, x.clone(), MASK, 3)) == pytest.approx(0.0, abs=1e-6)
    assert float(L.qkv_relation_kl((x, x, x), (x, x, x), MASK, 4)) == pytest.approx(0.0, abs=1e-6)
    cls = rand(5, 24, seed=41)
    assert float(L.sample_relation_kl(cls, cls.clone())) == pytest.approx(0.0, abs=1e-6)
    # and clearly nonzero when they differ (the zero above is not vacuous)
    assert float(L.token_relation_kl(x, rand(B, T, 24, seed=42), MASK)) > 1e-2


def test_relation_losses_ignore_padding() -> None:
    s, t = rand(B, T, 12, seed=43), rand(B, T, 18, seed=44)
    s_p, t_p, m_p = pad_with_garbage(s, 4, 45), pad_with_garbage(t, 4, 46), pad_mask(MASK, 4)
    assert close(L.token_relation_kl(s_p, t_p, m_p), float(L.token_relation_kl(s, t, MASK)))
    assert close(L.mha_relation_kl(s_p, t_p, m_p, 3), float(L.mha_relation_kl(s, t, MASK, 3)))
    qkv = L.qkv_relation_kl((s_p,) * 3, (t_p,) * 3, m_p, 2)
    assert close(qkv, float(L.qkv_relation_kl((s,) * 3, (t,) * 3, MASK, 2)))


def test_relation_kl_fully_padded_example_is_ignored() -> None:
    s, t = rand(2, 4, 8, seed=47), rand(2, 4, 8, seed=48)
    mask = lengths_mask([4, 0], 4)
    value = L.token_relation_kl(s, t, mask)
    assert torch.isfinite(value)
    assert close(value, float(L.token_relation_kl(s[:1], t[:1], mask[:1])))


@pytest.mark.parametrize("ds,dt", [(8, 8), (8, 20)])
def test_sample_relation_kl_matches_formula(ds: int, dt: int) -> None:
    s, t = rand(5, ds, seed=50), rand(5, dt, seed=51)
    expected = 0.0
    for i in range(5):
        zs = [float(s[i] @ s[j]) / math.sqrt(ds) for j in range(5)]
        zt = [float(t[i] @ t[j]) / math.sqrt(dt) for j in range(5)]
        expected += row_kl(zt, zs)
    assert close(L.sample_relation_kl(s, t), expected / 5)


# ---------------------------------------------------------------------------------------------
# supervised contrastive
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [[0, 1, 0, 2, 1, 1], [3, 3, 3, 3, 3, 3]])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_supcon_matches_formula(labels: list[int], tau: float) -> None:
    s, t = rand(6, 10, seed=60), rand(6, 10, seed=61)
    got = L.supcon_loss(s, t, torch.tensor(labels), tau)
    assert close(got, ref_supcon(s, t, labels, tau))


def test_supcon_singleton_labels_use_only_the_counterpart() -> None:
    # Every label occurs once per side: the only positive of student i is teacher i and vice
    # versa, so no anchor is left without positives and each term is a 2B-1 way softmax.
    s, t = rand(4, 6, seed=62), rand(4, 6, seed=63)
    labels = [0, 1, 2, 3]
    z = torch.nn.functional.normalize(torch.cat([s, t]).double(), dim=-1)
    expected = 0.0
    for i in range(8):
        partner = (i + 4) % 8
        logits = [float(z[i] @ z[a]) / 0.1 for a in range(8) if a != i]
        expected += -(float(z[i] @ z[partner]) / 0.1 - math.log(sum(math.exp(v) for v in logits)))
    assert close(L.supcon_loss(s, t, torch.tensor(labels), 0.1), expected / 8)
    assert close(L.supcon_loss(s, t, torch.tensor(labels), 0.1), ref_supcon(s, t, labels, 0.1))


def test_supcon_depends_only_on_label_identity_and_checks_width() -> None:
    s, t = rand(4, 6, seed=64), rand(4, 6, seed=65)
    a = L.supcon_loss(s, t, torch.tensor([0, 1, 0, 1]))
    b = L.supcon_loss(s, t, torch.tensor([7, 2, 7, 2]))
    assert close(a, float(b))
    with pytest.raises(ValueError, match="project"):
        L.supcon_loss(rand(4, 5, seed=0), t, torch.tensor([0, 1, 0, 1]))


# ---------------------------------------------------------------------------------------------
# TinyBERT attention maps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,ds,dt", [(2, 8, 12), (3, 288, 288), (4, 16, 16)])
def test_attention_map_mse_matches_formula(heads: int, ds: int, dt: int) -> None:
    sq, sk = rand(B, T, ds, seed=70, scale=0.3), rand(B, T, ds, seed=71, scale=0.3)
    tq, tk = rand(B, T, dt, seed=72, scale=0.3), rand(B, T, dt, seed=73, scale=0.3)
    expected = ref_attention_mse(sq, sk, tq, tk, MASK, heads)
    assert close(L.attention_map_mse(sq, sk, tq, tk, MASK, heads), expected)


def test_attention_map_mse_padding_zero_and_errors() -> None:
    sq, sk = rand(B, T, 8, seed=74), rand(B, T, 8, seed=75)
    tq, tk = rand(B, T, 8, seed=76), rand(B, T, 8, seed=77)
    base = float(L.attention_map_mse(sq, sk, tq, tk, MASK, 2))
    sq_p, sk_p, tq_p, tk_p = (pad_with_garbage(x, 2, 78 + i) for i, x in enumerate([sq, sk, tq, tk]))
    padded = L.attention_map_mse(sq_p, sk_p, tq_p, tk_p, pad_mask(MASK, 2), 2)
    assert close(padded, base)
    assert float(L.attention_map_mse(sq, sk, sq.clone(), sk.clone(), MASK, 2)) == 0.0
    with pytest.raises(ValueError, match="divides"):
        L.attention_map_mse(sq, sk, rand(B, T, 12, seed=0), rand(B, T, 12, seed=1), MASK, 8)


# ---------------------------------------------------------------------------------------------
# cross-cutting: gradients and bf16
# ---------------------------------------------------------------------------------------------


def _tensors(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    return [rand(*shape, seed=seed + i) for i, shape in enumerate(shapes)]


def _cases() -> dict:
    """name -> (fn(student_list, teacher_list) -> loss, student tensors, teacher tensors)."""
    labels = torch.tensor([0, 1, 0])
    logits, s_tok, t_tok = (B, 4), (B, T, 8), (B, T, 12)
    return {
        "soft_kl": (lambda s, t: L.soft_kl(s[0], t[0], 2.0), _tensors(1, logits), _tensors(2, logits)),
        "soft_ce": (
            lambda s, t: L.soft_ce(s[0], t[0]),
            _tensors(3, logits),
            [rand(*logits, seed=4).softmax(-1)],
        ),
        "logit_mse": (lambda s, t: L.logit_mse(s[0], t[0]), _tensors(5, logits), _tensors(6, logits)),
        "hidden_mse": (lambda s, t: L.hidden_mse(s[0], t[0], MASK), _tensors(7, s_tok), _tensors(8, s_tok)),
        "token_relation_kl": (
            lambda s, t: L.token_relation_kl(s[0], t[0], MASK),
            _tensors(9, s_tok),
            _tensors(10, t_tok),
        ),
        "mha_relation_kl": (
            lambda s, t: L.mha_relation_kl(s[0], t[0], MASK, 4),
            _tensors(11, s_tok),
            _tensors(12, t_tok),
        ),
        "qkv_relation_kl": (
            lambda s, t: L.qkv_relation_kl(s, t, MASK, 2),
            _tensors(13, s_tok, s_tok, s_tok),
            _tensors(16, t_tok, t_tok, t_tok),
        ),
        "sample_relation_kl": (
            lambda s, t: L.sample_relation_kl(s[0], t[0]),
            _tensors(19, (B, 8)),
            _tensors(20, (B, 12)),
        ),
        "supcon_loss": (
            lambda s, t: L.supcon_loss(s[0], t[0], labels),
            _tensors(21, (B, 8)),
            _tensors(22, (B, 8)),
        ),
        "attention_map_mse": (
            lambda s, t: L.attention_map_mse(s[0], s[1], t[0], t[1], MASK, 2),
            _tensors(23, s_tok, s_tok),
            _tensors(25, t_tok, t_tok),
        ),
    }


CASE_NAMES = list(_cases())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_gradients_reach_student_only(name: str) -> None:
    fn, s, t = _cases()[name]
    s = [x.requires_grad_() for x in s]
    t = [x.requires_grad_() for x in t]
    value = fn(s, t)
    assert value.dim() == 0 and value.dtype == torch.float32
    value.backward()
    for x in s:
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for x in t:
        assert x.grad is None


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bf16_inputs_give_fp32_close_result(name: str) -> None:
    fn, s, t = _cases()[name]
    s16 = [x.bfloat16().requires_grad_() for x in s]
    t16 = [x.bfloat16() for x in t]
    value = fn(s16, t16)
    assert value.dtype == torch.float32
    # same numbers upcast: only fp32 rounding differs
    with torch.no_grad():
        upcast = float(fn([x.float() for x in s16], [x.float() for x in t16]))
        full = float(fn(s, t))
    assert close(value, upcast)
    # and close to the full-precision inputs
    assert close(value, full, rtol=5e-2, atol=5e-2)
    value.backward()
    assert s16[0].grad is not None and s16[0].grad.dtype == torch.bfloat16


def test_int_and_bool_masks_agree() -> None:
    s, t = rand(B, T, 8, seed=90), rand(B, T, 8, seed=91)
    assert float(L.token_relation_kl(s, t, MASK)) == float(L.token_relation_kl(s, t, MASK.bool()))
    assert float(L.hidden_mse(s, t, MASK)) == float(L.hidden_mse(s, t, MASK.bool()))
    with pytest.raises(ValueError, match="mask"):
        L.hidden_mse(s, t, MASK[:, :3])


# ---------------------------------------------------------------------------------------------
# layer mapping
# ---------------------------------------------------------------------------------------------


def test_map_layers_uniform() -> None:
    assert L.map_layers(3, 6) == [2, 4, 6]
    assert L.map_layers(2, 6) == [3, 6]
    assert L.map_layers(4, 12) == [3, 6, 9, 12]
    assert L.map_layers(6, 6) == [1, 2, 3, 4, 5, 6]
    # not divisible: n * L_T / L_S rounded half up; strictly increasing, ends at L_T
    assert L.map_layers(5, 12) == [2, 5, 7, 10, 12]  # 2.4 4.8 7.2 9.6 12
    assert L.map_layers(4, 6) == [2, 3, 5, 6]  # 1.5 3 4.5 6 -> halves round up
    with pytest.raises(ValueError, match="more than"):
        L.map_layers(8, 6)


def test_map_layers_last_and_explicit() -> None:
    assert L.map_layers(3, 12, "last") == [10, 11, 12]
    assert L.map_layers(2, 2, "last") == [1, 2]
    assert L.map_layers(3, 12, "explicit", [1, 6, 12]) == [1, 6, 12]
    with pytest.raises(ValueError, match="3 layers"):
        L.map_layers(3, 12, "explicit", [4, 8])
    with pytest.raises(ValueError, match="out of range"):
        L.map_layers(2, 12, "explicit", [0, 12])
    with pytest.raises(ValueError, match="out of range"):
        L.map_layers(2, 12, "explicit", [6, 13])
    with pytest.raises(ValueError, match="strategy='explicit'"):
        L.map_layers(2, 12, "uniform", [6, 12])
    with pytest.raises(ValueError, match="unknown strategy"):
        L.map_layers(2, 12, "first")
