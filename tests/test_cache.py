"""The teacher-output cache end to end: real Ray (loopback), real Arrow/Parquet, real GLUE rows,
a tiny random BERT teacher.

The two-node test starts its own Ray cluster and puts the session's local Ray back afterwards
(see `two_node_cluster`).
"""
from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.batching import flat_values, list_lengths, pad_tokens
from pipeline.cache import key as ckey
from pipeline.cache import store, writer
from pipeline.cache.build import ensure_cache, run_fields
from pipeline.cache.reader import collate_teacher, columns_of, plan_sets, read_cache
from pipeline.cache.store import CacheError
from pipeline.config import load
from pipeline.evaluate import bf16_supported

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
ALL = ["logits", "cls", "embeddings", "hidden_1", "hidden_2", "attn_2", "qkv_2"]
TOKEN_COLUMNS = ["embeddings", "hidden_1", "hidden_2", "attn_2", "q_2", "k_2", "v_2"]
WIDTH = 32  # the tiny teacher's hidden size


def make_cfg(root: Path, teacher: Path, glue_dir: Path, *extra: str):
    """200 SST-2 training rows in shards of 64, teacher batches of 16 (unless `extra` says)."""
    return load(None, [f"cache.root={root}", f"teacher.path={teacher}", f"data.glue_dir={glue_dir}",
                       "data.train_limit=200", "data.dev_limit=50", "cache.rows_per_shard=64",
                       "cache.batch_size=16", f"run.output_dir={root.parent / 'runs'}", *extra])


def cli_overrides(root: Path, teacher: Path, glue_dir: Path, *extra: str) -> list[str]:
    return [f"cache.root={root}", f"teacher.path={teacher}", f"data.glue_dir={glue_dir}",
            "data.tasks=[sst2]", f"run.output_dir={root.parent / 'runs'}", "ray.num_cpus=2", *extra]


def start_cache_job(log: Path, *overrides: str) -> subprocess.Popen:
    """`python -m jobs.cache OVERRIDES` in a new process group, output to `log`; it starts its
    own Ray on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join ours
    env |= {"PYTHONPATH": str(REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the job
        return subprocess.Popen([sys.executable, "-m", "jobs.cache", *overrides], cwd=REPO, env=env,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


def run_cache_main(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """What `python -m jobs.cache ARGV` runs, in this process (the metadata commands start no
    Ray; a new interpreter would spend most of the time importing): (exit code, stdout)."""
    import jobs.cache

    monkeypatch.setattr(sys, "argv", ["jobs.cache", *argv])
    capsys.readouterr()
    try:
        jobs.cache.main(jobs.cache.run, jobs.cache.__doc__, jobs.cache.options)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out


def row_values(table: pa.Table, column: str, i: int) -> np.ndarray:
    """Row i's values: a vector column's list, or a token column's binary value (fp16 here)."""
    return column_values(table.slice(i, 1), column)


def column_values(table: pa.Table, column: str, dtype=np.float16) -> np.ndarray:
    """Every row's values of a column concatenated, as float32 (token columns: `dtype` bytes)."""
    return flat_values(table.column(column), dtype).astype(np.float32)


def file_states(folder: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir())}


def assert_same_cache(a: pa.Table, b: pa.Table, columns: list[str], atol: float = 0.0) -> None:
    """Same rows in the same order with the same inputs, and the same teacher values."""
    assert a.column("example_id").equals(b.column("example_id"))
    assert a.column("input_ids").equals(b.column("input_ids"))
    for c in columns:
        x, y = column_values(a, c), column_values(b, c)
        assert x.shape == y.shape, c
        np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=c)


@pytest.fixture(scope="module")
def built(ray_local, tiny_teacher, glue_dir, tmp_path_factory):
    """Every quantity of 200 SST-2 rows, float16: (cfg, key)."""
    cfg = make_cfg(tmp_path_factory.mktemp("built") / "cache", tiny_teacher, glue_dir)
    return cfg, ensure_cache(cfg, [tiny_teacher], "sst2", "train", ALL)


