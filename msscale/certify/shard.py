"""One certification shard: draw the votes of a slice of images (and of sample blocks).

A run is split into `num_shards` tasks: image groups x sample splits. Task t takes image
group t // sample_splits and sample split t % sample_splits; a sample split owns a slice
of the estimation blocks, and split 0 also owns the selection draws. Progress is flushed
every `smoothing.flush_every` images to <out>/counts/<shard>.progress.npz, so a killed or
requeued task resumes where it stopped without redrawing or double-counting a sample.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import msscale
from msscale.certify.counts import Counts, load_counts, save_counts
from msscale.errors import UserError
from msscale.smoothing.sampling import (
    ESTIMATE,
    NUM_STREAMS,
    SELECT,
    block_sizes,
    count_votes,
    plan_blocks,
)
from msscale.smoothing.stats import clopper_pearson_upper

log = logging.getLogger(__name__)


def shard_name(shard_id: int, num_shards: int) -> str:
    return f"shard-{shard_id:05d}-of-{num_shards:05d}"


def shard_path(out: str | Path, shard_id: int, num_shards: int) -> Path:
    return Path(out) / "counts" / f"{shard_name(shard_id, num_shards)}.npz"


def progress_path(out: str | Path, shard_id: int, num_shards: int) -> Path:
    return Path(out) / "counts" / f"{shard_name(shard_id, num_shards)}.progress.npz"


def plan_shard(cfg: dict, num_images: int, shard_id: int, num_shards: int, sample_splits: int):
    """(image positions, {stream: block range}) owned by task `shard_id` of `num_shards`."""
    if num_shards % sample_splits:
        raise UserError(f"{num_shards} shards do not divide into {sample_splits} sample splits")
    if sample_splits > 1 and cfg["smoothing"]["schedule"] != "full":
        raise UserError("sample splits need smoothing.schedule=full (a cascade decides per image)")
    groups = num_shards // sample_splits
    group, split = divmod(shard_id, sample_splits)
    positions = np.array_split(np.arange(num_images), groups)[group]
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


def shard_meta(cfg, fingerprints, shard_id, num_shards, sample_splits, streams) -> dict:
    """What must agree between shards before they may be merged, plus who this shard is."""
    smoothing = cfg["smoothing"]
    return {
        "seed": cfg["seed"],
        "n0": smoothing["n0"],
        "n": smoothing["n"],
        "sigmas": smoothing["sigmas"],
        "schedule": smoothing["schedule"],
        "noise_block": smoothing["noise_block"],
        "alpha": smoothing["alpha"],
        "p0": smoothing["p0"],
        "skip": cfg["data"]["skip"],
        "max_images": cfg["data"]["max_images"],
        "model": fingerprints["model"],
        "data": fingerprints["data"],
        # the same draws give the same votes only with the same arithmetic
        "device": fingerprints["device"],
        "precision": cfg["precision"],
        "channels_last": cfg["channels_last"],
        "compile": cfg["compile"],
        "shard": shard_id,
        "shards": num_shards,
        "sample_splits": sample_splits,
        "select_blocks": [streams[SELECT].start, streams[SELECT].stop],
        "estimate_blocks": [streams[ESTIMATE].start, streams[ESTIMATE].stop],
        "version": msscale.__version__,
    }


def _resume(path: Path, meta: dict, sigmas, num_classes: int) -> Counts:
    if not path.is_file():
        return Counts.empty(sigmas, num_classes, meta)
    counts = load_counts(path)
    if counts.meta != meta:
        raise UserError(f"{path} was written by another configuration; remove it to start over")
    log.info("resuming %s: %d images already done", path.name, len(counts.index))
    return counts


def run_shard(cfg: dict, shard_id: int = 0, num_shards: int = 1, sample_splits: int = 1) -> Path:
    """Certification sampling of one shard; writes and returns <out>/counts/<shard>.npz."""
    from msscale.data.dataset import open_dataset, select_indices
    from msscale.models.loading import (
        build_smoothed_model,
        model_fingerprint,
        prepare_for_inference,
        resolve_device,
    )

    out = Path(cfg["out"])
    final = shard_path(out, shard_id, num_shards)
    if final.is_file():
        log.info("%s is complete; nothing to do", final)
        return final
    dataset = open_dataset(cfg["data"]["shards"])
    indices = select_indices(dataset.count, cfg["data"]["skip"], cfg["data"]["max_images"])
    positions, streams = plan_shard(cfg, len(indices), shard_id, num_shards, sample_splits)
    device = resolve_device(cfg["device"])
    fingerprints = {
        "model": model_fingerprint(cfg), "data": dataset.fingerprint(), "device": device.type
    }
    meta = shard_meta(cfg, fingerprints, shard_id, num_shards, sample_splits, streams)
    num_classes = cfg["classifier"]["num_classes"]
    counts = _resume(
        progress_path(out, shard_id, num_shards), meta, cfg["smoothing"]["sigmas"], num_classes
    )
    todo = [indices[p] for p in positions[len(counts.index) :]]
    model = prepare_for_inference(build_smoothed_model(cfg, device), cfg)
    sampler = ShardSampler(cfg, model, streams, device)
    with tqdm(
        total=len(positions),
        initial=len(counts.index),
        desc=shard_name(shard_id, num_shards),
        unit="img",
        disable=None,
    ) as bar:
        for chunk in chunks(dataset.iter_images(todo), cfg["smoothing"]["flush_every"]):
            index, images, labels = zip(*chunk, strict=True)
            select, estimate = sampler.votes(list(index), torch.stack(images))
            counts.append(index, labels, select, estimate)
            save_counts(counts, progress_path(out, shard_id, num_shards))
            bar.update(len(index))
            log.info("%s: %d of %d images done", final.name, len(counts.index), len(positions))
    save_counts(counts, final)
    progress_path(out, shard_id, num_shards).unlink(missing_ok=True)
    return final


def chunks(items, size: int):
    """Lists of `size` consecutive items (the last may be shorter)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def fit_to_denoiser(images: torch.Tensor, model) -> torch.Tensor:
    """Resize images [B,3,H,W] to the UNet's sample size, if it has one and they differ.

    With denoiser.fit=pad they stay as they are: the denoiser pads the noisy image itself.
    """
    if getattr(model.denoiser, "fit", "resize") == "pad":
        return images
    size = model.denoiser.unet.config.sample_size
    if size is None:
        return images
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    return torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True)


