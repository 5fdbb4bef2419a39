"""The objective (plans, quantities, every loss through `compute_loss`, online == cached teacher
batches) without Ray, then the one training loop under real Ray Train on 64 GLUE rows: every
loss from the cache over two chained stages, DDP == one worker, resume after a killed worker
(BiLSTM on a pair task), NaN stops with a clear error, a missing cached quantity, online mode,
checkpoints and the NaN message in S3 (moto on 127.0.0.1, `run.storage_path`).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from pipeline import data, losses as L, models
from pipeline.batching import collate_inputs
from pipeline.cache.build import ensure_cache
from pipeline.cache.compute import teacher_columns
from pipeline.cache.reader import collate_teacher
from pipeline.cache.schema import columns_for
from pipeline.cache import store
from pipeline.cache.store import CacheError
from pipeline.config import LOSS_NAMES, StageConfig, load
from pipeline.distill import CRASH_ENV, STATE_FILE, NonFiniteLoss, Trainee, train_storage
from pipeline.encoder import EncoderClassifier
from pipeline.errors import ConfigError
from pipeline.objective import (build_projections, check_stage, compute_loss, make_plan,
                                teacher_batch, teacher_quantities)
from pipeline.stages import distill_student, required_quantities
from pipeline.students.bilstm import BiLSTMClassifier

FEATURE_LOSSES = {"hidden_mse": 1, "emb_relation": 1, "mha_relation": 1, "qkv_relation": 1,
                  "attention_mse": 1}
PREDICTION_LOSSES = {"hard": 1, "kd": 1, "soft_ce": 1, "logit_mse": 1, "sample_relation": 1,
                     "supcon": 1}
ALL_LOSSES = FEATURE_LOSSES | PREDICTION_LOSSES
SENTS = ["a gripping and funny film", "dull", "the plot never comes together at all",
         "i would watch it again tomorrow", "boring from start to end"]


def test_every_loss_is_covered_here():
    assert sorted(ALL_LOSSES) == sorted(LOSS_NAMES)




# ------------------------------------------------------------------- plans and quantities

# student 2 layers, teacher 4: uniform map [2, 4]; MiniLMv2's relation uses the top pair (2 <- 4)
EXPECTED = {
    "hard": ([], {}),
    "kd": (["logits"], {}), "soft_ce": (["logits"], {}), "logit_mse": (["logits"], {}),
    "sample_relation": (["cls"], {}), "supcon": (["cls"], {}),
    "hidden_mse": (["hidden_2", "hidden_4"], {"hidden": (1, 2)}),
    "emb_relation": (["embeddings"], {"embeddings": True}),
    "mha_relation": (["attn_2", "attn_4"], {"attn": (1, 2)}),
    "qkv_relation": (["qkv_4"], {"qkv": (2,)}),
    "attention_mse": (["qkv_2", "qkv_4"], {"qkv": (1, 2)}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_plan_and_teacher_quantities_per_loss(name):
    plan = make_plan(StageConfig(losses={name: 1.0}), 2, 4)
    quantities, student = EXPECTED[name]
    assert teacher_quantities(plan) == quantities
    for field in ("embeddings", "hidden", "attn", "qkv"):
        want = student.get(field, False if field == "embeddings" else ())
        assert getattr(plan.student, field) == want, field
    # the teacher captures exactly the mapped layers of what the student captures
    assert (plan.teacher.hidden, plan.teacher.attn) == tuple(
        tuple(plan.layer_map[n - 1] for n in getattr(plan.student, f)) for f in ("hidden", "attn"))


def test_plan_layer_maps_and_logit_only_students():
    plan = make_plan(StageConfig(losses={"hidden_mse": 1, "kd": 1}, layer_map="last"), 2, 4)
    assert teacher_quantities(plan) == ["logits", "hidden_3", "hidden_4"]
    plan = make_plan(StageConfig(losses={"mha_relation": 1}, layer_map="explicit",
                                 layer_map_explicit=(1, 3)), 2, 4)
    assert teacher_quantities(plan) == ["attn_1", "attn_3"]
    plan = make_plan(StageConfig(losses={"hidden_mse": 1, "mha_relation": 1, "attention_mse": 1},
                                 layer_map="explicit", layer_map_explicit=(4, 4)), 2, 4)
    assert teacher_quantities(plan) == ["hidden_4", "attn_4", "qkv_4"]  # each once
    assert plan.layer_map == (4, 4) and plan.student.hidden == (1, 2)
    # a 3-layer BiLSTM under a 2-layer teacher: logit losses map no layers, so this must work
    assert teacher_quantities(make_plan(StageConfig(losses={"kd": 1, "hard": 1}), 3, 2)) == ["logits"]
    with pytest.raises(ValueError, match="more than the teacher"):
        make_plan(StageConfig(losses={"hidden_mse": 1}), 3, 2)


# ------------------------------------------------------------------- compute_loss, every loss

S_HIDDEN, S_HEADS, T_HIDDEN, T_HEADS = 24, 4, 32, 4


def tiny_student(layers: int = 2) -> EncoderClassifier:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=S_HIDDEN, num_hidden_layers=layers,
                     num_attention_heads=S_HEADS, intermediate_size=48, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return EncoderClassifier(BertModel(cfg), {"cls3": 3, "reg": 1}, dropout=0.0)


def random_teacher_batch(plan, b: int, t: int, classes: int, seed: int = 0) -> dict:
    """Random `t_*` tensors with the keys and shapes the cache reader gives for this plan."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for q in teacher_quantities(plan):
        if q == "logits":
            out["t_logits"] = torch.randn(b, classes, generator=g) * 2
            out["t_probs"] = out["t_logits"].softmax(-1)
        elif q == "cls":
            out["t_cls"] = torch.randn(b, T_HIDDEN, generator=g)
        elif q.startswith("qkv_"):
            for p in "qkv":
                out[f"t_{p}_{q[4:]}"] = torch.randn(b, t, T_HIDDEN, generator=g)
        else:
            out[f"t_{q}"] = torch.randn(b, t, T_HIDDEN, generator=g)
    return out