@pytest.fixture(scope="module")
def reference(tiny_teacher, glue_dir, tmp_path_factory):
    """The teacher run directly in fp32 on each example alone (no padding): id -> values."""
    from transformers import AutoTokenizer

    from pipeline import data
    from pipeline.batching import collate_inputs
    from pipeline.encoder import Capture, EncoderClassifier

    cfg = make_cfg(tmp_path_factory.mktemp("ref"), tiny_teacher, glue_dir)
    table = data.load_tokenized(cfg.data, "sst2", "train", AutoTokenizer.from_pretrained(str(tiny_teacher)))
    model = EncoderClassifier.load(tiny_teacher).eval()
    cap = Capture(embeddings=True, hidden=(1, 2), attn=(2,), qkv=(2,))
    out = {}
    with torch.no_grad():
        for i in range(len(table)):
            b = collate_inputs(table.slice(i, 1))
            f = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], "sst2", cap)
            q, k, v = f.qkv[2]
            out[int(b["example_id"][0])] = {
                "input_ids": b["input_ids"][0].tolist(), "embeddings": f.embeddings[0],
                "hidden_1": f.hidden[1][0], "hidden_2": f.hidden[2][0], "attn_2": f.attn[2][0],
                "q_2": q[0], "k_2": k[0], "v_2": v[0]}
    return out


# ---------------------------------------------------------------- schema round trip


def test_round_trip_matches_a_direct_teacher_forward(built, reference):
    """Per example, fp32, no padding: the cache holds the teacher's values on the real tokens."""
    cfg, key = built
    table = read_cache(cfg.cache.root, key, ALL)
    assert len(table) == 200 and sorted(table.column("example_id").to_pylist()) == list(range(200))
    lengths = table.column("input_ids").combine_chunks().value_lengths().to_numpy()
    assert (np.diff(lengths) >= 0).all(), "rows are stored sorted by length"
    for c in TOKEN_COLUMNS:  # one binary value per row: its [n_tokens, d] fp16 values
        assert table.schema.field(c).type == pa.large_binary(), c
    assert table.schema.field("cls").type == pa.list_(pa.float16())
    assert table.schema.field("logits").type == pa.list_(pa.float32())

    worst = dict.fromkeys(TOKEN_COLUMNS, 0.0)
    for i, eid in enumerate(table.column("example_id").to_pylist()):
        ref = reference[eid]
        n = len(ref["input_ids"])
        assert table.column("input_ids")[i].as_py() == ref["input_ids"]  # real tokens only
        for c in TOKEN_COLUMNS:
            got = row_values(table, c, i)
            assert got.size == n * WIDTH, (c, eid)
            want = ref[c].numpy()
            worst[c] = max(worst[c], float(np.abs(got.reshape(n, WIDTH) - want).max() / want.std()))
        assert row_values(table, "logits", i).shape == (2,) and row_values(table, "cls", i).shape == (WIDTH,)
        # cls is hidden_2's first token (the last layer of a 2-layer teacher), stored alike
        np.testing.assert_array_equal(row_values(table, "cls", i), row_values(table, "hidden_2", i)[:WIDTH])
    # bf16 autocast vs fp32 differs by ~0.3% of a tensor's spread; another layer, token or
    # example is off by tens of percent (checked next)
    assert max(worst.values()) < 0.02, worst
    same_len = next(i for i in range(len(table) - 1) if lengths[i] == lengths[i + 1])
    a, b = (reference[table.column("example_id")[j].as_py()]["hidden_2"] for j in (same_len, same_len + 1))
    assert (a - b).abs().max() > 0.5 * a.std()


