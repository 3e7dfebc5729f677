"""Counter-based noise: an image's votes never depend on batching, neighbours or splits."""

import numpy as np
import pytest
import torch
from helpers import certify_config

from msscale.certify.plan import plan_shard
from msscale.data.dataset import open_dataset
from msscale.models.loading import build_smoothed_model
from msscale.smoothing.sampling import ESTIMATE, SELECT, block_sizes, noise_seed
from msscale.smoothing.schedules import VoteSampler


def test_noise_seeds_are_distinct_across_every_counter():
    seeds = {
        noise_seed(s, i, k, st, b)
        for s in range(3)
        for i in range(20)
        for k in range(3)
        for st in range(2)
        for b in range(5)
    }
    assert len(seeds) == 3 * 20 * 3 * 2 * 5


def test_block_sizes_cover_the_draws():
    assert block_sizes(10, 4) == [4, 4, 2]
    assert block_sizes(8, 4) == [4, 4]
    assert sum(block_sizes(10_000, 1000)) == 10_000


@pytest.fixture(scope="module")
def setup(assets, tmp_path_factory):
    cfg = certify_config(assets, tmp_path_factory.mktemp("sampling"))
    model = build_smoothed_model(cfg, torch.device("cpu"))
    dataset = open_dataset(cfg["data"]["shards"])
    images = {i: img for i, img, _ in dataset.iter_images(range(8))}
    return cfg, model, images


def _votes(cfg, model, images, index, streams=None, **smoothing):
    cfg = {**cfg, "smoothing": {**cfg["smoothing"], **smoothing}}
    if streams is None:
        streams = plan_shard(cfg, 100, 0, 1, 1)[1]
    sampler = VoteSampler(cfg, model, streams, torch.device("cpu"))
    select, estimate = sampler.votes(index, torch.stack([images[i] for i in index]))
    return {i: (select[r], estimate[r]) for r, i in enumerate(index)}


def test_votes_do_not_depend_on_batch_size_order_or_neighbours(setup):
    cfg, model, images = setup
    reference = _votes(cfg, model, images, [0, 1, 2, 3], batch_size=32)
    assert all(s.sum() == 3 * 10 and e.sum() == 3 * 40 for s, e in reference.values())
    for index, batch_size in [([3, 1, 0, 2], 7), ([2], 5), ([5, 1, 6, 3], 128), ([4], 3)]:
        other = _votes(cfg, model, images, index, batch_size=batch_size)
        for i in set(index) & set(reference):
            np.testing.assert_array_equal(other[i][0], reference[i][0])
            np.testing.assert_array_equal(other[i][1], reference[i][1])


def test_another_seed_draws_other_noise(setup):
    cfg, model, images = setup
    a = _votes(cfg, model, images, [0, 1, 2, 3])
    b = _votes({**cfg, "seed": cfg["seed"] + 1}, model, images, [0, 1, 2, 3])
    assert any(not np.array_equal(a[i][1], b[i][1]) for i in a)


def test_sample_splits_add_up_to_the_unsplit_votes(setup):
    cfg, model, images = setup
    whole = _votes(cfg, model, images, [0, 1])
    parts = []
    for split in range(3):
        streams = plan_shard(cfg, 2, split, 3, 3)[1]
        parts.append(_votes(cfg, model, images, [0, 1], streams=streams))
    for i in (0, 1):
        np.testing.assert_array_equal(sum(p[i][0] for p in parts), whole[i][0])
        np.testing.assert_array_equal(sum(p[i][1] for p in parts), whole[i][1])
    assert parts[1][0][0].sum() == 0, "only the first sample split draws the selection stream"


def test_cascade_schedule_samples_a_subset_of_the_full_votes(setup):
    cfg, model, images = setup
    index = [0, 1, 2, 3, 4, 5]
    full = _votes(cfg, model, images, index)
    cascade = _votes(cfg, model, images, index, schedule="cascade")
    for i in index:
        sampled = cascade[i][1].sum(axis=1) > 0
        assert sampled[-1], "the largest scale is always sampled"
        np.testing.assert_array_equal(cascade[i][1][sampled], full[i][1][sampled])
        np.testing.assert_array_equal(cascade[i][0][sampled], full[i][0][sampled])
        # a sampled scale below an unsampled one would mean the cascade skipped a stage
        assert list(sampled) == sorted(sampled)


def test_streams_are_independent_draws(setup):
    """Selection and estimation use different counters, so their draws differ."""
    assert noise_seed(7, 0, 0, SELECT, 0) != noise_seed(7, 0, 0, ESTIMATE, 0)