@pytest.mark.parametrize("kind", ["classification", "regression"])
@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_compute_loss_every_loss_is_finite_and_trains_the_student(name, kind, one_thread):
    model = tiny_student()
    stage = StageConfig(losses={name: 1.0}, relation_heads=4)
    check_stage(stage, "transformer", S_HEADS, S_HIDDEN, T_HEADS, T_HIDDEN)
    plan = make_plan(stage, 2, 4)
    proj = build_projections(stage, plan, S_HIDDEN, T_HIDDEN)
    b, t = 6, 7
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    task, classes = ("cls3", 3) if kind == "classification" else ("reg", 1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2]) if kind == "classification" else torch.rand(b, generator=g) * 5
    batch = {"input_ids": torch.randint(5, 50, (b, t), generator=g) * mask, "attention_mask": mask,
             "token_type_ids": torch.zeros(b, t, dtype=torch.long), "labels": labels,
             **random_teacher_batch(plan, b, t, classes)}
    feats = model(batch["input_ids"], mask, batch["token_type_ids"], task, plan.student)
    loss, terms = compute_loss(stage, plan, feats, batch, proj, kind, S_HEADS)
    assert list(terms) == [name] and math.isfinite(terms[name]) and terms[name] >= 0
    loss.backward()
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(x).all() for x in grads)
    assert sum(float(x.abs().sum()) for x in grads) > 0
    for p in proj.parameters():  # learned projections (hidden_mse; supcon at other widths)
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_compute_loss_weights_and_sums_terms():
    model = tiny_student()
    stage = StageConfig(losses={"hard": 0.5, "kd": 2.0, "logit_mse": 0.0})
    plan = make_plan(stage, 2, 4)
    batch = {"input_ids": torch.randint(5, 50, (4, 5)), "attention_mask": torch.ones(4, 5, dtype=torch.long),
             "token_type_ids": torch.zeros(4, 5, dtype=torch.long), "labels": torch.tensor([0, 1, 2, 1]),
             **random_teacher_batch(plan, 4, 5, 3)}
    feats = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], "cls3")
    loss, terms = compute_loss(stage, plan, feats, batch, build_projections(stage, plan, 24, 32),
                               "classification", S_HEADS)
    assert set(terms) == {"hard", "kd"}  # weight 0: not computed
    want = 0.5 * L.hard_loss(feats.logits, batch["labels"], "classification") \
        + 2.0 * L.soft_kl(feats.logits, batch["t_logits"])
    torch.testing.assert_close(loss, want)


