"""How a certification run is split into tasks, and what their files are called.

A run is split into `num_shards` tasks: image groups x sample splits. Task t takes image
group t // sample_splits and sample split t % sample_splits; a sample split owns a slice
of the estimation blocks, and split 0 also owns the selection draws.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from msscale.errors import UserError
from msscale.smoothing.sampling import ESTIMATE, SELECT, block_sizes

SHARD_FILE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.npz$")


def shard_files(out: str | Path) -> dict[tuple[int, int], Path]:
    """The finished shard files of a run directory, by (shard id, shard count)."""
    found = {}
    for path in sorted((Path(out) / "counts").glob("shard-*.npz")):
        match = SHARD_FILE.match(path.name)
        if match:
            found[int(match.group(1)), int(match.group(2))] = path
    return found


def shard_name(shard_id: int, num_shards: int) -> str:
    return f"shard-{shard_id:05d}-of-{num_shards:05d}"


def shard_path(out: str | Path, shard_id: int, num_shards: int) -> Path:
    return Path(out) / "counts" / f"{shard_name(shard_id, num_shards)}.npz"


def progress_path(out: str | Path, shard_id: int, num_shards: int) -> Path:
    return Path(out) / "counts" / f"{shard_name(shard_id, num_shards)}.progress.npz"


def image_positions(num_images: int, shard_id: int, num_shards: int, sample_splits: int):
    """Positions, among the run's `num_images` addressed images, of task `shard_id`'s images
    (the merge recomputes them to check that every shard holds all of its images)."""
    group = shard_id // sample_splits
    return np.array_split(np.arange(num_images), num_shards // sample_splits)[group]


def plan_shard(cfg: dict, num_images: int, shard_id: int, num_shards: int, sample_splits: int):
    """(image positions, {stream: block range}) owned by task `shard_id` of `num_shards`."""
    if num_shards % sample_splits:
        raise UserError(f"{num_shards} shards do not divide into {sample_splits} sample splits")
    if sample_splits > 1 and cfg["smoothing"]["schedule"] != "full":
        raise UserError(
            f"sample splits need smoothing.schedule=full, not {cfg['smoothing']['schedule']}: "
            "a cascade or sequential decision needs all of an image's draws at a scale in one "
            "task; split the images instead (--shards)"
        )
    split = shard_id % sample_splits
    positions = image_positions(num_images, shard_id, num_shards, sample_splits)
    n_blocks = len(block_sizes(cfg["smoothing"]["n"], cfg["smoothing"]["noise_block"]))
    if sample_splits > n_blocks:
        raise UserError(f"{sample_splits} sample splits but only {n_blocks} estimation blocks")
    estimate_blocks = np.array_split(np.arange(n_blocks), sample_splits)[split]
    n0_blocks = len(block_sizes(cfg["smoothing"]["n0"], cfg["smoothing"]["noise_block"]))
    streams = {
        SELECT: range(n0_blocks) if split == 0 else range(0),
        ESTIMATE: range(int(estimate_blocks[0]), int(estimate_blocks[-1]) + 1),
    }
    return positions, streams
