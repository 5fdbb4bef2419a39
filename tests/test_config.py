"""Typed config: YAML + dotted overrides, recipe bases, errors that name the key, round trips."""
import dataclasses
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


def test_recipe_starts_from_a_base_and_takes_its_stages_by_name(tmp_path):
    """`base:` merges sections over another recipe; `like:` copies a base stage and changes keys
    (optim key by key, losses whole); the saved config is complete, with neither key left."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text(
        "data: {tasks: [mrpc], max_len: 64}\nstudent: {layers: 2}\ndistill:\n  stages:\n"
        "    - {name: features, losses: {hidden_mse: 1.0}, optim: {epochs: 2, lr: 1.0e-4}}\n"
        "    - {name: predictions, losses: {kd: 1.0, hard: 1.0}, temperature: 2.0}\n")
    (tmp_path / "sub/b.yaml").write_text(
        "base: ../a.yaml\ndata: {max_len: 32}\ndistill:\n  stages:\n"
        "    - {like: features, optim: {epochs: 1}}\n"
        "    - {like: predictions, name: soft, losses: {kd: 1.0}}\n")
    (tmp_path / "c.yaml").write_text("base: sub/b.yaml\nstudent: {layers: 3}\n")
    cfg = load(tmp_path / "c.yaml", ["distill.stages.1.temperature=4"])
    assert cfg.data.tasks == ("mrpc",) and cfg.data.max_len == 32 and cfg.student.layers == 3
    features, soft = cfg.distill.stages
    assert (features.name, features.optim.epochs, features.optim.lr) == ("features", 1, 1e-4)
    assert features.losses == {"hidden_mse": 1.0}
    assert (soft.name, soft.losses, soft.temperature) == ("soft", {"kd": 1.0}, 4.0)
    save(cfg, tmp_path / "saved.yaml")
    text = (tmp_path / "saved.yaml").read_text()
    assert "base:" not in text and "like:" not in text and load(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("files, words", [
    ({"r.yaml": "base: nothere.yaml\n"}, ["r.yaml", "base recipe nothere.yaml not found"]),
    ({"r.yaml": "base: s.yaml\n", "s.yaml": "base: r.yaml\n"}, ["loops", "r.yaml -> ", "s.yaml"]),
    ({"r.yaml": "distill: {stages: [{like: kd}]}\n"}, ["distill.stages.0.like='kd' needs a base"]),
    ({"r.yaml": "base: s.yaml\ndistill: {stages: [{losses: {kd: 1}}, {like: featurs}]}\n",
      "s.yaml": "distill: {stages: [{name: features, losses: {hidden_mse: 1}}]}\n"},
     ["r.yaml: distill.stages.1.like", "no stage 'featurs'", "['features']"]),
    ({"r.yaml": "base: s.yaml\n", "s.yaml": "student: {layrs: 2}\n"},
     ["r.yaml (based on ", "s.yaml)", "unknown config key student.layrs", "did you mean student.layers"]),
    ({"r.yaml": "base: [a.yaml]\n"}, ["base must be a recipe file name"]),
])
def test_bad_recipe_bases_name_the_file_and_key(tmp_path, files, words):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as e:
        load(tmp_path / "r.yaml")
    for w in words:
        assert w in str(e.value)


def test_augmented_recipes_keep_their_bases_stages():
    """The shipped recipes built on a base differ from it only where they say so."""
    mlkd, aug = load(REPO / "jobs/configs/mlkd.yaml"), load(REPO / "jobs/configs/mlkd_augmented.yaml")
    assert aug.distill.stages[1] == mlkd.distill.stages[1] and aug.data.augment.copies == 4
    assert aug.distill.stages[0] == dataclasses.replace(
        mlkd.distill.stages[0], augmented=True, optim=dataclasses.replace(mlkd.distill.stages[0].optim, epochs=1))
    mkd, mkd_aug = (load(REPO / "jobs/configs" / f) for f in ("mkd_transformer.yaml", "mkd_augmented.yaml"))
    assert mkd_aug.distill.stages[1:] == mkd.distill.stages and mkd_aug.teacher == mkd.teacher
    init = load(REPO / "jobs/configs/mkd_augmented_teacher_init.yaml")
    assert init.student == dataclasses.replace(mkd_aug.student, init_from="teacher")
    assert (init.distill, init.data) == (mkd_aug.distill, mkd_aug.data)


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
