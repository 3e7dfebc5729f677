"""Configs: YAML files, `key.sub=value` overrides, validation against a schema.

Each kind of job (certify, finetune) has a schema: a nested dict whose leaves are `Key`s.
Merge order: schema defaults -> YAML file -> command-line overrides. Every error names the
key and what was expected; an unknown key lists the valid ones.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from msscale.errors import UserError

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


SLURM = {
    "partition": Key(str, None, nullable=True),
    "account": Key(str, None, nullable=True),
    "qos": Key(str, None, nullable=True),
    "gpus_per_node": Key(int, 0, min=0),
    "cpus_per_task": Key(int, 1, min=1),
    "mem_gb": Key(int, 4, min=1),
    "time_min": Key(int, 60, min=1),
    "array_parallelism": Key(int, 256, min=1),
}

CLASSIFIER = {  # msscale/models/classifiers.py
    "source": Key(str, "timm", choices=("timm", "transformers")),
    "name": Key(str, help="timm model name; transformers: a directory or hub id"),
    "pretrained": Key(bool, False, help="timm: timm's pretrained weights (Hugging Face cache)"),
    "checkpoint": Key(str, None, nullable=True, help="timm: local weights file"),
    "num_classes": Key(int, min=2),
    "input_size": Key(int, None, nullable=True, min=1, help="default: the model's config"),
    "interpolation": Key(str, None, nullable=True, choices=("bilinear", "bicubic", "nearest")),
    "mean": Key(list, None, nullable=True, item_type=float),
    "std": Key(list, None, nullable=True, item_type=float),
    "kwargs": Key(dict, {}, help="extra timm.create_model / from_pretrained arguments"),
}

CERTIFY_SCHEMA = {
    "seed": Key(int, 0, min=0),
    "out": Key(str, "runs/certify"),
    "device": Key(str, "auto", choices=("auto", "cpu", "cuda")),
    "precision": Key(
        str, "fp32", choices=("fp32", "bf16"), help="bf16: autocast (GPUs, CPUs with AVX512-BF16)"
    ),
    "channels_last": Key(bool, True, help="run the models in channels_last memory format"),
    "compile": Key(bool, False, help="torch.compile the models (slow start, faster sampling)"),
    "denoiser": {
        "path": Key(str, help="diffusers directory or hub id"),
        "fit": Key(str, "resize", choices=("resize", "pad"),
                   help="images of another size than the UNet's: resize them, or reflect-pad "
                   "the noisy image to the UNet's size and crop the denoised one back"),
    },
    "classifier": CLASSIFIER,
    "data": {
        "shards": Key(str, help="brace-expanded WebDataset URL or a dataset.json"),
        "skip": Key(int, 1, min=1, help="certify every skip-th image"),
        "max_images": Key(int, None, nullable=True, min=1),
    },
    "smoothing": {
        "sigmas": Key(list, [0.25, 0.5, 1.0], item_type=float),
        "n0": Key(int, 100, min=1),
        "n": Key(int, 10000, min=1),
        "alpha": Key(float, 0.001, min=1e-12, max=0.5),
        "p0": Key(float, 0.5, min=0.5, max=0.999999),
        "schedule": Key(str, "full", choices=("full", "cascade")),
        "batch_size": Key(int, 256, min=1),
        "noise_block": Key(int, 1000, min=1, help="draws per counter-based noise block"),
        "flush_every": Key(int, 16, min=1, help="images between progress flushes"),
    },
    "bench": {
        "images": Key(int, 4, min=1, help="images timed"),
        "warmup": Key(int, 1, min=0, help="images run first, not timed"),
        "rounds": Key(int, 3, min=1, help="timed repetitions; figures are their median"),
        "inputs": Key(str, "data", choices=("data", "random"), help="data.shards or noise"),
        "random_denoiser": Key(
            dict, None, nullable=True, help="UNet2DModel config: random weights at denoiser.path"
        ),
    },
    "slurm": SLURM,
}


def _schema_for(kind: str) -> dict:
    if kind == "certify":
        return CERTIFY_SCHEMA
    if kind == "finetune":
        from msscale.finetune.schema import FINETUNE_SCHEMA

        return FINETUNE_SCHEMA
    raise ValueError(f"unknown config kind {kind!r}")


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
        if leaf.min is not None and number < leaf.min:
            raise UserError(f"config key {path}: expected >= {leaf.min}, got {number!r}")
        if leaf.max is not None and number > leaf.max:
            raise UserError(f"config key {path}: expected <= {leaf.max}, got {number!r}")
    return value


def _type_name(types: tuple) -> str:
    return " or ".join(t.__name__ for t in types)


def _validate(cfg: dict, schema: dict, prefix: str = "") -> dict:
    unknown = sorted(set(cfg) - set(schema))
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


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), kind: str = "certify"):
    """Load a YAML config, apply `key.sub=value` overrides, validate; returns a nested dict.

    Relative paths in the YAML stay as written (relative to the working directory).
    """
    schema = _schema_for(kind)
    from_file = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            from_file = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(from_file, dict):
            raise UserError(f"config file {path} must hold a mapping at the top level")
    cfg = _deep_merge(_defaults(schema), from_file)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(cfg, key, value)
    cfg = _validate(cfg, schema)
    if kind == "certify":
        _check_certify(cfg)
    return cfg


def _check_certify(cfg: dict) -> None:
    sigmas = cfg["smoothing"]["sigmas"]
    if not sigmas:
        raise UserError("config key smoothing.sigmas: expected at least one noise scale")
    if any(s <= 0 for s in sigmas):
        raise UserError(f"config key smoothing.sigmas: expected positive values, got {sigmas}")
    if sorted(set(sigmas)) != sigmas:
        raise UserError(
            f"config key smoothing.sigmas: expected distinct ascending values, got {sigmas}"
        )


def save_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically), so a run directory says how it was made."""
    from msscale.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