def test_round_trip_matches_the_same_batches_bit_for_bit(built, tiny_teacher):
    """The writer's batches (16 rows of the length-sorted cache order) at the writer's precision
    (bf16 autocast where the CPU has native bf16, else fp32) give the stored values to storage
    precision: a tight check, also for logits and cls, which hardly vary between examples in a
    random teacher."""
    from pipeline.batching import collate_inputs
    from pipeline.encoder import Capture, EncoderClassifier

    cfg, key = built
    table = read_cache(cfg.cache.root, key, ALL)
    columns = columns_of(plan_sets(cfg.cache.root, key, ALL))
    model = EncoderClassifier.load(tiny_teacher).eval()
    cap = Capture(embeddings=True, hidden=(1, 2), attn=(2,), qkv=(2,))
    for start in range(0, len(table), cfg.cache.batch_size):  # shards of 64 = 4 batches of 16
        rows = table.slice(start, cfg.cache.batch_size)
        b = collate_inputs(rows)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_supported(CPU)):
            f = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], "sst2", cap)
        q, k, v = f.qkv[2]
        want = {"logits": f.logits, "probs": f.logits.float().softmax(-1), "cls": f.cls,
                "embeddings": f.embeddings, "hidden_1": f.hidden[1], "hidden_2": f.hidden[2],
                "attn_2": f.attn[2], "q_2": q, "k_2": k, "v_2": v}
        got = collate_teacher(rows, columns)
        mask = b["attention_mask"].bool()
        for c, w in want.items():
            w = w.float()
            if c in TOKEN_COLUMNS:
                w = w * mask[..., None]  # padding is stored as nothing and collated as zeros
            tol = 1e-6 if c in ("logits", "probs") else 2.0**-11  # float32 | float16 storage
            torch.testing.assert_close(got[f"t_{c}"].float(), w, rtol=tol, atol=1e-6, msg=f"{c} rows {start}+")


def test_collate_teacher_pads_with_zeros(built):
    cfg, key = built
    plan = plan_sets(cfg.cache.root, key, ALL)
    table = read_cache(cfg.cache.root, key, ALL)
    rows = table.take(pa.array([0, 100, 199]))  # short, middle, longest
    lengths = rows.column("input_ids").combine_chunks().value_lengths().to_numpy()
    assert lengths[0] < lengths[2]
    batch = collate_teacher(rows, columns_of(plan))
    assert set(batch) == {f"t_{c}" for c in ["logits", "probs", "cls"] + TOKEN_COLUMNS}
    assert batch["t_logits"].shape == (3, 2) and batch["t_cls"].shape == (3, WIDTH)
    for c in TOKEN_COLUMNS:
        x = batch[f"t_{c}"]
        assert x.shape == (3, lengths.max(), WIDTH) and x.dtype == torch.float16  # as stored
        for r in range(3):
            n = lengths[r]
            np.testing.assert_array_equal(x[r, :n].numpy(), row_values(rows, c, r).reshape(n, WIDTH))
            assert (x[r, n:] == 0).all()


def test_one_cache_job_serves_every_split_and_task_like_separate_jobs(built, tiny_teacher, glue_dir,
                                                                      tmp_path, capsys):
    """ensure_caches computes what several (task, split) requests miss in one Ray Data job (the
    teacher loaded once per actor); each cache equals the one its own job writes, and the same
    cache asked for twice gets one shard set with both requests' quantities."""
    from pipeline.cache.build import ensure_caches, request

    cfg16, key16 = built
    cfg = make_cfg(tmp_path / "cache", tiny_teacher, glue_dir)
    reqs = [request([tiny_teacher], "sst2", "train", ["logits", "hidden_2"]),
            request([tiny_teacher], "sst2", "dev", ["logits"]),
            request([tiny_teacher], "mrpc", "train", ["logits", "cls"]),
            request([tiny_teacher], "sst2", "train", ["cls"])]
    keys = ensure_caches(cfg, reqs)
    out = capsys.readouterr().out
    assert out.count("one cache job for") == 1 and "of 3 caches" in out, out
    assert keys[0] == keys[3] == key16 and len(set(keys)) == 3
    sets = store.committed_sets(cfg.cache.root, keys[0])
    assert [s.quantities for s in sets] == [["logits", "hidden_2", "cls"]]
    assert_same_cache(read_cache(cfg.cache.root, keys[0], ["logits", "hidden_2", "cls"]),
                      read_cache(cfg16.cache.root, key16, ["logits", "hidden_2", "cls"]),
                      ["logits", "hidden_2", "cls"])
    fields = {r.split + r.task: run_fields(cfg, [tiny_teacher], r.task, r.split)[0] for r in reqs}
    assert store.committed_sets(cfg.cache.root, keys[1])[0].manifest["rows"] == fields["devsst2"]["rows"] == 50
    mrpc = read_cache(cfg.cache.root, keys[2], ["logits", "cls"])
    assert len(mrpc) == fields["trainmrpc"]["rows"] == 200
    assert set(mrpc.column("example_id").to_pylist()) == set(range(200))
    assert ensure_caches(cfg, reqs) == keys  # all cached now: no job at all
    assert "one cache job" not in capsys.readouterr().out


