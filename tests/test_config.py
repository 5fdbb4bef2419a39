"""Typed config: YAML + dotted overrides, errors that name the key, round trips."""
from pathlib import Path

import pytest

from pipeline.config import Config, StageConfig, from_dict, load, replace, save, to_dict
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load(None, ["teacher.optim.lr=3e-5", "data.tasks=[sst2,mrpc]", "ray.use_gpu=true",
                      "distill.stages.0.optim.epochs=5", "distill.stages.0.losses={hidden_mse: 2}"])
    assert cfg.teacher.optim.lr == 3e-5  # YAML reads 3e-5 as a string; the float field takes it
    assert cfg.data.tasks == ("sst2", "mrpc")
    assert cfg.ray.use_gpu is True
    assert cfg.distill.stages[0].optim.epochs == 5 and cfg.distill.stages[0].temperature == 2.0
    assert cfg.distill.stages[0].losses == {"hidden_mse": 2.0}
    assert Config().data.max_len == 128


def test_yaml_recipe_merges_sections(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("teacher:\n  optim:\n    epochs: 1\ndistill:\n  stages:\n    - name: a\n"
                 "      losses: {kd: 1}\n")
    cfg = load(p, ["distill.stages.0.temperature=2"])
    assert cfg.teacher.optim.epochs == 1 and cfg.teacher.optim.lr == Config().teacher.optim.lr
    assert len(cfg.distill.stages) == 1 and cfg.distill.stages[0].temperature == 2.0


@pytest.mark.parametrize("override, words", [
    ("teacher.optim.lrr=1", ["teacher.optim.lrr", "did you mean teacher.optim.lr"]),
    ("dat.tasks=[sst2]", ["dat", "did you mean data"]),
    ("teacher.optim.lr=-1", ["lr must be > 0"]),
    ("data.max_len=0", ["max_len=0"]),
    ("teacher.optim.epochs=abc", ["teacher.optim.epochs", "expects int"]),
    ("student.heads=5", ["heads=5 must divide hidden=384"]),
    ("distill.stages.0.losses={kdd: 1}", ["unknown loss 'kdd'", "did you mean 'kd'"]),
    ("distill.stages.7.temperature=2", ["index 7 out of range"]),
    ("teacher.mode=triple", ["mode='triple'"]),
    ("novalue", ["key=value"]),
    ("run.storage_path=' s3://bucket/train'", ["storage_path=' s3://bucket/train'", "whitespace"]),
    ("ray.placement_strategy=spread", ["placement_strategy='spread'", "SPREAD"]),
    ("ray.threads_per_worker=-1", ["threads_per_worker must be >= 0"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load(None, [override])
    for w in words:
        assert w in str(e.value)


def test_bad_yaml_file_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load(p)
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "missing.yaml")


def test_round_trip_and_replace(tmp_path):
    cfg = load(None, ["student.layers=2", "data.tasks=[mrpc]"])
    assert from_dict(Config, to_dict(cfg)) == cfg
    save(cfg, tmp_path / "c.yaml")
    assert load(tmp_path / "c.yaml") == cfg
    tuned = replace(cfg, {"student.heads": 6, "distill.stages.0.optim.lr": 1e-4})
    assert tuned.student.heads == 6 and tuned.distill.stages[0].optim.lr == 1e-4
    assert cfg.student.heads == 12  # the original is untouched (frozen)


def test_stage_needs_a_positive_weight():
    with pytest.raises(ConfigError, match="at least one weight"):
        StageConfig(losses={"kd": 0.0})


@pytest.mark.parametrize("recipe", sorted((REPO / "jobs/configs").glob("*.yaml")))
def test_shipped_recipes_load(recipe):
    load(recipe)


def test_config_saved_by_an_older_version_still_loads(tmp_path, capsys):
    """A run's config.yaml with a retired key (results.latency_seq_len) reruns, with a note;
    a key that never existed is still an error."""
    path = tmp_path / "config.yaml"
    save(load(None, ["data.tasks=[stsb]"]), path)
    path.write_text(path.read_text().replace("results:\n", "results:\n  latency_seq_len: 64\n"))
    assert load(path).data.tasks == ("stsb",)
    assert "results.latency_seq_len is ignored" in capsys.readouterr().err
    path.write_text(path.read_text().replace("results:\n  latency_seq_len", "results:\n  latency_seq_lenn"))
    with pytest.raises(ConfigError, match="unknown config key results.latency_seq_lenn"):
        load(path)



def test_every_job_module_imports_as_itself():
    """`jobs/__init__` imports the library `pipeline` first; that must not shadow the entry point
    `jobs.pipeline` (`from jobs import pipeline` once returned the library: the results job broke).
    A fresh interpreter, since another test may have imported `jobs.pipeline` already."""
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    stems = sorted(p.stem for p in (repo / "jobs").glob("*.py") if p.stem != "__init__")
    code = ("from jobs import pipeline as p; assert p.__name__ == 'jobs.pipeline', p.__name__\n"
            "import importlib\n"
            f"for s in {stems!r}:\n"
            "    assert importlib.import_module('jobs.' + s).__name__ == 'jobs.' + s, s\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
