"""The `sequential` schedule through the certify layer: its votes are the first blocks of the
`full` schedule's, counts.npz records the draws used and the look schedule, and `recertify`
reproduces its certificates byte for byte. (The statistics: tests/test_sequential.py; shard
arrays: tests/test_certify_array.py.)"""

import json

import numpy as np
import pytest
import torch
from helpers import certify_config, write_certify_yaml

from msscale.certify.counts import Counts, load_counts, save_counts
from msscale.certify.plan import plan_shard
from msscale.certify.report import certify_counts, evaluations_summary
from msscale.certify.schema import load_certify_config
from msscale.cli import main
from msscale.data.dataset import open_dataset
from msscale.errors import UserError
from msscale.models.loading import build_smoothed_model
from msscale.smoothing.schedules import VoteSampler

# n = 48 in blocks of 16 from a first look at 16: looks at 16, 32 and 48 draws. With these
# settings the tiny test models stop some scales at the first look, and some images defer.
SEQUENTIAL = {"schedule": "sequential", "n": 48, "first_look": 16, "radius_tolerance": 1.0,
              "alpha": 0.1, "p0": 0.9}
LOOKS = [16, 32, 48]


@pytest.fixture(scope="module")
def setup(assets, tmp_path_factory):
    cfg = certify_config(assets, tmp_path_factory.mktemp("sequential"), **SEQUENTIAL)
    model = build_smoothed_model(cfg, torch.device("cpu"))
    dataset = open_dataset(cfg["data"]["shards"])
    images = {i: img for i, img, _ in dataset.iter_images(range(8))}
    return cfg, model, images


def votes(setup, index, **smoothing):
    """{image: (select [K, C], estimate [K, C])} of one sampler over these images."""
    cfg, model, images = setup
    cfg = {**cfg, "smoothing": {**cfg["smoothing"], **smoothing}}
    sampler = VoteSampler(cfg, model, plan_shard(cfg, 100, 0, 1, 1)[1], torch.device("cpu"))
    select, estimate = sampler.votes(index, torch.stack([images[i] for i in index]))
    return {i: (select[r], estimate[r]) for r, i in enumerate(index)}


def test_a_scale_stopped_at_a_look_holds_the_full_schedules_first_draws(setup):
    index = list(range(6))
    sequential = votes(setup, index)
    used = np.array([sequential[i][1].sum(axis=1) for i in index])
    assert set(used.ravel()) <= {0, *LOOKS}
    assert (used[:, -1] > 0).all(), "the largest scale is always sampled"
    assert set(used.ravel()) & {16, 32}, "scales stopped before n"
    assert (used[:, 1] > 0).any(), "some image deferred"
    # The full schedule with n = a look draws the same blocks first: the same votes.
    for look in sorted(set(used.ravel()) - {0}):
        rows = [row for row in range(len(index)) if look in used[row]]
        full = votes(setup, [index[row] for row in rows], schedule="full", n=int(look))
        for row in rows:
            i = index[row]
            for k in np.flatnonzero(used[row] == look):
                np.testing.assert_array_equal(sequential[i][1][k], full[i][1][k])
                np.testing.assert_array_equal(sequential[i][0][k], full[i][0][k])
    # Scales never reached have no votes at all, selection included.
    for row, i in enumerate(index):
        assert (sequential[i][0][used[row] == 0] == 0).all()


def test_sequential_votes_do_not_depend_on_batch_size_or_neighbours(setup):
    reference = votes(setup, [0, 1, 2, 3, 4], batch_size=32)
    for index, batch_size in [([4, 1, 3], 7), ([0], 5)]:
        other = votes(setup, index, batch_size=batch_size)
        for i in index:
            np.testing.assert_array_equal(other[i][0], reference[i][0])
            np.testing.assert_array_equal(other[i][1], reference[i][1])