def test_trainee_computes_losses_in_fp32_under_bf16_autocast(one_thread):
    """The loop runs the student under bf16 autocast; the losses (relation softmaxes, KLs) must
    still run in fp32 on those features, as losses.py promises (autocast would make every
    matmul inside them bf16)."""
    model = tiny_student()
    stage = StageConfig(losses={"emb_relation": 1, "mha_relation": 1, "qkv_relation": 1,
                                "sample_relation": 1, "hidden_mse": 1, "kd": 1}, relation_heads=4)
    plan = make_plan(stage, 2, 2)
    proj = build_projections(stage, plan, S_HIDDEN, S_HIDDEN)
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[0, 5:] = 0
    batch = {"input_ids": torch.randint(5, 50, (4, 9), generator=g), "attention_mask": mask,
             "token_type_ids": torch.zeros(4, 9, dtype=torch.long)}
    with torch.no_grad():  # a teacher: the same network in fp32, slightly perturbed
        t = model(batch["input_ids"], mask, batch["token_type_ids"], "cls3", plan.teacher)
        batch |= {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in teacher_batch(t, plan).items()}
    trainee = Trainee(model, proj, stage, plan)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, terms = trainee(batch, "cls3", "classification")
        feats = model(batch["input_ids"], mask, batch["token_type_ids"], "cls3", plan.student)
    assert feats.qkv[2][0].dtype == feats.attn[1].dtype == torch.bfloat16  # student ran in bf16
    _, want = compute_loss(stage, plan, feats, batch, proj, "classification", S_HEADS)  # fp32
    assert terms.keys() == want.keys()
    for k in terms:
        assert terms[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k


def test_check_stage_rejects_shapes_the_losses_cannot_use():
    ok = dict(arch="transformer", student_heads=4, student_width=32, teacher_heads=4, teacher_width=32)
    # 8 chunks divide both widths (the loss itself would run) but cut the teacher's 4 heads apart
    L.mha_relation_kl(torch.randn(2, 3, 32), torch.randn(2, 3, 32), torch.ones(2, 3), 8)
    with pytest.raises(ConfigError, match=r"8 chunks.*teacher's 4 heads.*divisor of 4"):
        check_stage(StageConfig(losses={"mha_relation": 1}, relation_splits=8), **ok)
    with pytest.raises(ConfigError, match=r"3 chunks.*0 = the student's 3 heads"):
        check_stage(StageConfig(losses={"mha_relation": 1}), **(ok | {"student_heads": 3,
                                                                       "student_width": 36}))
    check_stage(StageConfig(losses={"mha_relation": 1}, relation_splits=2), **ok)  # 2 divides 4
    with pytest.raises(ConfigError, match="relation_heads=12 must divide"):
        check_stage(StageConfig(losses={"qkv_relation": 1}), **ok)
    with pytest.raises(ConfigError, match=r"attention_mse.*\(2\).*\(4\)"):
        check_stage(StageConfig(losses={"attention_mse": 1}), **(ok | {"student_heads": 2}))
    with pytest.raises(ConfigError, match=r"BiLSTM.*\['hidden_mse'\]"):
        check_stage(StageConfig(losses={"kd": 1, "hidden_mse": 1}), **(ok | {"arch": "bilstm"}))


def test_distill_student_checks_stages_before_any_work(tiny_teacher, tmp_path):
    cfg = tiny_cfg(tmp_path, tiny_teacher, "distill.stages=[{name: a, losses: {kd: 1}}, "
                   "{name: b, losses: {mha_relation: 1}, relation_splits: 8}]")
    with pytest.raises(ConfigError, match="stage 'b': mha_relation splits"):
        distill_student(cfg, {"sst2": [tiny_teacher]}, build_cache=True)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "sst2").exists()


# ------------------------------------------------------------------- online == cached batch


@pytest.mark.parametrize("losses", [ALL_LOSSES, FEATURE_LOSSES, {"kd": 1}, {"supcon": 1}],
                         ids=["all", "features", "kd", "supcon"])
