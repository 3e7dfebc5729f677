"""One certification shard: draw the votes of a slice of images (and of sample blocks).

The slice comes from certify/plan.py, the draws from the schedule's sampler
(smoothing/schedules.py). Progress is flushed every `smoothing.flush_every` images to
<out>/counts/<shard>.progress.npz, so a killed or requeued task resumes where it stopped
without redrawing or double-counting a sample.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

import msscale
from msscale.certify.counts import Counts, load_counts, save_counts
from msscale.certify.plan import plan_shard, progress_path, shard_name, shard_path
from msscale.certify.schema import SEQUENTIAL_KEYS
from msscale.data.dataset import chunks
from msscale.errors import UserError
from msscale.smoothing.certificate import Certificate
from msscale.smoothing.sampling import (
    ESTIMATE,
    SELECT,
)
from msscale.smoothing.schedules import VoteSampler, fit_to_denoiser
from msscale.smoothing.sequential import sequential_rule

log = logging.getLogger(__name__)


def shard_meta(cfg, fingerprints, shard_id, num_shards, sample_splits, streams) -> dict:
    """What must agree between shards before they may be merged, plus who this shard is."""
    smoothing = cfg["smoothing"]
    return {
        **(sequential_meta(smoothing) if smoothing["schedule"] == "sequential" else {}),
        **Certificate.from_settings(smoothing).to_meta(),
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
        "images": fingerprints["images"],  # how many the run addresses: the merge's plan
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


def sequential_meta(smoothing: dict) -> dict:
    """The settings and the look schedule of the sequential rule: the certificate reads its
    levels from the recorded looks and weights (docs/design.md §1.5)."""
    return {
        **{key: smoothing[key] for key in SEQUENTIAL_KEYS},
        **sequential_rule(smoothing).to_meta(),
    }


def _resume(path: Path, meta: dict, sigmas, num_classes: int) -> Counts:
    if not path.is_file():
        return Counts.empty(sigmas, num_classes, meta)
    counts = load_counts(path)
    if counts.meta != meta:
        raise UserError(f"{path} was written by another configuration; remove it to start over")
    log.info("resuming %s: %d images already done", path.name, len(counts.index))
    return counts


def stack_images(images, model, device) -> torch.Tensor:
    """Images [3,H,W] as one batch on `device`. Images of several sizes are each resized to
    the UNet's sample size first (what VoteSampler does to a batch), as one tensor cannot
    hold them otherwise; a UNet without a sample size cannot take them."""
    if len({tuple(image.shape) for image in images}) == 1:
        return torch.stack(images)  # the usual case: resized as a batch, on the device
    sizes = sorted({tuple(image.shape[1:]) for image in images})
    if getattr(model.denoiser, "fit", "resize") == "pad":
        raise UserError(f"the images have several sizes ({sizes[0]}, {sizes[1]}, ...) and "
                        "denoiser.fit is pad, which pads a batch of one size: make the shards "
                        "with --image-size, or use denoiser.fit=resize")
    if model.denoiser.unet.config.sample_size is None:
        raise UserError(f"the images have several sizes ({sizes[0]}, {sizes[1]}, ...) and the "
                        "UNet has no sample_size to resize them to: make the shards with "
                        "--image-size")
    return torch.cat([fit_to_denoiser(image[None].to(device), model) for image in images])


def run_shard(cfg: dict, shard_id: int = 0, num_shards: int = 1, sample_splits: int = 1,
              started: Callable[[], None] | None = None) -> Path:
    """Certification sampling of one shard; writes and returns <out>/counts/<shard>.npz.

    The data shards this task reads are checked against their recorded sha256 first;
    `started` is called once data and models are loaded, before the first draw (the run has
    then started for real: `msscale certify` records its config there).
    """
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
    dataset.verify([indices[p] for p in positions])  # once per task, before any draw
    device = resolve_device(cfg["device"])
    fingerprints = {
        "model": model_fingerprint(cfg), "data": dataset.fingerprint(), "device": device.type,
        "images": len(indices),
    }
    meta = shard_meta(cfg, fingerprints, shard_id, num_shards, sample_splits, streams)
    num_classes = cfg["classifier"]["num_classes"]
    counts = _resume(
        progress_path(out, shard_id, num_shards), meta, cfg["smoothing"]["sigmas"], num_classes
    )
    todo = [indices[p] for p in positions[len(counts.index) :]]
    model = prepare_for_inference(build_smoothed_model(cfg, device), cfg)
    if started is not None:
        started()
    sampler = VoteSampler(cfg, model, streams, device)
    with tqdm(
        total=len(positions),
        initial=len(counts.index),
        desc=shard_name(shard_id, num_shards),
        unit="img",
        disable=None,
    ) as bar:
        for chunk in chunks(dataset.iter_images(todo), cfg["smoothing"]["flush_every"]):
            index, images, labels = zip(*chunk, strict=True)
            select, estimate = sampler.votes(list(index), stack_images(images, model, device))
            counts.append(index, labels, select, estimate)
            save_counts(counts, progress_path(out, shard_id, num_shards))
            bar.update(len(index))
            log.info("%s: %d of %d images done", final.name, len(counts.index), len(positions))
    save_counts(counts, final)
    progress_path(out, shard_id, num_shards).unlink(missing_ok=True)
    return final


