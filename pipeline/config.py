"""One typed config for every job.

`load(yaml_path, overrides)` is the only way a `Config` is built: a YAML recipe (which may start
from a `base:` recipe, pipeline/recipe_file.py), then dotted
overrides (`teacher.optim.lr=3e-5`, `distill.stages.0.epochs=2`), the same path Ray Tune uses
for its search space. The dataclass field is the only default. Unknown keys and wrong types are
errors that name the key and suggest the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from pipeline.errors import ConfigError
from pipeline.recipe_file import merge_overrides, merge_sections, read_recipe

LOSS_NAMES = (
    "hard", "kd", "soft_ce", "logit_mse", "hidden_mse", "emb_relation", "mha_relation",
    "qkv_relation", "sample_relation", "supcon", "attention_mse",
)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(value: str, choices: Sequence[str], key: str) -> None:
    _check(value in choices, f"{key}={value!r} is not one of {list(choices)}")


@dataclass(frozen=True)
class RunConfig:
    name: str = "sst2"  # run name: outputs go to <output_dir>/<name>/
    output_dir: str = "runs"  # local path or URI for run outputs (teachers, students, reports)
    seed: int = 0
    # where Ray Train keeps training checkpoints (teachers and students): "" = a .ray_train folder
    # beside the trained folders in the run dir; else a path every node shares or a URI (s3://...)
    storage_path: str = ""
    # keep Ray Train's latest checkpoint once every model of a step is trained and moved out
    # (about 200 MB for a 3-layer student with optimizer state); false deletes it, e.g. for
    # many-run tables
    keep_checkpoints: bool = True
    # the report times student and teacher at batch 1 and 64, bf16 and fp32: each for at least
    # this many seconds (shorter is noisier; smoke runs and tests use less)
    latency_min_s: float = 1.0

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, "name must be non-empty, without '/'")
        _check(self.latency_min_s > 0, f"latency_min_s must be > 0, got {self.latency_min_s}")
        _check(self.storage_path == self.storage_path.strip(),
               f"storage_path={self.storage_path!r} has surrounding whitespace; pass \"\" (beside the "
               "run's outputs), a shared path or a URI such as s3://bucket/train")


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # "" = $RAY_ADDRESS if set, else start a local Ray on 127.0.0.1
    num_workers: int = 1  # Ray Train data-parallel workers
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional so Ray Data keeps a CPU (2-core machines hang otherwise)
    num_cpus: int = 0  # CPUs for a local Ray; 0 = all of the machine's
    placement_strategy: str = "PACK"  # training workers: PACK (fewest nodes) or SPREAD (one per node)
    # torch CPU threads per training worker; 0 = the node's cores split among this run's workers
    # there (sweeps running trials side by side set it, so trials do not oversubscribe the cores)
    threads_per_worker: int = 0

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "num_workers must be >= 1")
        _one_of(self.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                "placement_strategy")
        _check(self.cpus_per_worker > 0, "cpus_per_worker must be > 0 (e.g. 0.5)")
        _check(self.num_cpus >= 0, "num_cpus must be >= 0 (0 = all)")
        _check(self.threads_per_worker >= 0, "threads_per_worker must be >= 0 (0 = the node's cores)")


@dataclass(frozen=True)
class TaskDecl:
    """A user-declared task read from local files (CSV/TSV/JSONL/Parquet)."""

    name: str = ""
    text_columns: tuple[str, ...] = ()
    label_column: str = "label"
    labels: tuple[str, ...] = ()  # () = regression
    kind: str = "classification"
    train_path: str = ""
    dev_path: str = ""
    column_map: dict[str, str] = field(default_factory=dict)  # task column -> file column

    def __post_init__(self) -> None:
        _check(bool(self.name), "name is required")
        _check(1 <= len(self.text_columns) <= 2, "text_columns needs 1 or 2 column names")
        _one_of(self.kind, ("classification", "regression"), "kind")
        _check(bool(self.train_path), "train_path is required")


@dataclass(frozen=True)
class AugmentConfig:
    """Perturbed copies of each training row for stages with `augmented: true` (pipeline/augment.py:
    Tang et al. 2019's masking, word replacement and n-gram sampling; the teacher labels them)."""
    copies: int = 0  # copies per training row (0 = off); 2-20 in the papers
    mask_p: float = 0.1  # per word: replaced by mask_token
    replace_p: float = 0.1  # per word: replaced by a word drawn from the split's own words
    ngram_p: float = 0.25  # per text: keep only a random n-gram of it
    max_ngram: int = 5
    mask_token: str = "[MASK]"  # the teacher tokenizer's mask token (BERT: [MASK])
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.copies >= 0, f"copies must be >= 0 (0 = off), got {self.copies}")
        for name in ("mask_p", "replace_p", "ngram_p"):
            _check(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1], got {getattr(self, name)}")
        _check(self.mask_p + self.replace_p <= 1, "mask_p + replace_p must be <= 1")
        _check(self.max_ngram >= 1, f"max_ngram must be >= 1, got {self.max_ngram}")
        _check(bool(self.mask_token.strip()), "mask_token must not be empty")


