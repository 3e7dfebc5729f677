"""The sampling schedules (docs/design.md §2): which (image, scale) pairs get draws.

`full` draws every scale for every image; `cascade` starts at the largest scale and draws
a smaller one only for the images whose cascade defers; `sequential` is the cascade with
each scale's estimation draws taken look by look and stopped early (docs/design.md §1.5).
Whatever the schedule, the draws are the counter-based blocks of sampling.py, so an image's
votes never depend on its neighbours, and a look's votes are those of the first blocks of
the `full` schedule.
"""

from __future__ import annotations

import numpy as np
import torch

from msscale.smoothing.certificate import DEFER, Certificate
from msscale.smoothing.sampling import ESTIMATE, NUM_STREAMS, SELECT, count_votes, plan_blocks
from msscale.smoothing.sequential import run_sequential, sequential_rule
from msscale.smoothing.stats import stage_bounds


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


class VoteSampler:
    """Draws a chunk of images' votes under the `full`, `cascade` or `sequential` schedule."""

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
        self.certificate = Certificate.from_settings(smoothing)
        self.levels = self.certificate.stage_levels(self.alpha, len(self.sigmas))
        self.batch_size, self.noise_block = smoothing["batch_size"], smoothing["noise_block"]
        self.n_draws = {SELECT: smoothing["n0"], ESTIMATE: smoothing["n"]}
        self.num_classes = cfg["classifier"]["num_classes"]
        self.timesteps = [model.denoiser.timestep(s) for s in self.sigmas]
        self.autocast = torch.bfloat16 if cfg["precision"] == "bf16" else None
        self.channels_last, self.fixed_batch = cfg["channels_last"], cfg["compile"]
        if self.schedule == "sequential":
            self.rule = sequential_rule(smoothing)
            if streams[ESTIMATE] != range(-(-self.rule.n // self.noise_block)):
                raise ValueError("a sequential sampler needs all of an image's estimation "
                                 "blocks (sample splits are refused by plan_shard)")

    def votes(self, index: list[int], images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Selection and estimation votes [I, K, C] for these images (global `index`)."""
        images = fit_to_denoiser(images.to(self.device), self.model)
        scales = list(range(len(self.sigmas)))
        if self.schedule == "sequential":
            run = run_sequential(_ModelVotes(self, index, images), len(index), self.rule)
            return run.select, run.estimate
        if self.schedule == "full":
            votes = self._count(list(enumerate(index)), scales, images)
        else:
            votes = self._cascade(index, images)
        return votes[:, :, SELECT], votes[:, :, ESTIMATE]

    def _count(self, rows, scales, images, streams=None) -> np.ndarray:
        streams = self.streams if streams is None else streams
        blocks = plan_blocks(rows, scales, streams, self.n_draws, self.noise_block)
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
        """The cascade moves on iff the certificate's stage defers (docs/design.md §1.2)."""
        c_hat = int(np.argmax(votes_at_scale[SELECT]))
        lower, upper = stage_bounds(votes_at_scale[ESTIMATE], c_hat, self.levels[stage])
        return bool(self.certificate.decide(lower, upper, self.p0) == DEFER)


class _ModelVotes:
    """The sequential rule's CountSource over the model: look l's votes are those of the
    estimation blocks between look l-1's and look l's (looks lie on block boundaries)."""

    def __init__(self, sampler: VoteSampler, index: list[int], images: torch.Tensor):
        self.sampler, self.index, self.images = sampler, index, images
        self.num_classes = sampler.num_classes
        block = sampler.noise_block
        self.look_blocks = [-(-draws // block) for draws in sampler.rule.looks]

    def select(self, rows: np.ndarray, scale: int) -> np.ndarray:
        return self._votes(rows, scale, {SELECT: self.sampler.streams[SELECT]})[:, SELECT]

    def estimate(self, rows: np.ndarray, scale: int, look: int) -> np.ndarray:
        start = self.look_blocks[look - 1] if look else 0
        blocks = range(start, self.look_blocks[look])
        return self._votes(rows, scale, {ESTIMATE: blocks})[:, ESTIMATE]

    def _votes(self, rows: np.ndarray, scale: int, streams: dict) -> np.ndarray:
        pairs = [(int(r), self.index[int(r)]) for r in rows]
        return self.sampler._count(pairs, [scale], self.images, streams)[rows, scale]
