"""Tests of msscale.smoothing.certificate: the cascade certificate's rule (`split`, the
default, or `paper`), its stage levels, what a stage decides from its bounds, and how counts
files record it (docs/design.md §1.2, §3.2); and the sequential rule's record (§1.5).

Expected values are written out by hand from the design text.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from msscale.smoothing.certificate import (
    CERTIFY,
    DEFAULT_CERTIFICATE,
    DEFER,
    UNDECIDABLE,
    Certificate,
    default_shares,
)
from msscale.smoothing.sequential import SequentialRule, look_schedule
from msscale.smoothing.stats import cascade_certify

# ============================================================================================
# Validation
# ============================================================================================


def test_the_default_is_split_with_default_shares():
    assert Certificate() == DEFAULT_CERTIFICATE == Certificate("split", None)
    assert (DEFAULT_CERTIFICATE.rule, DEFAULT_CERTIFICATE.shares) == ("split", None)


@pytest.mark.parametrize("rule", ["Split", "fixed", "", None, 1])
def test_unknown_rule_is_refused(rule):
    with pytest.raises(ValueError, match="certificate must be one of split, paper"):
        Certificate(rule)


def test_shares_are_for_the_split_rule_only():
    with pytest.raises(ValueError, match="split certificate"):
        Certificate("paper", (1.0,))
    assert Certificate("paper").shares is None


@pytest.mark.parametrize(
    "shares",
    [(), (0.0, 1.0), (-0.5, 1.5), (0.5, 0.5, 0.0), (math.nan, 1.0), (math.inf, 1.0)],
)
def test_shares_must_be_positive(shares):
    with pytest.raises(ValueError, match="positive"):
        Certificate("split", shares)


@pytest.mark.parametrize("shares", [(0.5, 0.4), (0.6, 0.6), (2.0,), (0.5, 0.25, 0.25, 0.1),
                                    (0.5, 0.5 + 1e-5)])
def test_shares_must_sum_to_one(shares):
    with pytest.raises(ValueError, match="sum to 1"):
        Certificate("split", shares)


@pytest.mark.parametrize("shares", [("a", "b"), (None, 1.0), 0.5, [[0.5], [0.5]], ("0.5", "0.5"),
                                    (True, False)])
def test_shares_must_be_numbers(shares):
    with pytest.raises(ValueError):
        Certificate("split", shares)


def test_shares_are_kept_as_a_tuple_of_floats():
    certificate = Certificate("split", [0.25, 0.75])
    assert certificate.shares == (0.25, 0.75)
    assert certificate == Certificate("split", (0.25, 0.75))
    assert hash(certificate) == hash(Certificate("split", (0.25, 0.75)))
    # Within 1e-6 of 1 is accepted (and the levels are normalised, below).
    assert Certificate("split", (0.5, 0.5 + 1e-9)).shares == (0.5, 0.5 + 1e-9)


def test_one_share_per_scale():
    certificate = Certificate("split", (0.5, 0.5))
    for num_stages in (1, 3):
        with pytest.raises(ValueError, match="2 stage shares for .* scales"):
            certificate.stage_levels(0.01, num_stages)
    # The cascade refuses them too, before looking at any count.
    select = np.array([[0, 5], [0, 5], [0, 5]])
    with pytest.raises(ValueError, match="stage shares"):
        cascade_certify(select, select * 10, [0.25, 0.5, 1.0], 0.01, 0.5, certificate)


# ============================================================================================
# Stage levels
# ============================================================================================


def test_default_shares():
    # 4/5 to the largest scale, the other 1/5 evenly; all of alpha for one scale.
    assert default_shares(1) == (1.0,)
    assert default_shares(2) == pytest.approx((0.8, 0.2), rel=1e-15)
    assert default_shares(3) == pytest.approx((0.8, 0.1, 0.1), rel=1e-15)
    assert default_shares(5) == pytest.approx((0.8, 0.05, 0.05, 0.05, 0.05), rel=1e-15)
    for num in range(1, 12):
        assert math.fsum(default_shares(num)) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.3])
def test_paper_levels_are_alpha_over_stage_plus_one(alpha):
    for num in (1, 2, 3, 4):
        assert Certificate("paper").stage_levels(alpha, num) == tuple(
            alpha / (s + 1) for s in range(num))
    # The paper's rule spends more than alpha over its stages (docs/design.md §1.2).
    assert sum(Certificate("paper").stage_levels(alpha, 3)) == pytest.approx(alpha * 11 / 6)


@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.3])
def test_split_levels_are_alpha_times_the_shares(alpha):
    assert Certificate().stage_levels(alpha, 1) == (alpha,)
    assert Certificate().stage_levels(alpha, 2) == pytest.approx((0.8 * alpha, 0.2 * alpha),
                                                                 rel=1e-14)
    assert Certificate().stage_levels(alpha, 3) == pytest.approx(
        (0.8 * alpha, 0.1 * alpha, 0.1 * alpha), rel=1e-14)
    levels = Certificate("split", (0.1, 0.6, 0.3)).stage_levels(alpha, 3)
    assert levels == pytest.approx((0.1 * alpha, 0.6 * alpha, 0.3 * alpha), rel=1e-14)


SHARES = [(1 / 3, 1 / 3, 1 / 3), (0.1,) * 10, (0.2,) * 5, (0.7, 0.2, 0.1), (1 / 7,) * 7,
          (0.6, 0.3, 0.1), (0.5, 0.5 + 1e-9)]


def test_split_levels_never_sum_above_alpha():
    # alpha * share_s in floating point can sum above alpha: (0.1,) * 10 at alpha 0.05 does.
    # The levels are nudged down until their exact (rational) sum, what the union bound
    # needs, is at most alpha, by a few ulps at most. Shares within 1e-6 of summing to 1 are
    # normalised.
    naive = [0.05 * share for share in (0.1,) * 10]
    assert math.fsum(naive) > 0.05
    rng = np.random.default_rng(0)
    alphas = [0.001, 0.01, 0.05, 0.1, 0.2, 0.25, 0.3, 0.4, *rng.uniform(1e-6, 0.49, 200)]
    for shares in SHARES:
        certificate = Certificate("split", shares)
        for alpha in alphas:
            levels = certificate.stage_levels(float(alpha), len(shares))
            assert sum(map(Fraction, levels)) <= Fraction(float(alpha)), (shares, alpha)
            # alpha * share_s, the shares normalised to sum to 1
            assert levels == pytest.approx([alpha * s / math.fsum(shares) for s in shares],
                                           rel=1e-12)
            assert all(level > 0 for level in levels)


# ============================================================================================
# What a stage decides
# ============================================================================================


def test_decide():
    # Certify iff pA_low >= p0 (also exactly p0); the band pA_low < p0 <= pA_high (also
    # pA_high exactly p0) is UNDECIDABLE for the paper's rule and DEFER for split; below,
    # DEFER for both.
    lower = [0.6, 0.4, 0.4, 0.5, 0.3, 0.0]
    upper = [0.9, 0.6, 0.45, 0.7, 0.5, 0.1]
    paper = Certificate("paper").decide(lower, upper, 0.5)
    split = Certificate().decide(lower, upper, 0.5)
    assert paper.tolist() == [CERTIFY, UNDECIDABLE, DEFER, CERTIFY, UNDECIDABLE, DEFER]
    assert split.tolist() == [CERTIFY, DEFER, DEFER, CERTIFY, DEFER, DEFER]
    assert len({CERTIFY, UNDECIDABLE, DEFER}) == 3
    # Scalars in, a 0-d array out; p0 above 1/2.
    assert int(Certificate("paper").decide(0.7, 0.8, 0.75)) == UNDECIDABLE
    assert int(Certificate("split").decide(0.7, 0.8, 0.75)) == DEFER
    assert int(Certificate("split").decide(0.75, 0.8, 0.75)) == CERTIFY
    np.testing.assert_array_equal(Certificate().decide(np.zeros((2, 3)), np.ones((2, 3)), 0.5),
                                  np.full((2, 3), DEFER))


# ============================================================================================
# The record in counts files
# ============================================================================================


@pytest.mark.parametrize(
    "certificate, meta",
    [
        (Certificate(), {"certificate": "split", "stage_shares": None}),
        (Certificate("split", (0.25, 0.75)), {"certificate": "split",
                                              "stage_shares": [0.25, 0.75]}),
        (Certificate("paper"), {"certificate": "paper", "stage_shares": None}),
    ],
)
def test_to_meta_and_back(certificate, meta):
    assert certificate.to_meta() == meta
    written = json.loads(json.dumps({"alpha": 0.001, **certificate.to_meta()}))
    assert Certificate.from_meta(written) == certificate


def test_from_meta_without_the_key_is_the_papers_rule():
    # Counts written before the split rule existed were certified by the paper's rule.
    assert Certificate.from_meta({}) == Certificate("paper")
    assert Certificate.from_meta({"alpha": 0.001, "p0": 0.5}) == Certificate("paper")
    # A split record without shares has the default ones.
    assert Certificate.from_meta({"certificate": "split"}) == Certificate()


@pytest.mark.parametrize(
    "meta",
    [
        {"certificate": "bogus"},
        {"certificate": "split", "stage_shares": "0.5,0.5"},
        {"certificate": "split", "stage_shares": 1.0},
        {"certificate": "split", "stage_shares": [True, False]},
        {"certificate": "split", "stage_shares": ["0.5", "0.5"]},
        {"certificate": "split", "stage_shares": [0.5, 0.4]},
        {"certificate": "paper", "stage_shares": [1.0]},
        {"stage_shares": [0.5, 0.5]},  # no rule recorded: the paper's, which has no shares
    ],
)
def test_from_meta_refuses_bad_records(meta):
    with pytest.raises(ValueError):
        Certificate.from_meta(meta)


def test_from_settings():
    default = {"certificate": "split", "stage_shares": None}
    assert Certificate.from_settings(default) == Certificate()
    assert Certificate.from_settings({"certificate": "split", "stage_shares": [0.6, 0.4]}) == (
        Certificate("split", (0.6, 0.4)))
    assert Certificate.from_settings({"certificate": "paper", "stage_shares": None}) == (
        Certificate("paper"))
    with pytest.raises(ValueError):
        Certificate.from_settings({"certificate": "split", "stage_shares": "0.6,0.4"})


# ============================================================================================
# The sequential rule's record
# ============================================================================================


def test_sequential_rule_meta_round_trip():
    sigmas, alpha, p0 = (0.25, 0.5, 1.0), 0.001, 0.6
    certificate = Certificate("split", (0.5, 0.3, 0.2))
    rule = SequentialRule.from_settings(sigmas, alpha, p0, 10_000, 100, None, 2.0, 0.02,
                                        certificate, "radii", (0.5, 1.0))
    # first_look None is n / 100.
    assert rule.looks == (100, 200, 400, 800, 1600, 3200, 6400, 10_000)
    meta = {**rule.to_meta(), **rule.certificate.to_meta()}
    assert set(rule.to_meta()) == {"looks", "look_weights", "radius_tolerance", "stopping",
                                   "target_radii"}
    meta = json.loads(json.dumps(meta))
    again = SequentialRule.from_meta(meta, sigmas, alpha, p0, Certificate.from_meta(meta))
    assert again == rule
    assert again.certificate == certificate
    assert (again.stopping, again.target_radii, again.radius_tolerance) == ("radii", (0.5, 1.0),
                                                                            0.02)
    assert all(again.level(s, look) == rule.level(s, look)
               for s in range(3) for look in range(len(rule.looks)))


def test_sequential_rule_from_a_file_before_the_stopping_rules():
    # Counts of a sequential run from before `stopping`, `target_radii` and `certificate`
    # were recorded: the tolerance rule, the report's radii, the paper's certificate.
    meta = {"looks": [250, 500, 1000], "look_weights": [0.25, 0.25, 0.5],
            "radius_tolerance": 0.05}
    rule = SequentialRule.from_meta(meta, (0.25, 0.5), 0.01, 0.5, Certificate.from_meta(meta))
    assert (rule.stopping, rule.radius_tolerance) == ("tolerance", 0.05)
    assert rule.target_radii == (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    assert rule.certificate == Certificate("paper")
    assert rule.level(1, 2) == pytest.approx(0.01 / 2 * 0.5, rel=1e-12)


def test_sequential_rule_first_look_defaults_to_a_hundredth_of_n():
    # ceil(250 / 100) = 3 draws, rounded up to a block of 10.
    rule = SequentialRule.from_settings((0.5,), 0.01, 0.5, 250, 10, None, 2.0, 0.0)
    assert rule.looks == look_schedule(250, 10, 3, 2.0) == (10, 20, 40, 80, 160, 250)
    assert (rule.certificate, rule.stopping) == (Certificate(), "tolerance")
    explicit = SequentialRule.from_settings((0.5,), 0.01, 0.5, 250, 10, 100, 2.0, 0.0)
    assert explicit.looks == (100, 200, 250)