@dataclass(frozen=True)
class DataConfig:
    tasks: tuple[str, ...] = ("sst2",)
    source: str = "auto"  # auto (GLUE folder if found, else HF hub) | glue | hf
    glue_dir: str = ""  # "" = $GLUE_DIR, else ../shared/data/glue next to the repo
    hf_name: str = "glue"  # HF datasets name used when source is hf
    max_len: int = 128  # truncation length; batches are padded to their own longest row
    train_limit: int = 0  # keep the first N training rows per task (0 = all)
    dev_limit: int = 0  # keep the first N dev rows per task (0 = all)
    sampling_alpha: float = 1.0  # multi-task batches: p(task) ∝ |D_task|^alpha
    unlabeled_path: str = ""  # text file for task-agnostic distillation ("" = pooled task text)
    custom_tasks: tuple[TaskDecl, ...] = ()
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # for `augmented: true` stages

    def __post_init__(self) -> None:
        _check(len(self.tasks) >= 1, "tasks must list at least one task, e.g. [sst2]")
        _one_of(self.source, ("auto", "glue", "hf"), "source")
        _check(self.max_len >= 8, f"max_len={self.max_len} is too small (use >= 8, e.g. 128)")
        _check(self.train_limit >= 0 and self.dev_limit >= 0, "limits must be >= 0 (0 = all)")
        _check(self.sampling_alpha > 0, "sampling_alpha must be > 0 (1 = proportional)")
        from pipeline.tasks import get_task, make_task

        custom = {d.name: make_task(d.name, d.text_columns, d.label_column, d.labels, d.kind)
                  for d in self.custom_tasks}
        for name in self.tasks:
            get_task(name, custom)  # unknown task -> ConfigError with a suggestion


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-5
    epochs: int = 3
    batch_size: int = 32  # global batch (split across workers)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max grad norm; 0 = off
    bf16: bool = True  # autocast to bf16 where the device supports it
    max_steps: int = 0  # stop after N optimizer steps (0 = run all epochs)

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.epochs >= 1, "epochs must be >= 1")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        _check(self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay/grad_clip >= 0")
        _check(self.max_steps >= 0, "max_steps must be >= 0 (0 = all epochs)")


@dataclass(frozen=True)
class TeacherConfig:
    model: str = ""  # "" = packaged all-MiniLM-L6-v2; else a local HF folder or a hub id
    path: str = ""  # an already trained teacher folder: skip training and use it
    dir: str = ""  # where teachers are trained and found ("" = <run dir>/teacher); share it between runs
    mode: str = "single"  # single (one task) | multitask (shared encoder, a head per task)
    ensemble_size: int = 1  # members differing by seed/dropout (MT-DNN-KD)
    dropout: float = 0.1
    # what the task heads read: cls (BERT's pooler on [CLS]) | mean (mean of the real tokens) |
    # auto (mean for a sentence-transformers folder trained with mean pooling, else cls)
    pooling: str = "cls"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=2))

    def __post_init__(self) -> None:
        _one_of(self.mode, ("single", "multitask"), "mode")
        _one_of(self.pooling, ("auto", "cls", "mean"), "pooling")
        _check(self.ensemble_size >= 1, "ensemble_size must be >= 1")
        _check(0 <= self.dropout < 1, "dropout must be in [0, 1)")


