"""The config sections that describe the models (docs/design.md §4)."""

from __future__ import annotations

from msscale.config import Key

CLASSIFIER = {
    "name": Key(str, help="timm model name"),
    "checkpoint": Key(str, None, nullable=True, help="local weights file; null = random init"),
    "num_classes": Key(int, min=2),
    "input_size": Key(int, None, nullable=True, min=1, help="default: the timm config"),
    "mean": Key(list, None, nullable=True, item_type=float),
    "std": Key(list, None, nullable=True, item_type=float),
    "kwargs": Key(dict, {}, help="extra timm.create_model arguments"),
}
