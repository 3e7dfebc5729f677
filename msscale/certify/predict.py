"""`msscale predict`: the cascade's prediction without a certificate (docs/design.md §1.3).

For clean-accuracy and distribution-shift evaluations: a small number of draws per scale
(`--n`, e.g. 200), the plain threshold rule (from the largest scale down, the first scale
whose top class holds a share >= p0 decides; otherwise the smallest scale's top class),
and beside it Cohen's binomial-test PREDICT per scale (-1 = abstain at level alpha).
The draws come from a noise stream of their own, never shared with certification.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from msscale.atomic import atomic_write_text
from msscale.errors import UserError
from msscale.smoothing.sampling import PREDICT, block_sizes, count_votes, plan_blocks
from msscale.smoothing.stats import cascade_predict, cohen_predict

log = logging.getLogger(__name__)


def predict_votes(cfg: dict, model, index: list[int], images: torch.Tensor, n: int) -> np.ndarray:
    """Votes [I, K, C] of n draws per image and scale from the prediction stream."""
    smoothing = cfg["smoothing"]
    sigmas = smoothing["sigmas"]
    streams = {PREDICT: range(len(block_sizes(n, smoothing["noise_block"])))}
    blocks = plan_blocks(list(enumerate(index)), list(range(len(sigmas))), streams,
                         {PREDICT: n}, smoothing["noise_block"])
    timesteps = [model.denoiser.timestep(s) for s in sigmas]
    votes = count_votes(model, images, blocks, sigmas, timesteps,
                        cfg["classifier"]["num_classes"], seed=cfg["seed"],
                        batch_size=smoothing["batch_size"])
    return votes[:, :, PREDICT]


def run_predict(cfg: dict, n: int) -> dict:
    """Predict every addressed image; writes <out>/predict.tsv and <out>/predict.json."""
    from msscale.certify.shard import stack_images
    from msscale.data.dataset import chunks, open_dataset, select_indices
    from msscale.models.loading import build_smoothed_model, resolve_device
    from msscale.paths import output_dir
    from msscale.smoothing.schedules import fit_to_denoiser

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"--n must be a positive number of draws, got {n!r}")
    out, smoothing = output_dir(cfg["out"], "out"), cfg["smoothing"]
    dataset = open_dataset(cfg["data"]["shards"])
    indices = select_indices(dataset.count, cfg["data"]["skip"], cfg["data"]["max_images"])
    dataset.verify(indices)
    model = build_smoothed_model(cfg, resolve_device(cfg["device"]))
    device = next(model.parameters()).device
    rows = []
    with tqdm(total=len(indices), desc="predict", unit="img", disable=None) as bar:
        for chunk in chunks(dataset.iter_images(indices), smoothing["flush_every"]):
            index, images, labels = zip(*chunk, strict=True)
            images = fit_to_denoiser(stack_images(images, model, device).to(device), model)
            for i, label, votes in zip(index, labels, predict_votes(cfg, model, list(index),
                                                                    images, n), strict=True):
                cascade, stage = cascade_predict(votes, smoothing["p0"])
                cohen = [cohen_predict(v, smoothing["alpha"]) for v in votes]
                rows.append((i, label, cascade, stage, *cohen))
            bar.update(len(index))
    return _write(out, rows, smoothing, n)


def _write(out: Path, rows: list[tuple], smoothing: dict, n: int) -> dict:
    names = [f"cohen_{s:g}" for s in smoothing["sigmas"]]
    lines = ["\t".join(["idx", "label", "predict", "stage", "correct", *names])]
    for i, label, cascade, stage, *cohen in rows:
        cells = [i, label, cascade, stage, int(cascade == label), *cohen]
        lines.append("\t".join(str(c) for c in cells))
    atomic_write_text(out / "predict.tsv", "\n".join(lines) + "\n")
    table = np.array([r[2:3] + r[4:] for r in rows]).reshape(len(rows), -1)
    labels = np.array([r[1] for r in rows])
    accuracy = {name: float(np.mean(table[:, j] == labels))
                for j, name in enumerate(["cascade", *names])}
    summary = {"images": len(rows), "n": n, "p0": smoothing["p0"], "alpha": smoothing["alpha"],
               "accuracy": accuracy,
               "abstain": {name: float(np.mean(table[:, j + 1] == -1))
                           for j, name in enumerate(names)}}
    atomic_write_text(out / "predict.json", json.dumps(summary, indent=2) + "\n")
    log.info("predict accuracy over %d images: %s", len(rows),
             ", ".join(f"{k} {100 * v:.1f}%" for k, v in accuracy.items()))
    return summary