@dataclass(frozen=True)
class CacheConfig:
    root: str = "cache"  # local path or URI (s3://...) holding <root>/<key>/
    logits: bool = True
    cls: bool = False  # final [CLS] vector
    embeddings: bool = False  # embedding output (tokens x d)
    hidden_layers: tuple[int, ...] = ()  # 1-based teacher layers (hidden_states index)
    attn_layers: tuple[int, ...] = ()  # attention output (before W_O) of these layers
    qkv_layers: tuple[int, ...] = ()
    # storage of newly written token-level sets: float16 | int8 (per-token scale); sets already
    # cached are reused whatever their dtype (use another cache.root to compare dtypes)
    dtype: str = "float16"
    batch_size: int = 64  # teacher inference batch (rows of similar length)
    concurrency: int = 1  # teacher actors
    rows_per_shard: int = 2048  # rows per Parquet shard (unit of resume and of shuffling)

    def __post_init__(self) -> None:
        _one_of(self.dtype, ("float16", "int8"), "dtype")
        _check(self.batch_size >= 1 and self.concurrency >= 1, "batch_size, concurrency >= 1")
        _check(self.rows_per_shard >= 1, "rows_per_shard must be >= 1")
        for key in ("hidden_layers", "attn_layers", "qkv_layers"):
            _check(all(i >= 1 for i in getattr(self, key)), f"{key} are 1-based layer numbers")


@dataclass(frozen=True)
class StudentConfig:
    arch: str = "transformer"  # transformer | bilstm
    layers: int = 3
    hidden: int = 384
    heads: int = 12  # free: must divide hidden, need not match the teacher
    ffn: int = 1536
    init: str = "uniform"  # uniform | first | explicit | random: which teacher layers seed it
    init_layers: tuple[int, ...] = ()  # for init=explicit: 1-based teacher layers
    init_from: str = "base"  # base (pretrained, not task-tuned) | teacher (task-tuned)
    lstm_hidden: int = 256  # BiLSTM hidden size per direction
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _one_of(self.arch, ("transformer", "bilstm"), "arch")
        _one_of(self.init, ("uniform", "first", "explicit", "random"), "init")
        _one_of(self.init_from, ("base", "teacher"), "init_from")
        _check(self.layers >= 1 and self.hidden >= 1 and self.ffn >= 1, "sizes must be >= 1")
        _check(self.heads >= 1 and self.hidden % self.heads == 0,
               f"heads={self.heads} must divide hidden={self.hidden}")
        _check(self.init != "explicit" or len(self.init_layers) == self.layers,
               f"init=explicit needs init_layers with {self.layers} entries")


@dataclass(frozen=True)
class StageConfig:
    name: str = "distill"
    losses: dict[str, float] = field(default_factory=lambda: {"kd": 1.0})  # loss -> weight
    tasks: tuple[str, ...] = ()  # tasks this stage trains on (() = all of data.tasks)
    unlabeled: bool = False  # task-agnostic: train on unlabeled text (data.unlabeled_path or pooled)
    augmented: bool = False  # train on the rows + data.augment copies, teacher-labelled (no gold labels)
    from_stage: str = ""  # start from this earlier stage's student ("" = the previous stage)
    each_task: bool = False  # one copy of this stage per task of data.tasks, named <name>_<task>
    temperature: float = 1.0  # for kd
    layer_map: str = "uniform"  # uniform | last | explicit (student layer -> teacher layer)
    layer_map_explicit: tuple[int, ...] = ()
    relation_splits: int = 0  # MHA relation chunks; 0 = the student's head count
    relation_heads: int = 12  # MiniLMv2 Q/K/V relation heads
    supcon_temperature: float = 0.07
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        for name, weight in self.losses.items():
            hint = difflib.get_close_matches(name, LOSS_NAMES, 1)
            _check(name in LOSS_NAMES, f"unknown loss {name!r}"
                   + (f"; did you mean {hint[0]!r}?" if hint else f"; known: {LOSS_NAMES}"))
            _check(weight >= 0, f"loss weight {name}={weight} must be >= 0")
        _check(any(w > 0 for w in self.losses.values()), "losses: at least one weight > 0")
        _one_of(self.layer_map, ("uniform", "last", "explicit"), "layer_map")
        _check(self.temperature > 0 and self.supcon_temperature > 0, "temperatures must be > 0")
        label_losses = {"hard", "supcon"} & {k for k, w in self.losses.items() if w > 0}
        _check(not (self.unlabeled and label_losses),
               f"unlabeled stage cannot use label losses {sorted(label_losses)}")
        _check(not (self.augmented and label_losses),
               f"augmented stage cannot use label losses {sorted(label_losses)}: its copies have "
               "no gold labels (use kd, soft_ce, logit_mse or feature losses)")
        _check(not (self.augmented and self.unlabeled), "a stage is augmented or unlabeled, not both")