@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("int8", 3e-2)])
def test_online_teacher_batch_matches_cached_columns(tiny_teacher, losses, dtype, tol, one_thread):
    teacher = EncoderClassifier.load(tiny_teacher).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_teacher))
    frame = pd.DataFrame({"example_id": range(5), "text_a": SENTS, "text_b": "", "label": [1, 0, 0, 1, 0]})
    table = data.tokenize_frame(frame, tok, 32)
    plan = make_plan(StageConfig(losses=losses), 2, 2)
    columns = [c for q in teacher_quantities(plan) for c in columns_for(q, 32, 2, 1, dtype)]
    cached = teacher_columns([teacher], table, "sst2", columns, 2, torch.device("cpu"), amp=False)
    from_cache = collate_teacher(cached, {c.name: c.__dict__ for c in columns})
    b = collate_inputs(table)
    with torch.no_grad():
        online = teacher_batch(teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"], "sst2",
                                       plan.teacher), plan)
    assert sorted(online) == sorted(from_cache)
    if losses is ALL_LOSSES:
        assert {"t_logits", "t_probs", "t_cls", "t_embeddings", "t_hidden_2", "t_attn_1",
                "t_q_2"} <= set(online)
    real = b["attention_mask"].bool()
    for key, want in from_cache.items():
        got = online[key]
        # token tensors keep the stored dtype (fp16; int8 is dequantized to fp32); losses upcast
        assert want.dtype == (torch.float16 if dtype == "float16" and want.dim() == 3 else torch.float32), key
        assert got.shape == want.shape and got.dtype == torch.float32, key
        want = want.float()
        if got.dim() == 3:  # token-level: the cache holds real tokens only (padding is masked)
            got, want = got[real], want[real]
        scale = float(want.abs().max())
        assert float((got - want).abs().max()) <= tol * scale, key


# ------------------------------------------------------------------- under Ray Train


def tiny_cfg(tmp: Path, teacher: Path, *overrides: str, cache_root: Path | None = None):
    return load(None, [f"run.output_dir={tmp}", f"cache.root={cache_root or tmp / 'cache'}",
                       f"teacher.path={teacher}", f"teacher.model={teacher}", "data.train_limit=64",
                       "data.dev_limit=32", "student.layers=2", "student.hidden=32", "student.heads=4",
                       "student.ffn=64", *overrides])


def stages_yaml(*stages: dict) -> str:
    return "distill.stages=" + json.dumps(list(stages))


# stage 0 maps both student layers to teacher layer 2 (explicit map), so the cache never holds
# hidden_1: the missing-quantity test below relies on that
CHAINED = (
    {"name": "features", "losses": FEATURE_LOSSES, "relation_heads": 4, "layer_map": "explicit",
     "layer_map_explicit": [2, 2], "optim": {"epochs": 1, "batch_size": 16, "lr": 1e-3}},
    {"name": "predictions", "losses": PREDICTION_LOSSES,
     "optim": {"epochs": 1, "batch_size": 16, "lr": 1e-9}},
)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory, tiny_teacher, ray_local, glue_dir):
    """One sst2 cache for this module holding what the chained stages read (one Ray Data job);
    teacher outputs depend on teacher and data only, so the other cached runs reuse it."""
    root = tmp_path_factory.mktemp("shared_cache")
    cfg = tiny_cfg(root, tiny_teacher, stages_yaml(*CHAINED), cache_root=root)
    quantities = required_quantities(cfg, tiny_teacher)
    assert sorted(quantities) == ["attn_2", "cls", "embeddings", "hidden_2", "logits", "qkv_2"]
    ensure_cache(cfg, [tiny_teacher], "sst2", "train", quantities)
    return root


def encoder_state(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in models.load_model(folder).state_dict().items() if k.startswith("encoder.")}


