"""Configs: YAML files, `key.sub=value` overrides, validation against a schema.

The mechanism only: each kind of job has its schema beside its code (certify/schema.py,
finetune/schema.py): a nested dict whose leaves are `Key`s.
Merge order: schema defaults -> YAML file -> command-line overrides. Every error names the
key and what was expected; an unknown key lists the valid ones.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from msscale.atomic import atomic_write_text
from msscale.errors import UserError
from msscale.paths import regular_file

REQUIRED = object()


@dataclass(frozen=True)
class Key:
    """One config leaf: its type, default, and the values it may take."""

    type: type | tuple[type, ...]
    default: Any = REQUIRED
    choices: tuple | None = None
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    item_type: type | None = None  # for lists
    help: str = ""
    check: Callable[[str, Any], None] | None = None  # raises UserError(key path, value)


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML, so 0.5 is a float and [1,2] a list)."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    node = cfg
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _defaults(schema: dict) -> dict:
    out = {}
    for name, leaf in schema.items():
        if isinstance(leaf, dict):
            out[name] = _defaults(leaf)
        elif leaf.default is not REQUIRED:
            out[name] = copy.deepcopy(leaf.default)
    return out


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and value:
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _check_leaf(path: str, leaf: Key, value: Any) -> Any:
    if value is None:
        if leaf.nullable:
            return None
        raise UserError(f"config key {path} must not be null")
    types = leaf.type if isinstance(leaf.type, tuple) else (leaf.type,)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in types:
        raise UserError(f"config key {path}: expected {_type_name(types)}, got {value!r}")
    if not isinstance(value, types):
        raise UserError(f"config key {path}: expected {_type_name(types)}, got {value!r}")
    if leaf.item_type is not None:
        value = [_check_leaf(f"{path}[{i}]", Key(leaf.item_type), v) for i, v in enumerate(value)]
    if leaf.choices is not None and value not in leaf.choices:
        raise UserError(f"config key {path}: expected one of {list(leaf.choices)}, got {value!r}")
    numbers = value if isinstance(value, list) else [value]
    for number in numbers:
        if not isinstance(number, (int, float)):
            continue
        # NaN passes every min/max comparison below, and inf is no setting: refuse both here
        if isinstance(number, float) and not math.isfinite(number):
            raise UserError(f"config key {path}: expected a finite number, got {number!r}")
        if leaf.min is not None and number < leaf.min:
            raise UserError(f"config key {path}: expected >= {leaf.min}, got {number!r}")
        if leaf.max is not None and number > leaf.max:
            raise UserError(f"config key {path}: expected <= {leaf.max}, got {number!r}")
    if leaf.check is not None:
        leaf.check(path, value)
    return value


def ascending_scales(path: str, sigmas: list[float]) -> None:
    """The check for every list of noise scales: non-empty, positive, distinct, ascending."""
    if not sigmas or any(s <= 0 for s in sigmas) or sorted(set(sigmas)) != sigmas:
        raise UserError(
            f"config key {path}: expected distinct ascending positive noise scales, got {sigmas}"
        )


def nonempty(path: str, value: str) -> None:
    """The check for every path key: an empty string would mean the working directory."""
    if not value.strip():
        raise UserError(f"config key {path} must not be empty")


def _type_name(types: tuple) -> str:
    return " or ".join(t.__name__ for t in types)


def _validate(cfg: dict, schema: dict, prefix: str = "") -> dict:
    unknown = sorted(set(cfg) - set(schema), key=str)  # YAML keys need not be strings
    if unknown:
        valid = ", ".join(sorted(_leaf_paths(schema, prefix)))
        raise UserError(f"unknown config key {prefix}{unknown[0]}; valid keys: {valid}")
    out = {}
    for name, leaf in schema.items():
        path = prefix + name
        if isinstance(leaf, dict):
            section = cfg.get(name, {})
            if not isinstance(section, dict):
                raise UserError(f"config key {path} must be a section (a mapping)")
            out[name] = _validate(section, leaf, path + ".")
        elif name in cfg:
            out[name] = _check_leaf(path, leaf, cfg[name])
        else:
            raise UserError(f"config key {path} is required ({leaf.help or leaf.type.__name__})")
    return out


def _leaf_paths(schema: dict, prefix: str = "") -> list[str]:
    paths = []
    for name, leaf in schema.items():
        if isinstance(leaf, dict):
            paths += _leaf_paths(leaf, prefix + name + ".")
        else:
            paths.append(prefix + name)
    return paths


def load_config(path: str | os.PathLike | None, overrides: list[str], schema: dict) -> dict:
    """Load a YAML config, apply `key.sub=value` overrides, validate against `schema`.

    Relative paths in the YAML stay as written (relative to the working directory).
    """
    cfg = _deep_merge(_defaults(schema), _read_yaml(path) if path is not None else {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(cfg, key, value)
    return _validate(cfg, schema)


def _read_yaml(path: str | os.PathLike) -> dict:
    path = regular_file(path, "config file")  # a FIFO is refused, not waited on
    try:
        from_file = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())  # PyYAML's message spans lines
        raise UserError(f"config file {path} is not valid YAML: {reason}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not text (a binary file?)") from None
    if not isinstance(from_file, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return from_file


def save_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically), so a run directory says how it was made."""
    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