def _default_stages() -> tuple[StageConfig, ...]:
    """Soft-target KD (T=2) + hard CE for 3 epochs: on full SST-2 it beat both the MLKD-style
    two-stage recipe (jobs/configs/mlkd.yaml) and no distillation (README, measured results)."""
    return (
        StageConfig(name="predictions", losses={"kd": 1.0, "hard": 1.0}, temperature=2.0,
                    optim=OptimConfig(lr=5e-5, epochs=3)),
    )


@dataclass(frozen=True)
class DistillConfig:
    stages: tuple[StageConfig, ...] = field(default_factory=_default_stages)
    online: bool = False  # run the teacher in the loop instead of reading the cache

    def __post_init__(self) -> None:
        _check(len(self.stages) >= 1, "stages must list at least one stage")
        names = [s.name for s in self.stages]
        _check(len(set(names)) == len(names), f"stage names must be unique, got {names}")
        for i, st in enumerate(self.stages):
            _check(not st.from_stage or st.from_stage in names[:i],
                   f"stages.{i}.from_stage={st.from_stage!r} must name an earlier stage {names[:i]}")


@dataclass(frozen=True)
class SweepConfig:
    space: dict[str, Any] = field(default_factory=dict)  # dotted key -> list (choice) or {low, high[, log]}
    num_samples: int = 8
    scheduler: str = "asha"  # asha (early stopping) | fifo (every trial to the end)
    searcher: str = "random"  # random | optuna (TPE; multi-objective with latency_objective)
    metric: str = "dev_main"
    mode: str = "max"
    latency_objective: bool = False  # also minimise measured latency (Pareto search)
    max_concurrent: int = 0  # 0 = from the cluster's CPUs/GPUs
    grace_period: int = 1  # ASHA: epochs before a trial may be stopped
    storage_path: str = ""  # "" = <run dir>/sweep; may be a URI
    constraints: dict[str, float] = field(default_factory=dict)  # e.g. {"latency_bs1_ms": 10}
    # added for pipeline/sweep.py:
    cost_metric: str = "latency_bs1_ms"  # latency_bs1_ms | params: Pareto x-axis; latency_objective minimises it
    reduction_factor: float = 2.0  # ASHA: a trial passes a rung only in the best 1/reduction_factor
    latency_seq_len: int = 64  # tokens per example when timing a student at batch 1
    max_failures: int = 1  # Tune restarts a failed trial this often; it resumes from its Train checkpoint

    def __post_init__(self) -> None:
        _one_of(self.cost_metric, ("latency_bs1_ms", "params"), "cost_metric")
        _check(self.reduction_factor > 1, f"reduction_factor must be > 1 (e.g. 2), got {self.reduction_factor}")
        _check(self.latency_seq_len >= 1 and self.grace_period >= 1, "latency_seq_len, grace_period >= 1")
        _one_of(self.scheduler, ("asha", "fifo"), "scheduler")
        _one_of(self.searcher, ("random", "optuna"), "searcher")
        _one_of(self.mode, ("max", "min"), "mode")
        _check(self.num_samples >= 1 and self.max_concurrent >= 0, "num_samples >= 1, max_concurrent >= 0")
        _check(self.max_failures >= 0, f"max_failures must be >= 0, got {self.max_failures}")


@dataclass(frozen=True)
class ResultRow:
    name: str = "row"  # the row label in RESULTS.md
    recipe: str = ""  # a recipe YAML (relative to the repo) or "" for the built-in default
    overrides: tuple[str, ...] = ()  # dotted key=value applied to the recipe
    per_task: bool = True  # one run per task and seed (single-task rows) or one run on every task per seed
    # task -> more overrides for that task's runs only (per-task rows), e.g. a task's own lr
    task_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # seeds of this row's runs: 0 = results.seeds (per-task rows: that task's count; multi-task
    # rows: the largest count, so their small tasks show a spread too); n > 0 = n for every task
    seeds: int = 0

    def __post_init__(self) -> None:
        _check(self.per_task or not self.task_overrides,
               f"row {self.name}: task_overrides need per_task: true (one run per task)")
        _check(self.seeds >= 0, f"row {self.name}: seeds must be >= 0 (0 = results.seeds), got {self.seeds}")


