"""A sweep's search space: dotted config keys -> Ray Tune domains, the constraints a sampled
configuration must meet before its trial starts, and the searcher that draws only valid ones.

Space syntax (the recipe's `sweep.space`, keys are the config's dotted keys):
  student.layers: [1, 2, 3, 4]                      a choice
  distill.stages.0.optim.lr: {low: 1e-5, high: 1e-3, log: true}   a range (ints for int fields)
A sampled configuration becomes a trial's config through `config.replace`, the same function
that applies command-line overrides; anything `replace` or the stage checks refuse is rejected
(and recorded) before a trial starts, and the searcher draws again.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import pickle
import typing
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config, _coerce, from_dict, merge_overrides
from pipeline.errors import ConfigError
from pipeline.objective import check_stage
from pipeline.ray_runtime import LOOPBACK_ENV

for _key, _value in LOOPBACK_ENV.items():  # Ray reads them when imported: set them first
    os.environ.setdefault(_key, _value)

from ray.tune.search import Searcher  # noqa: E402

RANGE_KEYS = {"low", "high", "log"}


def field_type(key: str) -> type:
    """The Python type of a dotted config key; unknown keys fail with a suggestion."""
    tp: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "config"
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                hint = difflib.get_close_matches(part, list(hints), 1)
                prefix = ".".join(parts[:i] + [hint[0]]) if hint else ""
                raise ConfigError(f"sweep.space: unknown config key {key}"
                                  + (f"; did you mean {prefix}?" if hint else f"; {where} has {list(hints)}"))
            tp = hints[part]
        elif typing.get_origin(tp) is tuple:
            if not part.isdigit():
                raise ConfigError(f"sweep.space key {key}: {where} is a list; use an index, e.g. {where}.0")
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]  # e.g. a loss weight: any name, validated per sample
        else:
            raise ConfigError(f"sweep.space key {key}: {where} is a value, not a section")
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) in (tuple, dict):
        raise ConfigError(f"sweep.space key {key} is a section; search its fields, e.g. {key}.<field>")
    return tp


def make_domain(key: str, spec: Any):
    """One space entry -> a Ray Tune domain (choice, uniform/loguniform, randint/lograndint)."""
    from ray import tune

    tp = field_type(key)
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(f"sweep.space.{key} is an empty list; give at least one value")
        # typed like the field (YAML reads 1e-6 as a string), so the table's columns are too
        return tune.choice([_coerce(v, tp, f"sweep.space.{key}") for v in spec])
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep.space.{key}={spec!r}: give a list of choices or "
                          "{low: ..., high: ...[, log: true]}")
    if set(spec) - RANGE_KEYS or not {"low", "high"} <= set(spec):
        raise ConfigError(f"sweep.space.{key}: a range needs exactly low, high and optionally log; "
                          f"got {sorted(spec)}")
    if tp not in (int, float):
        raise ConfigError(f"sweep.space.{key} is a {tp.__name__} field; give a list of choices")
    try:
        low, high, log = float(spec["low"]), float(spec["high"]), bool(spec.get("log", False))
    except (TypeError, ValueError):
        raise ConfigError(f"sweep.space.{key}: low and high must be numbers, got {spec}") from None
    if low > high:
        raise ConfigError(f"sweep.space.{key}: low={low:g} > high={high:g}")
    if log and low <= 0:
        raise ConfigError(f"sweep.space.{key}: log ranges need low > 0, got {low:g}")
    if tp is int:
        if not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"sweep.space.{key} is an int field; low and high must be integers")
        return (tune.lograndint if log else tune.randint)(int(low), int(high) + 1)  # high inclusive
    return (tune.loguniform if log else tune.uniform)(low, high)


def make_space(cfg: Config) -> dict[str, Any]:
    if not cfg.sweep.space:
        raise ConfigError("sweep.space is empty: give at least one dotted config key, "
                          "e.g. sweep.space: {student.layers: [2, 4]}")
    return {key: make_domain(key, spec) for key, spec in cfg.sweep.space.items()}


def sample(space: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """One draw of every key (plain Python values)."""
    return {k: _plain(d.sample(random_state=rng)) for k, d in space.items()}


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


@dataclasses.dataclass(frozen=True)
class Constraints:
    """What a sampled configuration must meet before its trial starts (picklable: Tune saves it
    with the searcher)."""

    base: dict  # the base config as a plain dict
    teacher_heads: int
    teacher_width: int

    def problems(self, params: dict[str, Any]) -> list[str]:
        """[] when the configuration can run; otherwise why not (one line each)."""
        return self.build(params)[1]

    def build(self, params: dict[str, Any]) -> tuple[Config | None, list[str]]:
        """(the trial's config, []) or (None or the config, the reasons it cannot run)."""
        try:
            cfg = from_dict(Config, merge_overrides(self.base, params))
        except ConfigError as e:
            return None, [str(e)]
        out = []
        if cfg.distill.online:
            out.append("distill.online=true runs the teacher in every trial; a sweep reads the cache")
        if cfg.student.init_from == "teacher":
            out.append("student.init_from=teacher loads the teacher's weights in every trial; "
                       "a sweep never loads the teacher (use init_from=base)")
        for stage in cfg.distill.stages:
            try:
                check_stage(stage, cfg.student.arch, cfg.student.heads, cfg.student.hidden,
                            self.teacher_heads, self.teacher_width)
            except ConfigError as e:
                out.append(str(e))
        return cfg, out


def check_satisfiable(space: dict[str, Any], constraints: Constraints, seed: int,
                      draws: int = 1000) -> list[Config]:
    """Configs of the valid draws among `draws` random ones; a ConfigError naming the commonest
    reasons if none is valid."""
    rng = np.random.default_rng(seed)
    valid, reasons, seen = [], Counter(), {}
    for _ in range(draws):
        params = sample(space, rng)
        key = json.dumps(params, sort_keys=True, default=str)
        if key not in seen:  # choice-only spaces repeat: build each configuration once
            seen[key] = constraints.build(params)
        cfg, problems = seen[key]
        if problems:
            reasons.update(problems)
        else:
            valid.append(cfg)
    if not valid:
        top = "; ".join(f"{r} ({n} of {draws})" for r, n in reasons.most_common(3))
        raise ConfigError(f"sweep.space: none of {draws} sampled configurations can run: {top}. "
                          "Widen the space or drop the conflicting choices")
    return valid


class ConstrainedSearch(Searcher):
    """A Ray Tune Searcher that draws until the configuration meets the constraints.

    inner=None draws at random (seeded); otherwise configurations come from `inner` (Optuna) and
    each rejected one is told to it as a finished trial as bad as the worst seen on every
    objective. (Told as failed, TPE learnt nothing from it: on the SST-2 sweep it kept drawing
    hidden=256 with 8 or 12 heads, 1000 rejections in a row.) Every rejection is appended to
    `log_path`.
    """

    def __init__(self, space: dict[str, Any], constraints: Constraints, metric, mode, seed: int,
                 log_path: str, inner=None, max_draws: int = 1000):
        super().__init__(metric=metric, mode=mode)
        self.space, self.constraints, self.inner = space, constraints, inner
        self.rng = np.random.default_rng(seed)
        self.log_path, self.max_draws = log_path, max_draws
        self.inner_ids: dict[str, str] = {}
        self.worst: dict[str, float] = {}  # per objective, over finished trials

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # metric, mode and space are ours; Tune's param_space stays empty

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        for attempt in range(self.max_draws):
            inner_id = trial_id if attempt == 0 else f"{trial_id}-rejected{attempt}"
            params = self.inner.suggest(inner_id) if self.inner else sample(self.space, self.rng)
            problems = self.constraints.problems(params)
            if not problems:
                self.inner_ids[trial_id] = inner_id
                return params
            if self.inner:
                self.inner.on_trial_complete(inner_id, self._penalty())
            self._record(trial_id, params, problems)
        raise ConfigError(f"sweep: {self.max_draws} draws in a row broke the constraints; "
                          f"see {self.log_path}")

    def _record(self, trial_id: str, params: dict, problems: list[str]) -> None:
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"before_trial": trial_id, "config": params, "problems": problems}) + "\n")

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.inner and trial_id in self.inner_ids and self._has_metrics(result) \
                and not result.get("diverged"):
            self.inner.on_trial_result(self.inner_ids[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if self.inner and trial_id in self.inner_ids and result and result.get("diverged"):
            # a non-finite loss (its metric is NaN): as bad as the worst, like a rejected draw
            self.inner.on_trial_complete(self.inner_ids[trial_id], self._penalty())
        elif self.inner and trial_id in self.inner_ids:
            ok = result is not None and self._has_metrics(result)
            self.inner.on_trial_complete(self.inner_ids[trial_id], result if ok else None, error)
            if ok:
                for m, mode in self._objectives():
                    worse = min if mode == "max" else max
                    self.worst[m] = worse(self.worst.get(m, result[m]), result[m])

    def _objectives(self) -> list[tuple[str, str]]:
        if isinstance(self.metric, list):
            return list(zip(self.metric, self.mode))
        return [(self.metric, self.mode)]

    def _penalty(self) -> dict[str, float]:
        """A rejected draw's result: the worst value seen per objective (a large one before any
        trial finished)."""
        return {m: self.worst.get(m, -1e6 if mode == "max" else 1e6) for m, mode in self._objectives()}

    def _has_metrics(self, result: dict) -> bool:
        return all(m in result for m, _ in self._objectives())

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"rng": self.rng.bit_generator.state, "inner_ids": self.inner_ids, "worst": self.worst,
                         "inner": self.inner.__dict__ if self.inner else None}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.rng.bit_generator.state = state["rng"]
        self.inner_ids = state["inner_ids"]
        self.worst = state.get("worst", {})
        if self.inner and state["inner"] is not None:
            self.inner.__dict__.update(state["inner"])


def make_searcher(cfg: Config, space: dict[str, Any], constraints: Constraints, log_path: str,
                  objectives: list[tuple[str, str]]):
    """random: seeded draws; optuna: TPE (multi-objective when `objectives` has several)."""
    metrics, modes = [m for m, _ in objectives], [d for _, d in objectives]
    metric, mode = (metrics, modes) if len(objectives) > 1 else (metrics[0], modes[0])
    inner = None
    if cfg.sweep.searcher == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        inner = OptunaSearch(space=space, metric=metric, mode=mode, seed=cfg.run.seed)
    return ConstrainedSearch(space, constraints, metric, mode, cfg.run.seed, log_path, inner)