def test_int8_dequantizes_within_the_per_token_step(built, tiny_teacher, glue_dir, tmp_path):
    cfg16, key16 = built
    cfg = make_cfg(tmp_path / "cache", tiny_teacher, glue_dir, "cache.dtype=int8")
    key = ensure_cache(cfg, [tiny_teacher], "sst2", "train", ["logits", "hidden_2"])
    assert key == key16  # the storage dtype is not part of the key
    table = read_cache(cfg.cache.root, key, ["logits", "hidden_2"])
    assert table.schema.field("hidden_2").type == pa.large_binary()  # int8 values, one value per row
    assert table.schema.field("hidden_2_scale").type == pa.list_(pa.float16())
    exact = read_cache(cfg16.cache.root, key16, ["hidden_2"])  # same batches, fp16 storage
    assert table.column("example_id").equals(exact.column("example_id"))

    plan = plan_sets(cfg.cache.root, key, ["hidden_2"])
    deq = collate_teacher(table, columns_of(plan))["t_hidden_2"]
    ref = collate_teacher(exact, columns_of(plan_sets(cfg16.cache.root, key16, ["hidden_2"])))["t_hidden_2"]
    lengths = table.column("input_ids").combine_chunks().value_lengths().to_numpy()
    mask = torch.from_numpy(np.arange(lengths.max())[None, :] < lengths[:, None])
    scale = torch.from_numpy(pad_tokens(table.column("hidden_2_scale"), lengths).astype(np.float32))
    amax = ref.abs().amax(-1)
    np.testing.assert_allclose(scale[mask], amax[mask] / 127, rtol=2e-3)  # scale = max|x| / 127
    # |x - q*scale| <= scale/2, plus x's own fp16 rounding in the reference
    bound = scale[..., None] / 2 + ref.abs() * 2.0**-10 + 1e-6
    err = (deq - ref).abs()
    assert (err <= bound).all(), float((err - bound).max())
    assert (err / scale[..., None])[mask].mean() > 0.15  # really rounded to steps (mean ~1/4)
    assert (deq[~mask] == 0).all()


# ---------------------------------------------------------------- the key