@dataclass(frozen=True)
class ResultsConfig:
    rows: tuple[ResultRow, ...] = ()
    seeds: dict[str, int] = field(default_factory=dict)  # task -> seeds (default 1); see ResultRow.seeds
    output: str = "RESULTS.md"  # the table (markdown); the PNG and CSV go beside it

    def __post_init__(self) -> None:
        names = [r.name for r in self.rows]
        _check(len(set(names)) == len(names), f"rows: names must be unique, got {names}")
        _check(all(n >= 1 for n in self.seeds.values()), f"seeds: counts must be >= 1, got {self.seeds}")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)

    def __post_init__(self) -> None:
        if any(st.each_task for st in self.distill.stages):  # expand before the checks below
            object.__setattr__(self, "distill", dataclasses.replace(
                self.distill, stages=_expand_each_task(self.distill.stages, self.data.tasks)))
        for i, st in enumerate(self.distill.stages):
            extra = set(st.tasks) - set(self.data.tasks)
            _check(not extra, f"distill.stages.{i}.tasks lists {sorted(extra)}, which are not in "
                   f"data.tasks {list(self.data.tasks)}")
            _check(not st.augmented or self.data.augment.copies >= 1,
                   f"distill.stages.{i}.augmented needs data.augment.copies >= 1 (e.g. 4)")
        if self.student.arch == "bilstm":
            bad = [n for st in self.distill.stages for n, w in st.losses.items() if w > 0 and n not in
                   ("hard", "kd", "soft_ce", "logit_mse")]
            _check(not bad, f"student.arch=bilstm has no internals to match; losses {bad} need a "
                   "Transformer student (use hard, kd, soft_ce, logit_mse)")


def _expand_each_task(stages: tuple[StageConfig, ...], tasks: tuple[str, ...]) -> tuple[StageConfig, ...]:
    """`each_task` stages become one stage per task (e.g. per-task fine-tuning after a multi-task
    stage): `finetune` -> `finetune_sst2`, `finetune_mrpc`, ... each on its one task."""
    out: list[StageConfig] = []
    for st in stages:
        if not st.each_task:
            out.append(st)
            continue
        _check(not st.tasks or set(st.tasks) <= set(tasks),
               f"stage {st.name}: each_task runs on data.tasks; its tasks {list(st.tasks)} must be among them")
        out += [dataclasses.replace(st, name=f"{st.name}_{t}", tasks=(t,), each_task=False)
                for t in (st.tasks or tasks)]
    return tuple(out)


# ---------------------------------------------------------------- building from dicts


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key} expects a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence):
            value = [value] if not isinstance(value, Mapping) else value
            if isinstance(value, Mapping):
                raise ConfigError(f"config key {key} expects a list, got a mapping")
        return tuple(_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key} expects a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-5 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(f"config key {key} expects {tp.__name__}, got {value!r}")


def _unknown_key(cls: type, name: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    hint = difflib.get_close_matches(name, names, 1)
    full = f"{prefix}.{name}" if prefix else name
    fix = f"did you mean {(prefix + '.' if prefix else '') + hint[0]}?" if hint else f"valid: {names}"
    return ConfigError(f"unknown config key {full}; {fix}")


# Keys older versions had and saved into every run's config.yaml: a saved config still loads
# (rerunning a run from its config.yaml is the documented way to reproduce it).
RETIRED = {"results.latency_seq_len": "it was never read (the report times latency at 64 tokens)"}
_RETIRED_SEEN: set[str] = set()  # each noted once per process


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (partial) nested dict, checking keys and types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields and key in RETIRED:  # in configs saved by older runs
            if key not in _RETIRED_SEEN:
                _RETIRED_SEEN.add(key)
                print(f"[raykd] config key {key} is ignored: {RETIRED[key]}", file=sys.stderr, flush=True)
            continue
        if name not in fields:
            raise _unknown_key(cls, name, prefix)
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists, not tuples) that `from_dict` turns back into `cfg`."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def load(path: str | Path | None = None,
         overrides: Sequence[str] | Mapping[str, Any] = (), sections: Mapping[str, Any] | None = None
         ) -> Config:
    """YAML recipe (optional), then `sections` (a nested partial config laid over it), then
    dotted overrides -> validated `Config`."""
    recipe, bases = read_recipe(path, Config, StageConfig) if path else ({}, [])
    tree = merge_overrides(merge_sections(Config, merge_sections(Config, to_dict(Config()), recipe),
                                          sections or {}), overrides)
    try:
        return from_dict(Config, tree)
    except ConfigError as e:
        where = f"{path} (based on {', '.join(map(str, bases))})" if bases else path
        raise ConfigError(f"{where}: {e}" if path else str(e)) from None


def replace(cfg: Config, overrides: Sequence[str] | Mapping[str, Any]) -> Config:
    """A new `Config` with dotted overrides applied (used by Tune trials)."""
    return from_dict(Config, merge_overrides(to_dict(cfg), overrides))


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")

