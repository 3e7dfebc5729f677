"""Counter-based noise and vote counting (docs/design.md §2).

The draws of one image at one scale and one stream are cut into blocks of `noise_block`
draws. Block b's noise comes from a generator seeded from (seed, image index, scale index,
stream, b) alone and always has the same length, so an image's votes never depend on batch
size, on the other images in the run, or on how the work was split or resumed.

Batches are filled across images, scales and streams; votes are counted on the device with
one bincount per batch. A draw whose logits are not all finite votes for no class: it is
counted apart, and any such draw makes the whole call a NonFiniteLogits error (argmax would
otherwise make a NaN model vote for class 0 on every draw, and certify it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from msscale.errors import UserError

# Noise streams: certification's selection and estimation draws, and `predict`'s own.
SELECT, ESTIMATE, PREDICT = 0, 1, 2
NUM_STREAMS = 3


def noise_seed(seed: int, image: int, scale: int, stream: int, block: int) -> int:
    """A 63-bit generator seed from the five counters (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([seed, image, scale, stream, block]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def block_sizes(total: int, noise_block: int) -> list[int]:
    """Draw counts of the blocks that make up `total` draws (the last one may be short)."""
    full, rest = divmod(total, noise_block)
    return [noise_block] * full + ([rest] if rest else [])


class NonFiniteLogits(UserError):
    """The model gave non-finite logits for some draws; they cannot vote, so nothing counts.

    `count` draws of `total` were not finite; the first (lowest image index, then scale)
    affected image is `image` at `sigma`, with `at_image` of its draws there.
    """

    def __init__(self, count: int, total: int, image: int, sigma: float, at_image: int):
        self.count, self.total, self.image, self.sigma = count, total, image, sigma
        super().__init__(
            f"the model gave non-finite logits (NaN or inf) for {count} of {total} draws, "
            f"first at image {image}, sigma {sigma:g} ({at_image} draws there); such draws "
            "cannot vote, so nothing was counted: check the denoiser and classifier weights "
            "(a diverged fine-tune?) and classifier.mean/std"
        )


@dataclass(frozen=True)
class Block:
    """One block of draws: which image (row in the chunk), scale, stream, and how many."""

    row: int  # position of the image in the chunk being sampled
    image: int  # global image index (part of the noise counter)
    scale: int
    stream: int
    block: int
    count: int


def plan_blocks(
    rows_and_images: list[tuple[int, int]],
    scales: list[int],
    streams: dict[int, range],
    n_draws: dict[int, int],
    noise_block: int,
) -> list[Block]:
    """The blocks to draw for these images, scales and streams.

    `streams` maps a stream to the range of its block indices this worker owns;
    `n_draws` maps a stream to its total draws (n0 or n), which fixes each block's length.
    """
    blocks = []
    for row, image in rows_and_images:
        for scale in scales:
            for stream, block_range in streams.items():
                sizes = block_sizes(n_draws[stream], noise_block)
                for b in block_range:
                    blocks.append(Block(row, image, scale, stream, b, sizes[b]))
    return blocks


def _draw_noise(block: Block, seed: int, shape: tuple, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device)
    generator.manual_seed(noise_seed(seed, block.image, block.scale, block.stream, block.block))
    return torch.randn((block.count, *shape), generator=generator, device=device)


def _batches(
    blocks: list[Block], batch_size: int, seed: int, shape: tuple, device: torch.device
) -> Iterator[list[tuple[Block, torch.Tensor]]]:
    """Cut the blocks' draws into batches of `batch_size` (pieces of blocks, in order)."""
    batch, filled = [], 0
    for block in blocks:
        noise = _draw_noise(block, seed, shape, device)
        start = 0
        while start < block.count:
            take = min(block.count - start, batch_size - filled)
            batch.append((block, noise[start : start + take]))
            filled += take
            start += take
            if filled == batch_size:
                yield batch
                batch, filled = [], 0
    if batch:
        yield batch


@torch.inference_mode()
def count_votes(
    model: torch.nn.Module,
    images: torch.Tensor,
    blocks: list[Block],
    sigmas: list[float],
    timesteps: list[int],
    num_classes: int,
    *,
    seed: int,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    fixed_batch: bool = False,
    progress=None,
) -> np.ndarray:
    """Votes [rows, K, NUM_STREAMS, C] of F(D_sigma(x + sigma*delta)) for the planned blocks.

    `images` [rows, 3, H, W] on the model's device; `timesteps[k]` is the denoiser's t for
    sigmas[k]. `channels_last` hands the model channels_last inputs; `fixed_batch` pads the
    last batch to `batch_size` (a compiled model then sees one shape). `progress` (a tqdm
    bar or None) is advanced by the draws done. Draws with non-finite logits are counted in
    an extra slot past the classes; if there are any, NonFiniteLogits is raised.
    """
    device = images.device
    rows, num_scales = images.shape[0], len(sigmas)
    slots = num_classes + 1  # the last slot counts the draws that may not vote
    size = rows * num_scales * NUM_STREAMS * slots
    votes = torch.zeros(size, dtype=torch.int64, device=device)
    sigma_of = torch.tensor(sigmas, dtype=images.dtype, device=device)
    t_of = torch.tensor(timesteps, dtype=torch.long, device=device)
    for batch in _batches(blocks, batch_size, seed, tuple(images.shape[1:]), device):
        row = torch.cat([_fill(b.row, len(n), device) for b, n in batch])
        scale = torch.cat([_fill(b.scale, len(n), device) for b, n in batch])
        stream = torch.cat([_fill(b.stream, len(n), device) for b, n in batch])
        noise = torch.cat([n for _, n in batch])
        noisy = images[row] + sigma_of[scale].view(-1, 1, 1, 1) * noise
        timesteps = t_of[scale]
        if fixed_batch and len(row) < batch_size:
            noisy, timesteps = _pad(noisy, batch_size), _pad(timesteps, batch_size)
        if channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(noisy, timesteps)
        logits = logits[: len(row)]
        finite = torch.isfinite(logits).all(dim=1)
        predicted = torch.where(finite, logits.argmax(dim=1), num_classes)
        bucket = ((row * num_scales + scale) * NUM_STREAMS + stream) * slots + predicted
        votes += torch.bincount(bucket, minlength=votes.numel())
        if progress is not None:
            progress.update(len(row))
    votes = votes.view(rows, num_scales, NUM_STREAMS, slots).cpu().numpy()
    _refuse_non_finite(votes[..., num_classes], blocks, sigmas)
    return votes[..., :num_classes]


def _refuse_non_finite(bad: np.ndarray, blocks: list[Block], sigmas: list[float]) -> None:
    """NonFiniteLogits if any draw of `bad` [rows, K, NUM_STREAMS] was not finite."""
    if not bad.any():
        return
    image_of = {b.row: b.image for b in blocks}
    per_scale = bad.sum(axis=2)  # [rows, K]
    row, scale = min(zip(*np.nonzero(per_scale), strict=True),
                     key=lambda rs: (image_of[int(rs[0])], int(rs[1])))
    raise NonFiniteLogits(
        count=int(bad.sum()),
        total=sum(b.count for b in blocks),
        image=image_of[int(row)],
        sigma=float(sigmas[int(scale)]),
        at_image=int(per_scale[row, scale]),
    )


def _fill(value: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.full((length,), value, dtype=torch.long, device=device)


def _pad(batch: torch.Tensor, length: int) -> torch.Tensor:
    """`batch` followed by copies of its first item, `length` items in all."""
    extra = batch[:1].expand(length - len(batch), *batch.shape[1:])
    return torch.cat([batch, extra])
