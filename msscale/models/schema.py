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


CLASSIFIER = {
    "name": Key(str, help="timm model name", check=nonempty),
    "checkpoint": Key(str, None, nullable=True, help="local weights file; null = random init",
                      check=nonempty),
    "num_classes": Key(int, min=2),
    "input_size": Key(int, None, nullable=True, min=1, help="default: the timm config"),
    "mean": Key(list, None, nullable=True, item_type=float, check=rgb_values),
    "std": Key(list, None, nullable=True, item_type=float, check=rgb_values),
    "kwargs": Key(dict, {}, help="extra timm.create_model arguments"),
}