@pytest.fixture(scope="module")
def certified(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("sequential-e2e")
    cfg = write_certify_yaml(assets, root / "certify.yaml", root / "run", **SEQUENTIAL)
    assert main(["certify", "--cfg", str(cfg)]) == 0
    return root / "run"


def test_counts_record_the_draws_used_and_the_look_schedule(certified):
    counts = load_counts(certified / "counts.npz")
    meta = counts.meta
    assert meta["schedule"] == "sequential" and meta["looks"] == LOOKS
    assert (meta["radius_tolerance"], meta["first_look"], meta["look_growth"]) == (1.0, 16, 2.0)
    assert meta["look_weights"] == pytest.approx([0.25, 0.25, 0.5])
    with np.load(certified / "counts.npz") as raw:
        np.testing.assert_array_equal(raw["used"], counts.estimate.sum(axis=2))
    assert set(counts.used.ravel()) <= {0, *LOOKS}
    summary = json.loads((certified / "summary.json").read_text())
    assert set(summary["methods"]) == {"sequential"}
    evaluations = summary["evaluations_per_image"]
    expected = (counts.select.sum() + counts.used.sum()) / len(counts.index)
    assert evaluations["mean"] == pytest.approx(expected)
    assert evaluations["schedules"] == {"sequential": pytest.approx(expected)}
    assert sum(evaluations["by_scale"].values()) == pytest.approx(expected)
    assert "sequential schedule" in (certified / "report.md").read_text()


def test_recertify_reproduces_the_sequential_certificates_byte_for_byte(certified, tmp_path):
    out = tmp_path / "re.tsv"
    assert main(["recertify", str(certified / "counts.npz"), "--out", str(out)]) == 0
    assert out.read_bytes() == (certified / "certify.tsv").read_bytes()


def test_a_full_run_records_what_the_cascade_would_draw():
    # Image 0: the largest scale certifies (the cascade draws 1 scale); image 1: the larger
    # scales select class 0, which has no estimation votes, so they defer and the smallest
    # decides (3 scales).
    select = np.array([[[0, 5], [0, 5], [0, 5]], [[0, 5], [5, 0], [5, 0]]])
    estimate = np.full((2, 3, 2), [0, 40])
    meta = {"schedule": "full", "n0": 5, "n": 40, "alpha": 0.01, "p0": 0.5}
    counts = Counts(np.arange(2), np.array([1, 1]), np.array([0.25, 0.5, 1.0]), select,
                    estimate, meta)
    certs = certify_counts(counts, 0.01, 0.5)
    assert certs.stage.tolist() == [2, 0]
    evaluations = evaluations_summary(counts, certs)
    assert evaluations["schedules"] == {"full": 3 * 45, "cascade": (1 + 3) * 45 / 2}
    assert evaluations["mean"] == 135 and evaluations["selection"] == 15
    assert evaluations["by_scale"] == {"0.25": 45, "0.5": 45, "1": 45}


def test_counts_files_check_used_against_the_votes(certified, tmp_path):
    counts = load_counts(certified / "counts.npz")
    path = tmp_path / "bad.npz"
    with np.load(certified / "counts.npz") as raw:
        arrays = dict(raw)
    arrays["used"] = arrays["used"] + 1
    np.savez(path, **arrays)
    with pytest.raises(UserError, match="used"):
        load_counts(path)
    # A counts file written before `used` existed gets it from the votes.
    del arrays["used"]
    np.savez(path, **arrays)
    np.testing.assert_array_equal(load_counts(path).used, counts.used)
    save_counts(Counts.empty([0.5], 10, {}), tmp_path / "empty.npz")
    assert load_counts(tmp_path / "empty.npz").used.shape == (0, 1)


def test_sequential_settings_are_checked(assets, tmp_path):
    path = write_certify_yaml(assets, tmp_path / "c.yaml", tmp_path / "run", **SEQUENTIAL)
    with pytest.raises(UserError, match="look_growth"):
        load_certify_config(path, ["smoothing.look_growth=1.0"])
    with pytest.raises(UserError, match="radius_tolerance"):
        load_certify_config(path, ["smoothing.radius_tolerance=-0.1"])
    # Settings only the rule itself can judge are refused on loading, not in a task.
    with pytest.raises(UserError, match="target radii must be ascending"):
        load_certify_config(path, ["smoothing.target_radii=[0.5,0.25]"])
    with pytest.raises(UserError, match="3 stage shares for 2 scales"):
        load_certify_config(path, ["smoothing.sigmas=[0.25,0.5]",
                                   "smoothing.stage_shares=[0.5,0.25,0.25]"])
    with pytest.raises(UserError, match="stage shares must sum to 1"):
        load_certify_config(path, ["smoothing.stage_shares=[0.5,0.25,0.2]"])
    cfg = load_certify_config(path)
    with pytest.raises(UserError, match="sample splits need smoothing.schedule=full"):
        plan_shard(cfg, 6, 0, 2, 2)