def test_key_follows_what_decides_the_outputs(tiny_teacher, glue_dir, tmp_path):
    from tests.conftest import make_tiny_teacher

    base_cfg = make_cfg(tmp_path / "cache", tiny_teacher, glue_dir)
    fields, _ = run_fields(base_cfg, [tiny_teacher], "sst2", "train")
    key = ckey.cache_key(fields)

    other_teacher = make_tiny_teacher(tmp_path / "t2", {"sst2": 2}, seed=1)
    retok = tmp_path / "retok"  # same weights and recorded fingerprint, another tokenizer setting
    shutil.copytree(tiny_teacher, retok)
    tok_cfg = json.loads((retok / "tokenizer_config.json").read_text())
    (retok / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "do_lower_case": False}))
    edited = tmp_path / "glue"  # same rows, one label flipped
    (edited / "sst2").mkdir(parents=True)
    lines = (glue_dir / "sst2/train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    text, label = lines[5].rstrip("\n").split("\t")
    lines[5] = f"{text}\t{1 - int(label)}\n"
    (edited / "sst2/train.tsv").write_text("".join(lines[:300]), encoding="utf-8")

    def variant(*overrides, teacher=tiny_teacher, task="sst2", split="train"):
        f, _ = run_fields(make_cfg(tmp_path / "cache", tiny_teacher, glue_dir, *overrides),
                          [teacher], task, split)
        return f

    changed = {
        "teacher_fingerprints": variant(teacher=other_teacher),
        "tokenizer": variant(teacher=retok),
        "max_len": variant("data.max_len=64"),
        "data_hash": variant("data.train_limit=100"),
        "task": variant(task="mrpc"),
        "split": variant(split="dev"),
    }
    edited_data = variant(f"data.glue_dir={edited}")
    for name, f in {**changed, "data_hash (content)": edited_data}.items():
        assert ckey.cache_key(f) != key, name
    for name in ("teacher_fingerprints", "tokenizer", "max_len"):  # exactly that field
        assert [k for k in ckey.HASHED if changed[name][k] != fields[k]] == [name]
    assert [k for k in ckey.HASHED if edited_data[k] != fields[k]] == ["data_hash"]

    unrelated = ["run.name=other", "student.layers=2", "cache.rows_per_shard=7", "cache.batch_size=3",
                 "cache.dtype=int8", "cache.hidden_layers=[1]", "ray.num_workers=2", "run.seed=5",
                 "distill.stages.0.optim.lr=1e-3"]
    for override in unrelated:
        assert ckey.cache_key(variant(override)) == key, override

    # a cache written for `fields`; runs that differ get told which field
    root = tmp_path / "cache"
    fs, base = store.filesystem(str(root))
    store.write_json(fs, store.join(base, key, store.KEY_FILE), fields)
    ckey.check_fields(str(root), key, fields)  # the matching run passes
    for name in ("max_len", "tokenizer", "teacher_fingerprints"):
        with pytest.raises(CacheError, match=name):
            ckey.check_fields(str(root), key, changed[name])
        message = ckey.explain_miss(str(root), changed[name])
        assert key in message and name in message, message
        assert all(k not in message for k in ckey.HASHED if k != name), message
    assert "no cache for task mrpc" in ckey.explain_miss(str(root), changed["task"])
    with pytest.raises(CacheError, match="max_len"):  # no such key: the closest one is explained
        ckey.check_fields(str(root), ckey.cache_key(changed["max_len"]), changed["max_len"])


# ---------------------------------------------------------------- corruption, listing


def test_corrupt_or_missing_shard_is_named(built, tmp_path, monkeypatch, capsys):
    cfg, key = built
    root = tmp_path / "cache"
    shutil.copytree(cfg.cache.root, root)
    (st,) = store.committed_sets(str(root), key)
    shards = [root / key / st.set_id / s["file"] for s in st.manifest["shards"]]
    assert len(shards) == 4 and store.verify(str(root), key) == []

    good = shards[1].read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the Parquet data
    shards[1].write_bytes(bytes(data))
    problems = store.verify(str(root), key)
    assert len(problems) == 1 and str(shards[1]) in problems[0] and "checksum" in problems[0]
    with pytest.raises(CacheError, match=shards[1].name):
        read_cache(str(root), key, ["logits"])

    shards[2].unlink()
    problems = store.verify(str(root), key)
    assert len(problems) == 2 and any(str(shards[2]) in p and "missing" in p for p in problems)
    shards[1].write_bytes(good)  # repaired: only the deleted one is left
    assert store.verify(str(root), key) == [f"{shards[2]}: missing shard"]
    with pytest.raises(CacheError, match=shards[2].name):
        read_cache(str(root), key, ["logits"])

    code, out = run_cache_main(monkeypatch, capsys, f"cache.root={root}", "--verify", key)
    assert code == 1 and out.splitlines() == [f"BAD {shards[2]}: missing shard"], out


def test_shard_checksums_xxh3_and_older_sha256_entries():
    data = b"parquet bytes" * 1000
    entry = {"checksum": store.checksum(data)}
    assert entry["checksum"].startswith("xxh3_128:") and len(entry["checksum"]) == 9 + 32
    assert store.checksum_matches(data, entry) and not store.checksum_matches(data[:-1], entry)
    old = {"sha256": hashlib.sha256(data).hexdigest()}  # manifests written before xxh3
    assert store.checksum_matches(data, old) and not store.checksum_matches(data + b"x", old)


def test_list_shows_key_rows_and_quantities(built, monkeypatch, capsys):
    cfg, key = built
    code, out = run_cache_main(monkeypatch, capsys, f"cache.root={cfg.cache.root}", "--list")
    assert code == 0, out
    (line,) = [x for x in out.splitlines() if x.startswith(key)]
    assert "rows=200" in line and "task=sst2" in line and "split=train" in line
    listed = out.split("quantities:", 1)[1].split("\n")[0]
    assert sorted(q.strip() for q in listed.split(",")) == sorted(ALL)


# ---------------------------------------------------------------- extension


def test_adding_a_quantity_writes_only_a_new_set(built, tiny_teacher, glue_dir, tmp_path):
    _, key_all = built
    cfg = make_cfg(tmp_path / "cache", tiny_teacher, glue_dir)
    key = ensure_cache(cfg, [tiny_teacher], "sst2", "train", ["logits"])
    (old,) = store.committed_sets(cfg.cache.root, key)
    old_dir = Path(cfg.cache.root) / key / old.set_id
    before = file_states(old_dir)

    # a later run asks for more, with other shard settings: the new set must still line up
    cfg2 = make_cfg(tmp_path / "cache", tiny_teacher, glue_dir, "cache.rows_per_shard=32")
    assert ensure_cache(cfg2, [tiny_teacher], "sst2", "train", ["logits", "hidden_2"]) == key
    sets = {s.set_id: s for s in store.committed_sets(cfg.cache.root, key)}
    assert len(sets) == 2 and file_states(old_dir) == before
    (new,) = [s for sid, s in sets.items() if sid != old.set_id]
    assert new.quantities == ["hidden_2"] and new.manifest["created"]["shards_computed"] == 4
    assert new.manifest["rows_per_shard"] == old.manifest["rows_per_shard"] == 64

    both = read_cache(cfg.cache.root, key, ["logits", "hidden_2"])
    whole = read_cache(built[0].cache.root, key_all, ["logits", "hidden_2"])  # built in one go
    assert_same_cache(both, whole, ["logits", "probs", "hidden_2"])  # the same batches of 16

    assert ensure_cache(cfg2, [tiny_teacher], "sst2", "train", ["hidden_2", "logits"]) == key
    assert len(store.committed_sets(cfg.cache.root, key)) == 2  # nothing new to write

    with pytest.raises(CacheError) as e:
        plan_sets(cfg.cache.root, key, ["logits", "attn_1", "cls"])
    msg = str(e.value)
    assert "['attn_1', 'cls']" in msg and "['hidden_2', 'logits']" in msg
    assert "python -m jobs.cache" in msg and "cache.attn_layers=[1]" in msg and "cache.cls=true" in msg


# ---------------------------------------------------------------- resume, concurrency


def marker_files(root: Path) -> list[Path]:
    return sorted(root.glob("sst2-train-*/set-*/shard-*.json"))


def live_processes(pattern: str) -> dict[int, str]:
    """pid -> command line of the running (not zombie) processes whose command line, or a file
    they hold open, matches. Ray's actors retitle themselves (`ray::MapWorker(...)`) and start
    their own sessions, but their stdout and stderr stay open in their Ray session's log folder."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():  # self, thread-self, sys, ...
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                continue
            fds = list((proc / "fd").iterdir())
        except (OSError, IndexError):
            continue
        if re.search(pattern, cmd) or any(re.search(pattern, open_file(fd)) for fd in fds):
            out[int(proc.name)] = cmd[:300]
    return out


def open_file(fd: Path) -> str:
    """What a /proc/PID/fd/N entry points at ('' if it has just closed)."""
    try:
        return os.readlink(fd)
    except OSError:
        return ""


def test_killed_job_resumes_and_equals_a_clean_build(built, tiny_teacher, glue_dir, tmp_path,
                                                     monkeypatch):
    """SIGKILL the cache job (driver and the Ray it started) after its first shard: nothing is
    committed; the rerun computes only the rest and equals a clean build (`built`: the same
    rows in the same teacher batches of 16, only cut into shards of 64). The killed job
    tokenizes its 200 rows in its driver, the rerun in a Ray task (as for a large split): both
    cut the same shards."""
    clean_cfg, key = built
    root = tmp_path / "cache"
    args = cli_overrides(root, tiny_teacher, glue_dir, "data.train_limit=200", "data.dev_limit=16",
                         "cache.rows_per_shard=16", "cache.batch_size=16", "cache.hidden_layers=[2]")
    log = tmp_path / "job.log"
    job = start_cache_job(log, *args)
    try:
        deadline = time.monotonic() + 240
        while not marker_files(root) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):  # (if the job has already ended)
            os.killpg(job.pid, signal.SIGKILL)  # the job's Ray processes share its process group
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    # Ray's worker processes (the writing actors) run in sessions of their own, out of the job's
    # process group: kill the stragglers of its Ray session too, so no shard lands after the
    # markers are listed below.
    session = rf"session_[\d_-]+_{job.pid}\b"
    deadline = time.monotonic() + 30
    while (stragglers := live_processes(session)) and time.monotonic() < deadline:
        for pid in stragglers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    out = log.read_text(errors="replace")
    assert job.returncode == -signal.SIGKILL, f"the job ended before the kill:\n{out[-3000:]}"
    markers = marker_files(root)
    assert markers, f"no shard within the deadline:\n{out[-3000:]}"
    set_dir = markers[0].parent
    assert set_dir.parent.name == key
    assert not (set_dir / store.MANIFEST).exists(), "killed too late: the job had finished"
    assert store.committed_sets(str(root), key) == []
    with pytest.raises(CacheError, match="lacks"):
        plan_sets(str(root), key, ["logits"])
    done = writer.done_markers(str(root), key, set_dir.name, 13, rows_per_shard=16)
    assert sorted(done) == sorted(int(m.stem.split("-")[1]) for m in markers)
    assert writer.done_markers(str(root), key, set_dir.name, 7, rows_per_shard=32) == {}  # other rows

    # the rerun: what `python -m jobs.cache` does per split, here on the session's Ray
    monkeypatch.setattr(writer, "TOKENIZE_HERE_ROWS", 0)
    cfg = load(None, args)
    assert ensure_cache(cfg, [tiny_teacher], "sst2", "train", ["logits", "hidden_2"]) == key
    (st,) = store.committed_sets(str(root), key)
    n = len(st.manifest["shards"])
    assert n == 13 and st.manifest["rows"] == 200
    assert st.manifest["created"]["shards_computed"] == n - len(markers)  # kept the killed run's
    assert store.verify(str(root), key) == []
    resumed = read_cache(str(root), key, ["logits", "hidden_2"])
    clean = read_cache(clean_cfg.cache.root, key, ["logits", "hidden_2"])
    assert_same_cache(resumed, clean, ["logits", "probs", "hidden_2"])

    # nothing of the killed job's Ray lives on (its session name ends with the driver's pid)
    assert live_processes(session) == {}


def test_two_jobs_writing_one_key_end_with_one_valid_cache(built, ray_local, tiny_teacher, glue_dir,
                                                          tmp_path):
    """Two drivers (threads) build the same cache at once (actors of 1 CPU, so both can run on
    the 2 CPUs). Whoever commits last, the cache verifies and reads correctly."""
    from concurrent.futures import ThreadPoolExecutor

    clean_cfg, key = built
    cfg = make_cfg(tmp_path / "cache", tiny_teacher, glue_dir, "cache.rows_per_shard=32",
                   "cache.concurrency=2")
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(ensure_cache, cfg, [tiny_teacher], "sst2", "train", ["logits", "hidden_2"])
                for _ in range(2)]
        assert [j.result(timeout=240) for j in jobs] == [key, key]
    (st,) = store.committed_sets(cfg.cache.root, key)
    assert len(st.manifest["shards"]) == 7 and st.manifest["rows"] == 200
    assert store.verify(cfg.cache.root, key) == []
    table = read_cache(cfg.cache.root, key, ["logits", "hidden_2"])
    clean = read_cache(clean_cfg.cache.root, key, ["logits", "hidden_2"])
    # 1 torch thread per actor here, 2 in `built`: bf16 sums may round differently
    assert_same_cache(table, clean, ["logits", "probs", "hidden_2"], atol=2e-2)


# ---------------------------------------------------------------- two nodes


def listening_addresses(pids: set[int]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of the TCP sockets these processes listen on (read from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])  # 32-bit words in host (little) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                addr = ipaddress.ip_address(raw)
                out.append(getattr(addr, "ipv4_mapped", None) or addr)
    return out


@pytest.fixture
def two_node_cluster():
    """A head and a worker node (1 CPU each) on 127.0.0.1, with this process as the driver.

    The session's local Ray (`ray_local`), if this process started it, is shut down first and
    restarted afterwards: that fixture is session-scoped and would not start Ray again for the
    tests after this one (whichever they are: pytest-xdist hands tests to workers in any order).
    """
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import RayConfig
    from pipeline.ray_runtime import init_ray

    local_was_up = ray.is_initialized()
    ray.shutdown()
    loopback = {"node_ip_address": "127.0.0.1", "num_cpus": 1}
    cluster = Cluster(initialize_head=True, head_node_args={**loopback, "include_dashboard": False})
    try:
        cluster.add_node(**loopback)
        init_ray(RayConfig(), address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if local_was_up:
            init_ray(RayConfig(num_cpus=2))


def test_two_node_cache_equals_the_one_node_cache(built, two_node_cluster, tiny_teacher, glue_dir,
                                                  tmp_path):
    import ray

    clean_cfg, key = built
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    assert ray.cluster_resources()["CPU"] == 2

    cfg = make_cfg(tmp_path / "cache", tiny_teacher, glue_dir, "cache.concurrency=2",
                   "cache.hidden_layers=[2]")
    assert ensure_cache(cfg, [tiny_teacher], "sst2", "train", ["logits", "hidden_2"]) == key
    assert store.verify(cfg.cache.root, key) == []
    table = read_cache(cfg.cache.root, key, ["logits", "hidden_2"])
    clean = read_cache(clean_cfg.cache.root, key, ["logits", "hidden_2"])
    # 1 torch thread per actor here, 2 on the one-node Ray: bf16 sums may round differently
    assert_same_cache(table, clean, ["logits", "probs", "hidden_2"], atol=2e-2)

    ours = set(live_processes(re.escape(two_node_cluster.head_node.session_name))) | {os.getpid()}
    addresses = listening_addresses(ours)
    assert addresses and all(a.is_loopback for a in addresses), f"Ray listens beyond loopback: {addresses}"


def test_workers_read_disjoint_equal_shares_of_the_cache(built):
    """Training input (train_data): 2 workers split the 200 cached rows 100/100, each in exactly
    ceil(100/16) batches of similar length; teacher values stay with their rows."""
    from pipeline.cache.reader import collate_teacher, columns_of, plan_sets, read_cache
    from pipeline.train_data import cache_source, num_batches, worker_batches

    cfg, key = built
    source = cache_source(cfg.cache.root, key, ["logits", "hidden_2"])
    assert source.rows == 200 and source.shard_rows == (64, 64, 64, 8)
    whole = read_cache(cfg.cache.root, key, ["logits", "hidden_2"])
    by_id = {int(e): i for i, e in enumerate(whole.column("example_id").to_numpy())}
    cols = columns_of(plan_sets(cfg.cache.root, key, ["logits", "hidden_2"]))
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            batches = list(worker_batches(source, rank, 2, 16, seed=epoch))
            assert len(batches) == num_batches(200, 2, 16) == 7
            ids = [int(e) for b in batches for e in b.column("example_id").to_numpy()]
            assert len(ids) == 100
            seen += ids
            spread = [np.ptp(list_lengths(b.column("input_ids"))) for b in batches[:-1]]
            every = np.concatenate([list_lengths(b.column("input_ids")) for b in batches])
            assert np.median(spread) <= 0.25 * np.ptp(every), spread  # bucketed by length
            b = batches[0]
            t = collate_teacher(b, cols)
            for j, e in enumerate(b.column("example_id").to_numpy()[:3]):
                np.testing.assert_allclose(t["t_hidden_2"][j, 0].numpy(),
                                           row_values(whole, "hidden_2", by_id[int(e)])[:WIDTH], rtol=1e-3)
        assert sorted(seen) == sorted(by_id)  # every row once per epoch