class ShardSampler:
    """Draws a chunk of images' votes under the `full` or `cascade` schedule."""

    def __init__(self, cfg: dict, model, streams: dict, device: torch.device):
        smoothing = cfg["smoothing"]
        self.model, self.streams, self.device = model, streams, device
        self.seed = cfg["seed"]
        self.sigmas = smoothing["sigmas"]
        self.schedule, self.alpha, self.p0 = (
            smoothing["schedule"],
            smoothing["alpha"],
            smoothing["p0"],
        )
        self.batch_size, self.noise_block = smoothing["batch_size"], smoothing["noise_block"]
        self.n_draws = {SELECT: smoothing["n0"], ESTIMATE: smoothing["n"]}
        self.num_classes = cfg["classifier"]["num_classes"]
        self.timesteps = [model.denoiser.timestep(s) for s in self.sigmas]
        self.autocast = torch.bfloat16 if cfg["precision"] == "bf16" else None
        self.channels_last, self.fixed_batch = cfg["channels_last"], cfg["compile"]

    def votes(self, index: list[int], images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Selection and estimation votes [I, K, C] for these images (global `index`)."""
        images = fit_to_denoiser(images.to(self.device), self.model)
        scales = list(range(len(self.sigmas)))
        if self.schedule == "full":
            votes = self._count(list(enumerate(index)), scales, images)
        else:
            votes = self._cascade(index, images)
        return votes[:, :, SELECT], votes[:, :, ESTIMATE]

    def _count(self, rows, scales, images) -> np.ndarray:
        blocks = plan_blocks(rows, scales, self.streams, self.n_draws, self.noise_block)
        return count_votes(
            self.model,
            images,
            blocks,
            self.sigmas,
            self.timesteps,
            self.num_classes,
            seed=self.seed,
            batch_size=self.batch_size,
            autocast_dtype=self.autocast,
            channels_last=self.channels_last,
            fixed_batch=self.fixed_batch,
        )

    def _cascade(self, index, images) -> np.ndarray:
        """Largest scale first; a smaller scale only for images whose cascade defers."""
        votes = np.zeros((len(index), len(self.sigmas), NUM_STREAMS, self.num_classes), np.int64)
        active = list(range(len(index)))
        for stage, scale in enumerate(reversed(range(len(self.sigmas)))):
            if not active:
                break
            rows = [(r, index[r]) for r in active]
            votes += self._count(rows, [scale], images)
            active = [r for r in active if self._defers(votes[r, scale], stage)]
        return votes

    def _defers(self, votes_at_scale: np.ndarray, stage: int) -> bool:
        """The cascade moves on iff the top class is confidently below p0 (DESIGN.md §1, 4)."""
        c_hat = int(np.argmax(votes_at_scale[SELECT]))
        estimate = votes_at_scale[ESTIMATE]
        upper = clopper_pearson_upper(estimate[c_hat], estimate.sum(), self.alpha / (stage + 1))
        return bool(upper < self.p0)
