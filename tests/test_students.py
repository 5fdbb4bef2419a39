"""Students without Ray: the Transformer student (free head count, capture of its internals),
seeding it from a teacher's layers, embedding projection when widths differ, save/load, and the
HF export. Teachers are tiny random BERTs with the real tokenizer (see conftest)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from pipeline import models
from pipeline.config import StudentConfig, load
from pipeline.encoder import Capture, EncoderClassifier
from pipeline.errors import ConfigError
from pipeline.export import export_student
from pipeline.tasks import get_task
from tests.conftest import make_tiny_teacher

SENTS = ["a gripping and funny film", "dull", "the plot never comes together at all"]
OTHERS = ["boring from start to end", "a small gem", "great"]
TASKS = {"sst2": 2, "mrpc": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher4(tmp_path_factory):
    """A 4-layer, 32-wide, 4-head random teacher (FFN 64) with sst2/mrpc heads."""
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher4"), TASKS, seed=1, layers=4)


@pytest.fixture(scope="module")
def tok(teacher4):
    return AutoTokenizer.from_pretrained(str(teacher4))


def student(teacher, **kw) -> EncoderClassifier:
    torch.manual_seed(0)
    fields = dict(layers=2, hidden=32, heads=4, ffn=64, dropout=0.0) | kw
    return models.transformer_student(StudentConfig(**fields), str(teacher), TASKS)


def layer_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def attention_by_hand(q, k, v, mask, heads):
    """softmax(Q Kᵀ / sqrt(d_h)) V per head, padded keys masked, heads concatenated."""
    b, t, d = q.shape
    split = lambda x: x.view(b, t, heads, d // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, t, d)


# ------------------------------------------------------------------- shapes and capture


@pytest.mark.parametrize("hidden,heads", [(36, 3), (40, 5)])
def test_odd_head_counts_forward_and_capture(teacher4, tok, hidden, heads):
    model = student(teacher4, hidden=hidden, heads=heads, ffn=2 * hidden, layers=3).eval()
    assert (models.num_layers(model), models.width(model), models.num_heads(model)) == (3, hidden, heads)
    enc = tok(SENTS, return_tensors="pt", padding=True)
    cap = Capture(embeddings=True, hidden=(1, 2, 3), attn=(1, 3), qkv=(2, 3))
    with torch.no_grad():
        f = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], "sst2", cap)
    b, t = enc["input_ids"].shape
    assert f.logits.shape == (b, 2) and f.cls.shape == (b, hidden)
    assert f.embeddings.shape == (b, t, hidden)
    assert sorted(f.hidden) == [1, 2, 3] and sorted(f.attn) == [1, 3] and sorted(f.qkv) == [2, 3]
    assert all(x.shape == (b, t, hidden) for x in [*f.hidden.values(), *f.attn.values(),
                                                    *f.qkv[2], *f.qkv[3]])
    # the captured attention output is the per-head context before W_O, for the odd head count
    torch.testing.assert_close(f.attn[3], attention_by_hand(*f.qkv[3], enc["attention_mask"], heads),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(f.cls, f.hidden[3][:, 0])  # top hidden state's [CLS]
    # nothing captured unless asked for
    with torch.no_grad():
        plain = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], "mrpc")
    assert plain.embeddings is None and not (plain.hidden or plain.attn or plain.qkv)
    assert plain.logits.shape == (b, 2)


def test_heads_must_divide_hidden():
    with pytest.raises(ConfigError, match="heads=5 must divide hidden=32"):
        load(None, ["student.hidden=32", "student.heads=5"])
    assert load(None, ["student.hidden=36", "student.heads=3"]).student.heads == 3


# ------------------------------------------------------------------- init from the teacher


@pytest.mark.parametrize("init,extra,expected", [
    ("uniform", {}, [2, 4]),  # g(n) = n * 4 / 2
    ("first", {}, [1, 2]),
    ("explicit", {"init_layers": (3, 1)}, [3, 1]),
])
def test_init_copies_teacher_layers(teacher4, init, extra, expected):
    t = EncoderClassifier.load(teacher4)
    s = student(teacher4, init=init, **extra)
    assert models.init_layers(StudentConfig(layers=2, hidden=32, heads=4, ffn=64, init=init, **extra),
                              4) == expected
    for s_layer, t_index in zip(s.encoder.encoder.layer, expected):
        assert layer_equal(s_layer, t.encoder.encoder.layer[t_index - 1])
    others = [i for i in range(1, 5) if i not in expected]
    assert not layer_equal(s.encoder.encoder.layer[0], t.encoder.encoder.layer[others[0] - 1])
    assert layer_equal(s.encoder.embeddings, t.encoder.embeddings)
    assert layer_equal(s.encoder.pooler, t.encoder.pooler)
    assert layer_equal(s.heads, t.heads)  # a task-tuned raykd teacher hands on its heads


def test_init_with_other_head_count_copies_layers_and_runs(teacher4, tok):
    t = EncoderClassifier.load(teacher4).eval()
    s = student(teacher4, heads=2).eval()  # teacher has 4 heads; Q/K/V/O are [32, 32] either way
    assert s.config.num_attention_heads == 2
    assert layer_equal(s.encoder.encoder.layer[1], t.encoder.encoder.layer[3])
    enc = tok(SENTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        f = s(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], "sst2",
              Capture(attn=(2,), qkv=(2,)))
    torch.testing.assert_close(f.attn[2], attention_by_hand(*f.qkv[2], enc["attention_mask"], 2),
                               atol=1e-5, rtol=1e-4)
    assert torch.isfinite(f.logits).all()


def test_no_layer_copy_when_random_or_ffn_differs(teacher4):
    t = EncoderClassifier.load(teacher4)
    for s in (student(teacher4, init="random"), student(teacher4, ffn=48)):
        assert not any(layer_equal(sl, tl) for sl in s.encoder.encoder.layer
                       for tl in t.encoder.encoder.layer)
        assert layer_equal(s.encoder.embeddings, t.encoder.embeddings)  # same width: still copied


def test_init_rejects_too_many_layers(teacher4):
    with pytest.raises(ValueError, match="5 layers"):
        student(teacher4, layers=5, init="first")
    with pytest.raises(ValueError, match="more than the teacher"):
        student(teacher4, layers=5, init="uniform")


def test_width_mismatch_projects_embeddings_by_pca(teacher4):
    t = EncoderClassifier.load(teacher4)
    s = student(teacher4, hidden=12, heads=3, ffn=24)
    word_t = t.encoder.embeddings.word_embeddings.weight.detach().double().numpy()
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert getattr(s.encoder.embeddings, name).weight.shape[1] == 12
    # independent PCA (numpy): the student's columns are the projections on the top 12 directions
    centred = word_t - word_t.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    for name in ("word_embeddings", "position_embeddings"):
        src = getattr(t.encoder.embeddings, name).weight.detach().double().numpy()
        got = getattr(s.encoder.embeddings, name).weight.detach().double().numpy()
        want = src @ vt[:12].T
        for j in range(12):  # SVD signs are arbitrary: compare up to sign
            sign = np.sign(np.dot(got[:, j], want[:, j]))  # fp32 vs fp64 SVD: relative error
            assert np.linalg.norm(sign * got[:, j] - want[:, j]) < 1e-3 * np.linalg.norm(want[:, j])
    # and it keeps the vocabulary's geometry: row similarities correlate with the teacher's
    rng = np.random.default_rng(0)
    rows = rng.choice(word_t.shape[0], 300, replace=False)
    got = s.encoder.embeddings.word_embeddings.weight.detach().double().numpy()[rows]
    sim_t = (centred[rows] @ centred[rows].T)[np.triu_indices(300, 1)]
    g = got - got.mean(0)
    sim_s = (g @ g.T)[np.triu_indices(300, 1)]
    assert np.corrcoef(sim_t, sim_s)[0, 1] > 0.5
    # a random init would not correlate with the teacher at all
    r = torch.nn.Embedding(*got.shape).weight.detach().double().numpy()[:300]
    r = r - r.mean(0)
    assert abs(np.corrcoef(sim_t, (r @ r.T)[np.triu_indices(300, 1)])[0, 1]) < 0.2


def test_wider_student_embeddings_keep_dot_products(teacher4):
    t = EncoderClassifier.load(teacher4)
    s = student(teacher4, hidden=48, heads=4, ffn=96)  # wider than the 32-wide teacher
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        src = getattr(t.encoder.embeddings, name).weight.detach()[:500].double()
        got = getattr(s.encoder.embeddings, name).weight.detach()[:500].double()
        assert got.shape[1] == 48
        torch.testing.assert_close(got @ got.T, src @ src.T, atol=1e-6, rtol=1e-4)


def test_save_load_round_trip_keeps_head_dropout(teacher4, tmp_path, tok):
    s = student(teacher4, hidden=36, heads=3, ffn=72).eval()
    models.save_folder(s, tmp_path / "m")
    back = models.load_model(tmp_path / "m").eval()
    assert isinstance(back, EncoderClassifier) and back.config.num_attention_heads == 3
    assert back.dropout.p == 0.0  # the student's dropout, not a default
    enc = tok(SENTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        a = s(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], "mrpc").logits
        b = back(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], "mrpc").logits
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------- export


def test_export_loads_in_transformers_with_same_logits(teacher4, tmp_path, tok):
    s = student(teacher4, hidden=36, heads=3, ffn=72)
    with torch.no_grad():  # distinct heads per task, so a mixed-up head would show
        for head in s.heads.values():
            head.weight.normal_(0, 0.5)
            head.bias.normal_(0, 0.5)
    s.eval()
    folders = export_student(s, [get_task("sst2"), get_task("mrpc")], teacher4, tmp_path / "export")
    assert [f.name for f in folders] == ["sst2", "mrpc"]
    for task, folder, pair in (("sst2", folders[0], None), ("mrpc", folders[1], OTHERS)):
        hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        assert hf.config.num_attention_heads == 3 and hf.config.num_labels == 2
        enc = AutoTokenizer.from_pretrained(folder)(SENTS, pair, return_tensors="pt", padding=True)
        with torch.no_grad():
            want = s(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], task).logits
            got = hf(**enc).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    clf = pipeline("text-classification", model=str(folders[0]), device="cpu")
    out = clf(SENTS)
    labels = set(get_task("sst2").labels)
    assert len(out) == 3 and all(o["label"] in labels and 0 <= o["score"] <= 1 for o in out)
    top = s(**{k: v for k, v in AutoTokenizer.from_pretrained(folders[0])(
        SENTS, return_tensors="pt", padding=True).items()}, task="sst2").logits.argmax(-1)
    assert [o["label"] for o in out] == [get_task("sst2").labels[i] for i in top]


def test_export_bilstm_keeps_torch_folder(teacher4, tmp_path):
    torch.manual_seed(0)
    scfg = StudentConfig(arch="bilstm", layers=1, hidden=16, heads=4, lstm_hidden=8, dropout=0.0)
    s = models.bilstm_student(scfg, str(teacher4), TASKS, ("mrpc",)).eval()
    (folder,) = export_student(s, [get_task("mrpc")], teacher4, tmp_path / "export")
    back = models.load_model(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(SENTS, OTHERS, return_tensors="pt", padding=True)
    with torch.no_grad():
        args = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], "mrpc")
        torch.testing.assert_close(back(*args).logits, s(*args).logits)


# ------------------------------------------------------------------- pooling


def test_mean_pooled_teacher_from_a_sentence_transformers_folder(teacher4, tmp_path, tok):
    """teacher.pooling=auto picks mean pooling for a sentence-transformers folder; the model
    averages real tokens only (padding changes nothing), has no unused pooler, survives
    save/load with a fingerprint of its own, refuses the [CLS] export, and still seeds a student."""
    import json
    import shutil

    from pipeline.encoder import fingerprint, sentence_pooling
    from pipeline.teacher import teacher_pooling

    base = tmp_path / "st_base"
    shutil.copytree(teacher4, base)
    assert sentence_pooling(str(base)) == "cls"
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    cfg = load(None, ["teacher.pooling=auto"])
    assert teacher_pooling(cfg, str(base)) == "mean"
    assert teacher_pooling(load(None, []), str(base)) == "cls"
    with pytest.raises(ConfigError, match="pooling"):
        load(None, ["teacher.pooling=max"])

    torch.manual_seed(0)
    m = models.build({"kind": "pretrained", "path": str(base), "dropout": 0.0, "pooling": "mean"}, TASKS).eval()
    assert m.encoder.pooler is None
    enc = tok(SENTS[:1], return_tensors="pt")
    padded = tok(SENTS[:1], return_tensors="pt", padding="max_length", max_length=enc["input_ids"].shape[1] + 5)
    with torch.no_grad():
        a = m(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], "sst2").logits
        b = m(padded["input_ids"], padded["attention_mask"], padded["token_type_ids"], "sst2").logits
        seq = m.encoder(**enc).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a, m.heads["sst2"](seq.mean(1)))

    m.save(tmp_path / "mean")
    back = EncoderClassifier.load(tmp_path / "mean").eval()
    assert back.pooling == "mean" and back.encoder.pooler is None
    with torch.no_grad():
        torch.testing.assert_close(back(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], "sst2").logits, a)
    meta = json.loads((tmp_path / "mean/raykd.json").read_text())
    assert meta["pooling"] == "mean" and meta["fingerprint"] == fingerprint(tmp_path / "mean")
    with pytest.raises(ValueError, match="only \\[CLS\\]-pooled"):
        export_student(back, [get_task("sst2")], teacher4, tmp_path / "export")
    s = student(tmp_path / "mean")  # the student keeps [CLS] pooling (exportable); its pooler stays fresh
    assert s.pooling == "cls" and s.encoder.pooler is not None
    assert layer_equal(s.encoder.embeddings, back.encoder.embeddings)
    meta["pooling"] = "cls"  # the same files read as [CLS]-pooled are another teacher
    (tmp_path / "mean/raykd.json").write_text(json.dumps(meta))
    assert fingerprint(tmp_path / "mean") != meta["fingerprint"]


def test_fast_dropout_keeps_torch_semantics():
    """The CPU dropout drops ~p of the elements, scales the rest by 1/(1-p), passes gradients
    only through kept elements, is the identity in eval mode, and replaces every nn.Dropout of
    an encoder without changing its state dict."""
    import torch
    from torch import nn

    from pipeline.dropout import Dropout, keep_mask, use_fast_dropout

    torch.manual_seed(0)
    assert abs(float(keep_mask((1000, 1000), 0.1).float().mean()) - 0.9) < 2e-3
    assert abs(float(keep_mask((999, 7), 0.5).float().mean()) - 0.5) < 2e-2  # n not a multiple of 4
    x = torch.randn(8, 5, 16, requires_grad=True)
    drop = Dropout(0.25).train()
    y = drop(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    assert drop.eval()(x) is x
    torch.manual_seed(1)
    a = Dropout(0.1).train()(x)
    torch.manual_seed(1)
    torch.testing.assert_close(Dropout(0.1).train()(x), a)  # seeded like any torch draw

    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3), nn.Sequential(nn.Dropout(0.2)))
    before = model.state_dict()
    use_fast_dropout(model)
    assert [type(m) for m in model.modules() if isinstance(m, nn.Dropout)] == [Dropout, Dropout]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.2]
    assert model.state_dict().keys() == before.keys()


# ------------------------------------------------------------------- precision and latency

def test_bf16_only_where_the_cpu_has_it_natively(teacher4):
    """CPU autocast to bf16 is used (training, caching, evaluation) and timed only on CPUs with
    native bf16 (AMX or AVX512-BF16): emulated, it is ~100x slower than fp32. The rule follows
    the kernel's own CPU flags; latency always has fp32 and has bf16 exactly where it is native."""
    from pipeline.evaluate import bf16_supported, cpu_bf16_native, fast_precision, latency_table

    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    native = bool({"amx_tile", "avx512_bf16"} & flags)
    assert cpu_bf16_native() == native == bf16_supported(torch.device("cpu"))
    assert fast_precision() == ("bf16" if native else "fp32")
    model = student(teacher4)
    keys = set(latency_table(model, seq_len=8, task="sst2", batch_sizes=(1,), min_time_s=0.01))
    assert keys == {"bs1_fp32_ms"} | ({"bs1_bf16_ms"} if native else set()), keys
