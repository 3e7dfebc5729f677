"""The embedded default: what `tools/certify_array.py` and `tools/submit.py` run without --cfg.

The digits with the demo's own small models, on whatever machine this is. The configs ship
inside the package (demo/configs/), so this works from a non-editable install; the model
paths point into the package's assets and the data is made under `data/` on first use.
"""

from __future__ import annotations

import logging
from pathlib import Path

from msscale.demo.models import ASSETS

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"
DIGITS = {"train": Path("data/digits-train"), "test": Path("data/digits-test")}


def model_overrides() -> list[str]:
    """`key=value` overrides that point a config at the demo's denoiser and classifier."""
    return [f"denoiser.path={ASSETS / 'denoiser'}",
            f"classifier.checkpoint={ASSETS / 'classifier.safetensors'}"]


def certify_default() -> tuple[Path, list[str]]:
    """(config file, overrides) of the embedded certification run; makes its data if needed."""
    test = ensure_digits("test")
    return CONFIGS / "certify_digits.yaml", [*model_overrides(), f"data.shards={test}"]


def finetune_default() -> tuple[Path, list[str]]:
    """(config file, overrides) of the embedded fine-tuning run; makes its data if needed."""
    train, test = ensure_digits("train"), ensure_digits("test")
    return CONFIGS / "finetune_digits.yaml", [
        *model_overrides(), f"data.train_shards={train}", f"data.val_shards={test}"]


def ensure_digits(split: str, directory: Path | None = None) -> Path:
    """dataset.json of the digits' `split` (16 px) in `directory` (default data/digits-SPLIT),
    written on first use."""
    from msscale.data.shards import make_shards

    directory = directory if directory is not None else DIGITS[split]
    dataset_json = directory / "dataset.json"
    if not dataset_json.is_file():
        log.info("first use: writing the digits' %s split to %s", split, directory)
        make_shards("digits", directory, split=split, image_size=16)
    return dataset_json
