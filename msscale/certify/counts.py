"""Counts files (docs/design.md §3.2): per-scale selection and estimation votes, atomic.

`used` [I, K] records the estimation draws each image used at each scale: n where a `full`
or `cascade` run sampled the scale, the look where a `sequential` run stopped it, 0 where
it was never reached. Every draw casts one vote, so it equals the estimation votes' sum;
the file stores it for readers and `load_counts` checks the two agree (files written before
`used` existed get it from the votes).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msscale.atomic import atomic_path
from msscale.errors import UserError
from msscale.paths import regular_file

KEYS = ("index", "label", "sigmas", "select", "estimate", "meta")
OPTIONAL_KEYS = ("used",)


@dataclass
class Counts:
    """Votes of I images at K scales over C classes, with the metadata that produced them."""

    index: np.ndarray  # [I] int64
    label: np.ndarray  # [I] int64
    sigmas: np.ndarray  # [K] float64, ascending
    select: np.ndarray  # [I, K, C] int64
    estimate: np.ndarray  # [I, K, C] int64
    meta: dict = field(default_factory=dict)

    @property
    def used(self) -> np.ndarray:
        """[I, K] int64: the estimation draws used per image and scale (one vote each)."""
        return self.estimate.sum(axis=2)

    @property
    def evaluations(self) -> np.ndarray:
        """[I] int64: model evaluations per image, selection and estimation draws together."""
        return self.select.sum(axis=(1, 2)) + self.estimate.sum(axis=(1, 2))

    @classmethod
    def empty(cls, sigmas, num_classes: int, meta: dict) -> Counts:
        k = len(sigmas)
        return cls(
            index=np.zeros(0, np.int64),
            label=np.zeros(0, np.int64),
            sigmas=np.asarray(sigmas, np.float64),
            select=np.zeros((0, k, num_classes), np.int64),
            estimate=np.zeros((0, k, num_classes), np.int64),
            meta=meta,
        )

    def append(self, index, label, select, estimate) -> None:
        self.index = np.concatenate([self.index, np.asarray(index, np.int64)])
        self.label = np.concatenate([self.label, np.asarray(label, np.int64)])
        self.select = np.concatenate([self.select, np.asarray(select, np.int64)])
        self.estimate = np.concatenate([self.estimate, np.asarray(estimate, np.int64)])


def save_counts(counts: Counts, path: str | Path) -> None:
    """Write a counts .npz under a temporary name, then rename it into place."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                index=counts.index,
                label=counts.label,
                sigmas=counts.sigmas,
                select=counts.select,
                estimate=counts.estimate,
                used=counts.used,
                meta=np.array(json.dumps(counts.meta, sort_keys=True)),
            )


def load_counts(path: str | Path) -> Counts:
    """Read a counts .npz; a missing, truncated or malformed file is a UserError naming it."""
    path = regular_file(path, "counts file")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in KEYS if key not in data.files]
            if missing:
                raise UserError(f"counts file {path} lacks the keys {missing}")
            arrays = {key: data[key] for key in KEYS + OPTIONAL_KEYS if key in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise UserError(f"counts file {path} is truncated or not a counts file: {err}") from None
    counts = Counts(
        index=_integers(arrays["index"], "index", path),
        label=_integers(arrays["label"], "label", path),
        sigmas=_scales(arrays["sigmas"], path),
        select=_integers(arrays["select"], "select", path),
        estimate=_integers(arrays["estimate"], "estimate", path),
        meta=_meta(arrays["meta"], path),
    )
    _check_shapes(counts, path)
    if "used" in arrays and not np.array_equal(arrays["used"], counts.used):
        raise UserError(f"counts file {path}: `used` disagrees with the estimation votes")
    return counts


def _integers(values: np.ndarray, key: str, path: Path) -> np.ndarray:
    """int64 of an integer array; refused (not floored) if it holds anything else."""
    if not np.issubdtype(values.dtype, np.integer):
        raise UserError(f"counts file {path}: {key} holds {values.dtype} values, expected integers")
    if values.size and values.min() < 0 and key != "label":
        raise UserError(f"counts file {path}: {key} holds negative values")
    return values.astype(np.int64)


def _scales(values: np.ndarray, path: Path) -> np.ndarray:
    sigmas = values.astype(np.float64) if np.issubdtype(values.dtype, np.number) else None
    if (sigmas is None or sigmas.ndim != 1 or not sigmas.size or not np.isfinite(sigmas).all()
            or (sigmas <= 0).any() or (np.diff(sigmas) <= 0).any()):
        raise UserError(f"counts file {path}: sigmas must be finite, positive and ascending, "
                        f"got {values.tolist()}")
    return sigmas


def _meta(value: np.ndarray, path: Path) -> dict:
    try:
        meta = json.loads(str(value))
    except json.JSONDecodeError as err:
        raise UserError(f"counts file {path}: meta is not JSON ({err})") from None
    if not isinstance(meta, dict):
        raise UserError(f"counts file {path}: meta is not a JSON object")
    return meta


def _check_shapes(counts: Counts, path: Path) -> None:
    images, scales = len(counts.index), len(counts.sigmas)
    if counts.label.shape != (images,):
        raise UserError(
            f"counts file {path}: label has shape {counts.label.shape}, expected ({images},)"
        )
    for key in ("select", "estimate"):
        shape = getattr(counts, key).shape
        if len(shape) != 3 or shape[:2] != (images, scales):
            raise UserError(
                f"counts file {path}: {key} has shape {shape}, expected ({images}, {scales}, C)"
            )
