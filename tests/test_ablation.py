"""`msscale ablate-calibration` (msscale/bench/calibration.py): figures with intervals from
real counts, one fine-tuned setting end to end, and its refusals."""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import binomtest

from msscale.bench.calibration import (
    largest_scale_errors,
    load_ablation_config,
    method_figures,
    paired,
)
from msscale.certify.counts import Counts
from msscale.certify.report import Certificates, certify_counts
from msscale.certify.report import accuracy_interval as interval
from msscale.errors import UserError

SIGMAS = np.array([0.25, 0.5, 1.0])


def test_interval_is_clopper_pearson_and_brackets_the_share():
    low, high = interval(93, 100)
    assert low < 0.93 < high
    exact = binomtest(93, 100).proportion_ci(0.95, method="exact")  # scipy's, independent
    assert (low, high) == pytest.approx((exact.low, exact.high), abs=1e-12)
    assert interval(0, 10)[0] == 0.0 and interval(10, 10)[1] == 1.0


def test_method_figures_count_images_by_radius_abstention_and_stage():
    certs = Certificates(
        index=np.arange(4), label=np.array([0, 1, 2, 3]), predict=np.array([0, 1, -1, 5]),
        radius=np.array([0.3, 1.2, 0.0, 0.9]), stage=np.array([2, 0, -1, 1]), sigmas=SIGMAS)
    figures = method_figures(certs)
    assert figures["certified"] == {"0": 2, "0.25": 2, "0.5": 1, "0.75": 1, "1": 1, "1.5": 0}
    assert figures["abstain"] == 1
    assert figures["stages"] == {"0.25": 1, "0.5": 1, "1": 1, "none": 1}
    assert figures["acr"] == pytest.approx((0.3 + 1.2) / 4)
    assert figures["certified_interval"]["0.5"] == list(interval(1, 4))


def test_largest_scale_errors_split_wrong_images_by_their_vote_share():
    estimate = np.zeros((3, 3, 10), np.int64)
    estimate[:, :, 0] = 100  # the small scales: all right
    estimate[0, 2, :3] = [60, 40, 0]  # label 0, right
    estimate[1, 2, :3] = [10, 70, 20]  # label 0, wrong with 70%: confidently wrong
    estimate[2, 2, :3] = [30, 45, 25]  # label 0, wrong with 45%: the cascade may defer it
    counts = Counts(index=np.arange(3), label=np.zeros(3, np.int64), sigmas=SIGMAS,
                    select=estimate.copy(), estimate=estimate)
    errors = largest_scale_errors(counts, [0.5, 0.7, 0.8])
    assert errors == {"wrong": 2, "confidently_wrong": {"0.5": 1, "0.7": 1, "0.8": 0}}


def test_paired_counts_discordant_images_and_tests_their_split():
    a = np.array([True, True, False, False, True])
    b = np.array([True, False, True, False, False])
    assert paired(a, b) == {"only_a": 2, "only_b": 1, "p_value": pytest.approx(1.0)}
    ten = paired(np.ones(10, bool), np.zeros(10, bool))
    assert ten["p_value"] == pytest.approx(2 * 0.5**10)  # all ten discordant pairs one way
    assert paired(a, a)["p_value"] == 1.0


def test_bad_settings_are_named(tmp_path):
    path = tmp_path / "ablation.yaml"
    path.write_text("settings: {a: [train.max_steps=1], 'b/c': null}\n")
    with pytest.raises(UserError, match="b/c"):
        load_ablation_config(path)
    path.write_text("settings: {a: train.max_steps=1}\n")
    with pytest.raises(UserError, match="settings.a: expected a list"):
        load_ablation_config(path)
    path.write_text("settings: {a: null}\np0s: [0.4]\n")
    with pytest.raises(UserError, match="p0s"):
        load_ablation_config(path)


@pytest.mark.slow
def test_one_fine_tuned_setting_end_to_end(tmp_path):
    """The command as a user runs it, tiny: a pretrained and a fine-tuned setting; the
    figures are those of the counts each setting certified; a changed setting is refused."""
    from msscale.certify.counts import load_counts

    out = tmp_path / "ablation"
    command = [sys.executable, "-m", "msscale", "ablate-calibration",
               "--cfg", "configs/ablate_calibration.yaml", f"out={out}", "images=3", "n0=5",
               "n=20", "shards=1", "p0s=[0.5,0.7]",
               "settings={pretrained: null, tuned: [train.max_steps=2, "
               "calibration.recoverable=votes]}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results] == ["pretrained", "tuned"]
    for result_of in results:
        counts = load_counts(out / result_of["name"] / "certify" / "counts.npz")
        cascade = certify_counts(counts, 0.001, 0.7)
        assert result_of["cascade"]["0.7"] == method_figures(cascade)
        single = certify_counts(counts, 0.001, 0.5, [1.0])
        assert result_of["single"]["1"] == method_figures(single)
        # at r = 0, certified means correct (an abstention is not)
        assert result_of["claims"]["cascade - smallest scale, r=0"] == paired(
            certify_counts(counts, 0.001, 0.5).correct.astype(bool),
            certify_counts(counts, 0.001, 0.5, [0.25]).correct.astype(bool))
    assert (out / "tuned" / "finetune" / "final").is_dir()
    table = (out / "ablation.md").read_text()
    assert table.count("| cascade |") == 2 and "| tuned, p0=0.7 |" in table

    changed = [*command[:-1], "settings={tuned: [train.max_steps=3]}"]
    result = subprocess.run(changed, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "other values" in result.stderr
    assert "Traceback" not in result.stderr
