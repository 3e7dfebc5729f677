"""The config sections that describe the models (docs/design.md §4)."""

from __future__ import annotations

from msscale.config import Key, nonempty
from msscale.errors import UserError


def rgb_values(path: str, values: list[float]) -> None:
    """Normalisation takes one value per RGB channel; a std must be positive (1/0 gives inf)."""
    if len(values) != 3:
        raise UserError(f"config key {path}: expected 3 values (R, G, B), got {values}")
    if path.endswith("std") and min(values) <= 0:
        raise UserError(f"config key {path}: expected positive values, got {values}")


CLASSIFIER = {  # msscale/models/classifiers.py
    "source": Key(str, "timm", choices=("timm", "transformers")),
    "name": Key(str, help="timm model name; transformers: a directory or hub id", check=nonempty),
    "pretrained": Key(bool, False, help="timm: timm's pretrained weights (Hugging Face cache)"),
    "checkpoint": Key(str, None, nullable=True, help="timm: local weights file",
                      check=nonempty),
    "num_classes": Key(int, min=2),
    "input_size": Key(int, None, nullable=True, min=1, help="default: the model's config"),
    "interpolation": Key(str, None, nullable=True, choices=("bilinear", "bicubic", "nearest")),
    "mean": Key(list, None, nullable=True, item_type=float, check=rgb_values),
    "std": Key(list, None, nullable=True, item_type=float, check=rgb_values),
    "kwargs": Key(dict, {}, help="extra timm.create_model / from_pretrained arguments"),
}