def test_every_loss_over_two_chained_stages(tiny_teacher, shared_cache, tmp_path):
    """Stage 0 runs the feature/relation losses, stage 1 the prediction losses (all from the
    cache); stage 1 must start from stage 0's weights: with a near-zero lr it must end where
    stage 0 ended, which is far from a fresh student."""
    cfg = tiny_cfg(tmp_path, tiny_teacher, "student.init=random", stages_yaml(*CHAINED),
                   "run.keep_checkpoints=false", cache_root=shared_cache)
    final = distill_student(cfg, {"sst2": [tiny_teacher]}, build_cache=True)
    out = tmp_path / "sst2" / "student"
    folders = [out / "stage0-features", out / "stage1-predictions"]
    assert final == folders[1]
    # keep_checkpoints=false: the stages' Ray Train folder is gone once their models are out
    assert not (out / ".ray_train" / "stages_train").exists()
    assert json.loads((out / "final.json").read_text()) == {
        "student": str(folders[1]), "by_task": {"sst2": str(folders[1])}}
    for folder, losses in zip(folders, (FEATURE_LOSSES, PREDICTION_LOSSES)):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["step"] == 4 and metrics["epoch"] == 0  # 64 rows / batch 16
        assert 0 <= metrics["sst2/accuracy"] <= 100 and metrics["dev_main"] == metrics["sst2/accuracy"]
        assert sorted(k[5:] for k in metrics if k.startswith("loss/")) == sorted(losses)
        assert all(math.isfinite(metrics[f"loss/{n}"]) for n in losses)
        assert not {"teacher_forward_fraction", "final_epoch_teacher_forward_fraction"} & set(metrics)  # cached
        # one epoch: its own data-wait share is the run's
        assert 0 <= metrics["final_epoch_data_wait_fraction"] == metrics["data_wait_fraction"] < 1
        assert (folder / "model" / "tokenizer.json").is_file()
    # both stages ran in one Ray Train run (one placement group: no second set of processes)
    groups = {json.loads((f / "metrics.json").read_text())["placement_group"] for f in folders}
    assert len(groups) == 1 and "" not in groups, groups
    assert isinstance(models.load_model(folders[1] / "model"), EncoderClassifier)

    torch.manual_seed(cfg.run.seed)  # the fresh student the first stage started from
    fresh = models.transformer_student(cfg.student, str(tiny_teacher), {"sst2": 2})
    fresh = {k: v for k, v in fresh.state_dict().items() if k.startswith("encoder.")}
    s0, s1 = encoder_state(folders[0] / "model"), encoder_state(folders[1] / "model")
    layer = "encoder.encoder.layer.0.attention.self.query.weight"
    assert float((s0[layer] - fresh[layer]).abs().max()) > 1e-4  # stage 0 trained
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], atol=1e-6, rtol=0, msg=k)


def test_two_worker_ddp_matches_one_worker(tiny_teacher, shared_cache, tmp_path):
    """One optimizer step over all 64 rows: one worker takes them as one batch, two workers 32
    each (streaming_split is equal, so the union is all rows whatever Ray Data's order). With
    dropout 0, fp32 and per-example-mean losses, DDP's averaged gradient is the full-batch
    gradient, so both runs must end with the same weights. Without gradient sync, rank 0 would
    have stepped on its half only."""
    stage = {"name": "ddp", "losses": {"hard": 1, "kd": 1},
             "optim": {"epochs": 1, "batch_size": 64, "lr": 1e-3, "bf16": False, "warmup_ratio": 0}}
    folders = {}
    for workers in (1, 2):
        cfg = tiny_cfg(tmp_path / f"w{workers}", tiny_teacher, "student.init=random", "student.dropout=0",
                       f"ray.num_workers={workers}", "ray.cpus_per_worker=0.5", stages_yaml(stage),
                       cache_root=shared_cache)
        folders[workers] = distill_student(cfg, {"sst2": [tiny_teacher]})
        assert json.loads((folders[workers] / "metrics.json").read_text())["step"] == 1
    one, two = encoder_state(folders[1] / "model"), encoder_state(folders[2] / "model")
    torch.manual_seed(0)
    fresh = models.transformer_student(cfg.student, str(tiny_teacher), {"sst2": 2}).state_dict()
    key = "encoder.encoder.layer.1.output.dense.weight"
    assert float((one[key] - fresh[key]).abs().max()) > 5e-4  # the step moved the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-6, rtol=1e-4, msg=k)
    heads = [models.load_model(folders[w] / "model").heads["sst2"].weight for w in (1, 2)]
    torch.testing.assert_close(heads[1], heads[0], atol=2e-6, rtol=1e-4)


