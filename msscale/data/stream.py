"""The training stream: resampled, shuffled, augmented batches of shards for fine-tuning."""

from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from msscale.data.dataset import decode_sample, existing_shard, open_dataset, read_shard
from msscale.errors import UserError

log = logging.getLogger(__name__)

CROP_PADDING = 2


def make_training_pipeline(
    urls: str | os.PathLike | list[str],
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    world_rank: int,
    world_size: int,
    epoch_length: int,
    random_crop: bool = True,
    flip: bool = True,
    shuffle_buffer: int = 1000,
) -> wds.DataPipeline:
    """An endless, reproducible stream of training batches (images [B,3,S,S], labels [B]).

    urls: a shard URL, a dataset.json (or its directory) or a list of shard paths.
    Shards are drawn with replacement from one stream seeded by `seed` alone; process
    `world_rank` of `world_size` takes every world_size-th draw and a DataLoader worker
    every num_workers-th of those, so processes and workers read disjoint draws. Samples
    pass a shuffle buffer, are decoded to float32 in [0,1], resized to `image_size` if they
    differ, randomly cropped (zero-pad 2, crop back) and flipped when asked, and batched
    (full batches only). Shuffle and augmentation are seeded from (seed, rank, worker).

    One pass over the pipeline yields `epoch_length` batches per worker. Each pass of the
    same object draws new shards; a DataLoader without persistent workers copies the object
    per epoch and would repeat the stream, so build a new pipeline per epoch with a new seed
    (the training loop derives it from the global step, which also makes a resumed run
    continue with a fresh, reproducible stream).

    webdataset 1.0's `WebDataset(resampled=True, seed=...)` ignores the seed when drawing
    shards, hence the explicit DataPipeline with `ResampledShards(deterministic=True)`.
    """
    _check_training_args(batch_size, image_size, seed, world_rank, world_size, epoch_length)
    shard_urls = _training_urls(urls)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(shard_urls, seed=seed, deterministic=True, worker_seed=_no_offset),
        functools.partial(_every_nth, start=world_rank, step=world_size),
        wds.split_by_worker,
        _samples_of_shards,
        functools.partial(_shuffle_in_worker, bufsize=shuffle_buffer, seed=seed, rank=world_rank),
        wds.map(_decode_training_sample),
        functools.partial(
            _augment_in_worker, image_size=image_size, random_crop=random_crop, flip=flip,
            seed=seed, rank=world_rank,
        ),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )
    return pipeline.with_epoch(epoch_length)


def _check_training_args(batch_size, image_size, seed, world_rank, world_size, epoch_length):
    for name, value in (("batch_size", batch_size), ("image_size", image_size),
                        ("epoch_length", epoch_length), ("world_size", world_size)):
        if int(value) < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if not 0 <= world_rank < world_size:
        raise UserError(f"world_rank {world_rank} is outside 0..{world_size - 1}")
    if int(seed) < 0:
        raise UserError(f"seed must be non-negative, got {seed}")


def _training_urls(urls: str | os.PathLike | list[str]) -> list[str]:
    if isinstance(urls, (list, tuple)):
        return [str(existing_shard(Path(u))) for u in urls]
    return [str(p) for p in open_dataset(urls).shards]


def _no_offset() -> int:
    """Worker seed for ResampledShards: 0 everywhere, so all processes share one draw stream."""
    return 0


def _every_nth(src: Iterable, *, start: int, step: int) -> Iterator:
    """Items start, start+step, ... of src: this process's share of the shard draws."""
    for n, item in enumerate(src):
        if n % step == start:
            yield item


def _samples_of_shards(src: Iterable[dict]) -> Iterator[dict]:
    """The raw samples of each drawn shard ({"url": path} items), read with `read_shard`."""
    for item in src:
        for _, sample in read_shard(Path(item["url"])):
            yield sample


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


def _stream_seed(seed: int, rank: int, stage: int) -> int:
    """A seed for one (seed, rank, DataLoader worker, stage) stream."""
    return int(np.random.SeedSequence([int(seed), rank, _worker_id(), stage]).generate_state(1)[0])


def _shuffle_in_worker(src: Iterable, *, bufsize: int, seed: int, rank: int) -> Iterator:
    """webdataset's shuffle buffer, seeded per process and worker when iteration starts."""
    rng = random.Random(_stream_seed(seed, rank, stage=1))
    return wds.shuffle(bufsize, rng=rng)(src)


def _decode_training_sample(sample: dict) -> tuple[torch.Tensor, int]:
    return decode_sample(sample, sample.get("__url__", "?"), sample["__key__"])


def _augment_in_worker(
    src: Iterable, *, image_size: int, random_crop: bool, flip: bool, seed: int, rank: int
) -> Iterator[tuple[torch.Tensor, int]]:
    """Resize to image_size if needed, then random crop and flip, seeded per worker."""
    generator = torch.Generator().manual_seed(_stream_seed(seed, rank, stage=2))
    for image, label in src:
        yield _augment(image, image_size, random_crop, flip, generator), label


def _augment(
    image: torch.Tensor, size: int, random_crop: bool, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    if tuple(image.shape[1:]) != (size, size):
        image = F.interpolate(image[None], size=(size, size), mode="bilinear",
                              antialias=True, align_corners=False)[0].clamp(0, 1)
    if random_crop:
        padded = F.pad(image, (CROP_PADDING,) * 4)
        top, left = torch.randint(0, 2 * CROP_PADDING + 1, (2,), generator=generator).tolist()
        image = padded[:, top:top + size, left:left + size]
    if flip and torch.rand((), generator=generator) < 0.5:
        image = image.flip(-1)
    return image.contiguous()


def _collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([image for image, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return images, labels


def seed_for(*numbers: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (seed, step, rank, ...)."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


class TrainStream:
    """Micro-batches from the resampled shard stream, re-seeded from the step at each pass.

    A resumed run therefore continues with a fresh, reproducible stream rather than
    replaying the batches it already trained on.
    """

    def __init__(self, cfg: dict, batch_size: int, rank: int, world_size: int):
        from msscale.data.dataset import open_dataset

        self.cfg, self.batch_size, self.rank, self.world_size = cfg, batch_size, rank, world_size
        self.urls = [str(p) for p in open_dataset(cfg["data"]["train_shards"]).shards]
        self.iterator = None

    def next(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(2):
            if self.iterator is None:
                self.iterator = iter(self._loader(step))
            try:
                return next(self.iterator)
            except StopIteration:
                self.iterator = None
        raise UserError(f"data.train_shards {self.cfg['data']['train_shards']} yields no batch "
                        f"of {self.batch_size} images")

    def _loader(self, step: int):
        from msscale.data.stream import make_training_pipeline

        data = self.cfg["data"]
        pipeline = make_training_pipeline(
            self.urls, batch_size=self.batch_size, image_size=data["image_size"],
            seed=seed_for(self.cfg["seed"], step), world_rank=self.rank,
            world_size=self.world_size, epoch_length=data["epoch_length"],
            random_crop=data["random_crop"], flip=data["flip"],
            shuffle_buffer=data["shuffle_buffer"],
        )
        if data["num_workers"] == 0:
            return pipeline
        return torch.utils.data.DataLoader(pipeline, batch_size=None,
                                           num_workers=data["num_workers"])
