"""`msscale bench`, second part: the three sampling schedules side by side on real models.

On the same models and the same `bench.schedule_images` images of `data.shards`, with
`bench.schedule_n` estimation draws (default `smoothing.n`), each schedule draws its votes
with the very sampler `msscale certify` runs and certifies them with the run's `alpha` and
`p0`, as `msscale report` would. Measured per schedule: model evaluations per image (every
selection and estimation draw), seconds per image, and certified accuracy at RADII.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from msscale.bench.sequential import RADII, accuracy_cells, radius_header
from msscale.errors import UserError
from msscale.smoothing.certificate import Certificate

log = logging.getLogger(__name__)

SCHEDULES = ("full", "cascade", "sequential")


def labelled_images(cfg: dict, count: int, model) -> tuple[list[int], torch.Tensor, np.ndarray]:
    """(global indices, images [count, 3, H, W] at the denoiser's size, labels [count])."""
    from msscale.data.dataset import open_dataset, select_indices
    from msscale.smoothing.schedules import fit_to_denoiser

    dataset = open_dataset(cfg["data"]["shards"])
    indices = select_indices(dataset.count, cfg["data"]["skip"], cfg["data"]["max_images"])
    if len(indices) < count:
        raise UserError(f"bench.schedule_images is {count} but {cfg['data']['shards']} gives "
                        f"{len(indices)} images")
    items = list(dataset.iter_images(indices[:count]))
    images = fit_to_denoiser(torch.stack([image for _, image, _ in items]), model)
    return [i for i, _, _ in items], images, np.array([y for _, _, y in items], np.int64)


def _certify(cfg: dict, index, labels, select, estimate) -> dict:
    """Evaluations per image and certified accuracy at RADII, as a run's report has them."""
    from msscale.certify.counts import Counts
    from msscale.certify.report import certify_counts
    from msscale.certify.shard import sequential_meta

    smoothing = cfg["smoothing"]
    meta = {key: smoothing[key] for key in ("schedule", "n0", "n", "alpha", "p0")}
    meta.update(Certificate.from_settings(smoothing).to_meta())
    if smoothing["schedule"] == "sequential":
        meta.update(sequential_meta(smoothing))
    counts = Counts(np.asarray(index, np.int64), labels, np.asarray(smoothing["sigmas"]),
                    select, estimate, meta)
    certs = certify_counts(counts, smoothing["alpha"], smoothing["p0"])
    correct = certs.predict == certs.label
    return {
        "evaluations_per_image": float(counts.evaluations.mean()),
        "certified_accuracy": {f"{r}": float(np.mean(correct & (certs.radius >= r)))
                               for r in RADII},
    }


def compare_schedules(cfg: dict, model, device: torch.device, timed) -> dict:
    """Figures of `full`, `cascade` and `sequential` on the same images (see the module)."""
    from msscale.certify.plan import plan_shard
    from msscale.smoothing.schedules import VoteSampler

    bench = cfg["bench"]
    count = bench["schedule_images"]
    smoothing = {**cfg["smoothing"], "n": bench["schedule_n"] or cfg["smoothing"]["n"]}
    index, images, labels = labelled_images(cfg, count, model)
    images = images.to(device)
    result = {"images": count, "n": smoothing["n"], "n0": smoothing["n0"],
              "alpha": smoothing["alpha"], "p0": smoothing["p0"],
              **Certificate.from_settings(smoothing).to_meta(), "schedules": {}}
    for schedule in SCHEDULES:
        run = {**cfg, "smoothing": {**smoothing, "schedule": schedule}}
        sampler = VoteSampler(run, model, plan_shard(run, count, 0, 1, 1)[1], device)
        log.info("schedules: %s on %d images at n=%d", schedule, count, smoothing["n"])
        seconds, _, (select, estimate) = timed(lambda s=sampler: s.votes(index, images), device)
        figures = _certify(run, index, labels, select, estimate)
        result["schedules"][schedule] = {"seconds_per_image": seconds / count, **figures}
        if schedule == "sequential":
            result["sequential"] = sampler.rule.to_meta()
    return result


def _stopping(rule: dict) -> str:
    """The sequential rule in words: its looks and what stops a scale."""
    stop = (f"deciding radii {rule['target_radii']}" if rule["stopping"] == "radii"
            else f"radius_tolerance {rule['radius_tolerance']}")
    return f"looks {rule['looks']}, {stop}"


def format_schedules(result: dict) -> list[str]:
    """Lines of the schedules table for `msscale bench`'s report."""
    full = result["schedules"]["full"]["evaluations_per_image"]
    lines = [
        f"schedules on {result['images']} images, n0={result['n0']}, n={result['n']}, "
        f"alpha={result['alpha']}, p0={result['p0']}, {result['certificate']} certificate; "
        f"sequential: {_stopping(result['sequential'])}",
        f"{'schedule':12}{'evals/image':>12}{'fewer':>8}{'s/image':>9}   certified accuracy (%)"
        + radius_header(7),
    ]
    for name, row in result["schedules"].items():
        evals = row["evaluations_per_image"]
        lines.append(
            f"{name:12}{evals:>12.0f}{full / evals:>7.2f}x{row['seconds_per_image']:>9.2f}"
            f"{'':25}{accuracy_cells(row, 7)}"
        )
    lines.append("(fewer: how many times fewer model evaluations per image than full)")
    return lines