def test_bilstm_pair_task_resumes_after_a_killed_worker(tiny_teacher, ray_local, glue_dir, tmp_path,
                                                        monkeypatch):
    """BiLSTM student on MRPC (a pair task; teacher in the loop, so no second cache job), two
    stages in one Ray Train run: 1 epoch, then 2 epochs of 4 steps; the worker process exits at
    step 6 of the second stage (its epoch 1) once. Ray Train restarts it (max_failures=2); it
    must skip the finished first stage and resume the second from its epoch-0 checkpoint, not
    start over."""
    monkeypatch.setenv(CRASH_ENV, "6")
    kd = {"name": "kd", "losses": {"kd": 1, "hard": 1}, "optim": {"epochs": 1, "batch_size": 16, "lr": 1e-3}}
    cfg = tiny_cfg(tmp_path, tiny_teacher, "data.tasks=[mrpc]", "distill.online=true", "student.arch=bilstm",
                   "student.layers=1", "student.hidden=16", "student.lstm_hidden=8",
                   stages_yaml(kd, kd | {"name": "kd2", "optim": kd["optim"] | {"epochs": 2}}))
    final = distill_student(cfg, {"mrpc": [tiny_teacher]})
    run = final.parent / ".ray_train" / "stages_train"
    marker = run / "test_crash.marker"
    assert marker.is_file()  # the worker did die once
    first = final.parent / "stage0-kd" / "metrics.json"
    assert first.stat().st_mtime_ns < marker.stat().st_mtime_ns  # not retrained after the crash
    states = [torch.load(p, weights_only=False) for p in run.glob(f"checkpoint_*/{STATE_FILE}")]
    last = max(states, key=lambda s: s["step"])
    assert (last["epoch"], last["step"], last["start_epoch"]) == (1, 8, 1)  # resumed at epoch 1
    assert last["out_dir"] == str(final)
    model = models.load_model(final / "model")
    assert isinstance(model, BiLSTMClassifier) and model.cfg.pair_tasks == ("mrpc",)
    metrics = json.loads((final / "metrics.json").read_text())
    assert {"mrpc/accuracy", "loss/kd", "loss/hard"} <= set(metrics)


