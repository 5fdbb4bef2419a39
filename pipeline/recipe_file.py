"""Recipe files: YAML reading, `base:` inheritance, `like:` stages and dotted overrides.

A recipe may start from another one instead of copying it:

    base: mlkd.yaml                 # a path relative to this file's folder
    run: {name: mlkd_augmented}
    data: {augment: {copies: 4}}    # sections merge into the base's, key by key
    distill:
      stages:                       # a list replaces the base's list ...
        - {like: features, augmented: true, optim: {epochs: 1}}   # ... but an entry may take a
        - {like: predictions}                                     # base stage and change keys

`like: <name>` copies the base recipe's stage of that name and lays the entry's keys over it
(`optim` merges key by key; `losses` and other values are replaced whole). An entry without
`name` keeps the base stage's. The result is an ordinary partial config: `config.load` checks it
like any other, and every run saves the resolved config (no `base` or `like` left in it).
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from pipeline.errors import ConfigError


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def read_recipe(path: str | Path, config_cls: type, stage_cls: type,
                _chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[Path]]:
    """The partial config tree of a recipe file, with its `base:` chain and `like:` stages
    resolved, and the base recipes it builds on, nearest first (for error messages)."""
    p = Path(path).resolve()
    if p in _chain:
        raise ConfigError("recipe base chain loops: " + " -> ".join(str(c) for c in (*_chain, p)))
    tree = read_yaml(p)
    base_name = tree.pop("base", None)
    if base_name is None:
        base: dict[str, Any] = {}
        bases: list[Path] = []
    elif isinstance(base_name, str) and base_name:
        base_path = (p.parent / base_name).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{p}: base recipe {base_name} not found (looked for {base_path})")
        base, further = read_recipe(base_path, config_cls, stage_cls, (*_chain, p))
        bases = [base_path, *further]
    else:
        raise ConfigError(f"{p}: base must be a recipe file name (e.g. base: mlkd.yaml), got {base_name!r}")
    distill = tree.get("distill")
    if isinstance(distill, dict) and isinstance(distill.get("stages"), list):
        base_stages = (base.get("distill") or {}).get("stages") or []
        distill["stages"] = [_resolve_stage(s, i, base_stages, stage_cls, p, base_name)
                             for i, s in enumerate(distill["stages"])]
    return merge_sections(config_cls, base, tree), bases


def _resolve_stage(entry: Any, i: int, base_stages: list, stage_cls: type, path: Path,
                   base_name: str | None) -> Any:
    if not isinstance(entry, Mapping) or "like" not in entry:
        return entry
    entry = dict(entry)
    like = entry.pop("like")
    key = f"{path}: distill.stages.{i}.like"
    if base_name is None:
        raise ConfigError(f"{key}={like!r} needs a base recipe (base: <file>) whose stage it copies")
    found = [s for s in base_stages if isinstance(s, Mapping) and s.get("name") == like]
    if not found:
        names = [s.get("name") for s in base_stages if isinstance(s, Mapping)]
        raise ConfigError(f"{key}: the base recipe {base_name} has no stage {like!r}; its stages: {names}")
    return merge_sections(stage_cls, copy.deepcopy(dict(found[0])), entry)


def merge_sections(cls: type, base: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `new` into `base` recursively for dataclass sections; other values are replaced."""
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for key, value in new.items():
        tp = hints.get(key)
        if tp is not None and dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            out[key] = merge_sections(tp, out.get(key) or {}, value)
        else:
            out[key] = value
    return out


def merge_overrides(tree: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> dict:
    """Apply dotted overrides (`a.b=1` strings or a {dotted: value} mapping) to a nested dict."""
    out = copy.deepcopy(dict(tree))
    items = overrides.items() if isinstance(overrides, Mapping) else map(_parse_override, overrides)
    for key, value in items:
        _set_dotted(out, key, value)
    return out


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. teacher.optim.lr=3e-5")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key}: index {part} out of range (list has {len(node)})")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {key}: index {last} out of range (list has {len(node)})")
        node[int(last)] = value
    else:
        node[last] = value
