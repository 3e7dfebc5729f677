"""Small real inputs for tests: tiny random models and digit shards, and configs using them."""

from __future__ import annotations

from pathlib import Path

import yaml

from msscale.certify.schema import load_certify_config
from msscale.data.shards import make_shards
from msscale.models.tiny import make_tiny_models


def make_assets(root: Path) -> dict:
    """Tiny denoiser + classifier and the digits test split in shards of 100 under `root`."""
    sections = make_tiny_models(root / "models", image_size=16)
    make_shards("digits", root / "digits", split="test", image_size=16, shard_size=100)
    sections["data"] = {"shards": str(root / "digits" / "dataset.json")}
    return sections


def write_certify_yaml(assets: dict, path: Path, out: Path, **smoothing) -> Path:
    """A certify config over the assets, small enough to run in seconds on a CPU."""
    cfg = {
        **assets,
        "out": str(out),
        "seed": 7,
        "data": {**assets["data"], "max_images": 6},
        "smoothing": {
            "sigmas": [0.25, 0.5, 1.0],
            "n0": 10,
            "n": 40,
            "batch_size": 32,
            "noise_block": 16,
            "flush_every": 2,
            "alpha": 0.01,
            **smoothing,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def certify_config(assets: dict, tmp_path: Path, *overrides: str, **smoothing) -> dict:
    path = write_certify_yaml(assets, tmp_path / "certify.yaml", tmp_path / "run", **smoothing)
    return load_certify_config(path, overrides)