def test_nonfinite_loss_stops_with_step_and_terms(tiny_teacher, shared_cache, tmp_path):
    """lr=1e30: step 1 blows the weights up, step 2's loss is not finite. With two DDP workers
    both stop at that step (no rank left waiting in an all-reduce), and fit raises at once (no
    Ray Train retries, which would fail the same way) naming the step and the terms."""
    cfg = tiny_cfg(tmp_path, tiny_teacher, "ray.num_workers=2", stages_yaml(
        {"name": "nan", "losses": {"kd": 1, "hard": 1},
         "optim": {"epochs": 1, "batch_size": 16, "lr": 1e30}}),
        cache_root=shared_cache)
    t0 = time.perf_counter()
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 2 \(epoch 0, task sst2.*kd=.*hard="):
        distill_student(cfg, {"sst2": [tiny_teacher]})
    assert not (tmp_path / "sst2" / "student" / "stage0-nan").exists()
    print(f"nan run: {time.perf_counter() - t0:.1f} s")


def test_train_storage_names_one_experiment_per_output_folder(tmp_path):
    default = tiny_cfg(tmp_path, tmp_path)
    assert train_storage(default, tmp_path / "a" / "student" / "s0") == {
        "path": str(tmp_path / "a" / "student" / ".ray_train"), "name": "s0_train"}
    shared = tiny_cfg(tmp_path, tmp_path, "run.name=r1", "run.storage_path=s3://bucket/train?region=x")
    one, two = (train_storage(shared, tmp_path / run / "student" / "s0") for run in ("a", "b"))
    assert one["path"] == two["path"] == "s3://bucket/train?region=x"
    assert one["name"] != two["name"] and one["name"].startswith("r1-s0-")  # same run name, stage
    relative = tiny_cfg(tmp_path, tmp_path, "run.storage_path=rel")
    assert Path(train_storage(relative, tmp_path / "s0")["path"]).is_absolute()


def test_checkpoints_and_nonfinite_message_in_s3(tiny_teacher, shared_cache, s3, tmp_path):
    """run.storage_path on S3: Ray Train's checkpoints land there (nothing under the run dir),
    the student comes back from the best one, and a worker's non-finite-loss message reaches
    the driver through the bucket."""
    storage = s3.keyed_uri(f"train-{tmp_path.name}")  # keys in the URI: ray_local predates them
    fs, base = store.filesystem(s3.uri(f"train-{tmp_path.name}"))
    kd = {"name": "kd", "losses": {"kd": 1, "hard": 1}, "optim": {"epochs": 1, "batch_size": 32, "lr": 1e-3}}
    cfg = tiny_cfg(tmp_path, tiny_teacher, f"run.storage_path={storage}", stages_yaml(kd),
                   cache_root=shared_cache)
    final = distill_student(cfg, {"sst2": [tiny_teacher]})
    assert isinstance(models.load_model(final / "model"), EncoderClassifier)
    assert json.loads((final / "metrics.json").read_text())["step"] == 2
    assert not (final.parent / ".ray_train").exists()
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))]
    experiment = train_storage(cfg, final.parent / "stages")["name"]
    states = [f for f in files if f.startswith(f"{base}/{experiment}/") and f.endswith(f"/{STATE_FILE}")]
    assert len(states) == 1 and "/checkpoint_" in states[0], files

    nan = tiny_cfg(tmp_path, tiny_teacher, f"run.storage_path={storage}", stages_yaml(
        kd | {"name": "nan", "optim": {"epochs": 1, "batch_size": 16, "lr": 1e30}}), cache_root=shared_cache)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 2 \(epoch 0, task sst2.*kd="):
        distill_student(nan, {"sst2": [tiny_teacher]})


def test_missing_cached_quantity_lists_what_the_cache_holds(tiny_teacher, shared_cache, tmp_path):
    cfg = tiny_cfg(tmp_path, tiny_teacher, stages_yaml({"name": "f", "losses": {"hidden_mse": 1}}),
                   cache_root=shared_cache)  # uniform map: hidden_1 and hidden_2; only hidden_2 is cached
    with pytest.raises(CacheError, match=r"lacks \['hidden_1'\]; it holds \['attn_2', 'cls', "
                                         r"'embeddings', 'hidden_2', 'logits', 'qkv_2'\]"):
        distill_student(cfg, {"sst2": [tiny_teacher]}, build_cache=False)
    empty = tiny_cfg(tmp_path, tiny_teacher, stages_yaml({"name": "f", "losses": {"kd": 1}}),
                     cache_root=tmp_path / "empty")
    with pytest.raises(CacheError, match="no cache sst2-train-"):
        distill_student(empty, {"sst2": [tiny_teacher]}, build_cache=False)
    assert not (tmp_path / "sst2" / "student").exists()


def test_online_mode_runs_every_loss_with_the_teacher_in_the_loop(tiny_teacher, ray_local, glue_dir,
                                                                   tmp_path):
    cfg = tiny_cfg(tmp_path, tiny_teacher, "distill.online=true", "student.init=random", stages_yaml(
        {"name": "online", "losses": ALL_LOSSES, "relation_heads": 4,
         "optim": {"epochs": 1, "batch_size": 16, "lr": 1e-3}}))
    before = set(ray_local._private.state.actors())
    final = distill_student(cfg, {"sst2": [tiny_teacher]})
    assert not (tmp_path / "cache").exists()  # nothing cached: the teacher ran in the loop
    # The run's own Ray Train actors: no dataset manager (no Ray Dataset is passed) and, on this
    # Ray without a dashboard, no placement-group cleaner (it polls the dashboard's state API).
    started = {a["ActorClassName"] for i, a in ray_local._private.state.actors().items() if i not in before}
    assert {"TrainController", "RayTrainWorker"} <= started, started
    assert not started & {"DatasetManager", "PlacementGroupCleaner"}, started
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["step"] == 4
    assert sorted(k[5:] for k in metrics if k.startswith("loss/")) == sorted(ALL_LOSSES)
    assert all(math.isfinite(metrics[f"loss/{n}"]) for n in ALL_LOSSES)
    assert metrics["loss/emb_relation"] > 0  # a random student differs from the teacher
    # the loop times its teacher forward (bench_distill's bound on what a cache can save)
    assert 0 < metrics["teacher_forward_fraction"] < 1
    assert metrics["final_epoch_teacher_forward_fraction"] == metrics["teacher_forward_fraction"]
    assert isinstance(models.load_model(final / "model"), EncoderClassifier)
