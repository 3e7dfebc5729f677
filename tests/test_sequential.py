"""Tests of msscale.smoothing.sequential: the look schedule, the certificate from stopped
counts, the stopping rule, and soundness whatever the stopping time.

Votes are simulated with numpy (no model): a model with known class probabilities per scale
(a linear classifier's in closed form, or random ones). Expected values come from that ground
truth or from an independent reference of docs/design.md §1.5 written below from the text
alone (it reuses test_stats' reference of the fixed-n bounds and stage levels of design.md
§1.2). The reference covers both certificates (`split`, the default, and `paper`) and both
stopping rules (`tolerance` and `radii`).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from scipy.stats import beta, binom, norm
from test_stats import random_shares, ref_cp_lower, ref_cp_upper, ref_levels, ref_pb_high, ref_top

from msscale.smoothing.certificate import Certificate
from msscale.smoothing.sequential import (
    SequentialRule,
    certify_sequential,
    certify_sequential_table,
    look_schedule,
    look_weights,
    run_sequential,
)
from msscale.smoothing.stats import certify_table

# ============================================================================================
# Independent reference (written from docs/design.md §1.5, not from sequential.py)
# ============================================================================================


def ref_looks(n, block, first, growth):
    """The look schedule: geometric block counts, each look at least one block later."""
    total = math.ceil(n / block)
    blocks = [min(total, math.ceil(first / block))]
    while blocks[-1] < total:
        blocks.append(min(total, max(blocks[-1] + 1, math.ceil(blocks[-1] * growth))))
    return [min(b * block, n) for b in blocks]


def ref_weights(num_looks):
    """Half the level at the last look, the rest shared evenly by the others."""
    if num_looks == 1:
        return [1.0]
    return [0.5 / (num_looks - 1)] * (num_looks - 1) + [0.5]


# The report's radii, the `radii` stopping rule's default targets (docs/design.md §1.5).
REPORT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
# The one-sided level of the `radii` rule's plausible projections.
PLAUSIBLE_LEVEL = 0.05


class Ref:
    """The certificate and the stopping rule of docs/design.md §1.5, one image at a time.

    `rule` is the certificate (`paper` or `split`, with `shares`), `stopping` the stopping
    rule (`tolerance`, with `tol`, or `radii`, with `targets`)."""

    def __init__(self, sigmas, alpha, p0, looks, weights, tol, rule="paper", shares=None,
                 stopping="tolerance", targets=REPORT_RADII):
        self.sigmas, self.alpha, self.p0 = list(sigmas), alpha, p0
        self.looks, self.weights, self.tol = list(looks), list(weights), tol
        self.rule, self.stopping, self.targets = rule, stopping, list(targets)
        self.stage_levels = ref_levels(alpha, len(sigmas), rule, shares)
        self.z_p0 = norm.ppf(p0)

    def level(self, stage, look):
        return self.stage_levels[stage] * self.weights[look]

    def cap(self, estimate, used, c, k, stage):
        """min over larger (deferred) scales j of their off-class terms for class c."""
        r = math.inf
        for j in range(k + 1, len(self.sigmas)):
            pb, _ = ref_pb_high(estimate[j], c, self.level(stage, self.looks.index(used[j])))
            term = -math.inf if pb >= 1.0 else self.sigmas[j] * (self.z_p0 - norm.ppf(pb))
            r = min(r, term)
        return r

    def own(self, lower, k):
        return self.sigmas[k] * (norm.ppf(lower) - self.z_p0)

    def certificate(self, select, estimate, used):
        """(prediction, radius, stage) from stopped counts."""
        num = len(self.sigmas)
        for s in range(num):
            k = num - 1 - s
            assert used[k] in self.looks and sum(estimate[k]) == used[k]
            a = self.level(s, self.looks.index(used[k]))
            c = ref_top(select[k])
            lo = ref_cp_lower(int(estimate[k][c]), used[k], a)
            hi = ref_cp_upper(int(estimate[k][c]), used[k], a)
            if lo >= self.p0:
                r = min(self.own(lo, k), self.cap(estimate, used, c, k, s))
                return (c, float(r), k) if r >= 0 else (-1, 0.0, k)
            if hi >= self.p0 and self.rule == "paper":
                return -1, 0.0, k  # the paper's rule abstains in the band; split defers
        return -1, 0.0, -1

    def bucket(self, radius):
        """How many target radii a radius reaches."""
        return sum(radius >= r for r in self.targets)

    def worth_going_on(self, reach, now):
        if self.stopping == "radii":
            return self.bucket(reach) > self.bucket(now)
        gain = 0.0 if reach == now else reach - now
        return gain >= self.tol

    def off_term(self, upper, k):
        return -math.inf if upper >= 1 else self.sigmas[k] * (self.z_p0 - norm.ppf(upper))

    def stops(self, select_k, counts, k, s, look, estimate, used):
        """(stop?, decision, why) at this look of stage s; decision is what the bounds say
        ("certify", "undecidable" in the band, "defer"), whatever the rule makes of it."""
        n, n_l, last = self.looks[-1], self.looks[look], len(self.looks) - 1
        c = ref_top(select_k)
        x_c = int(counts[c])
        lo = ref_cp_lower(x_c, n_l, self.level(s, look))
        hi = ref_cp_upper(x_c, n_l, self.level(s, look))
        decision = "certify" if lo >= self.p0 else "undecidable" if hi >= self.p0 else "defer"
        if look == last:
            return True, decision, decision + "-last"
        if decision == "certify":
            cap = self.cap(estimate, used, c, k, s)
            now = min(self.own(lo, k), cap)
            if self.stopping == "radii":  # c_hat's share at its plausible (95%) upper bound
                u = ref_cp_upper(x_c, n_l, PLAUSIBLE_LEVEL)
                k_proj = min(n, math.ceil(u * n))
            else:
                k_proj = min(n, math.ceil(x_c * n / n_l))
            reach = min(self.own(ref_cp_lower(k_proj, n, self.level(s, last)), k), cap)
            return not self.worth_going_on(reach, now), decision, "certify-early"
        if decision == "defer":
            if s == len(self.sigmas) - 1:
                return True, decision, "defer-smallest"
            if self.stopping == "radii":
                # The later stage's class is not known yet: its off-class term here is the
                # largest count or the second largest (if it is the top class), each
                # projected at its plausible (95%) lower bound.
                rivals = sorted((int(x) for x in counts), reverse=True)[:2]
                projected = [math.floor(ref_cp_lower(m, n_l, PLAUSIBLE_LEVEL) * n)
                             for m in rivals]
            else:  # the largest class other than c_hat, at its current share
                rivals = [max(int(counts[j]) for j in range(len(counts)) if j != c)]
                projected = [m * n // n_l for m in rivals]
            for m, m_proj in zip(rivals, projected, strict=True):
                t_now = self.off_term(ref_cp_upper(m, n_l, self.level(s + 1, look)), k)
                t_reach = self.off_term(ref_cp_upper(m_proj, n, self.level(s + 1, last)), k)
                if self.worth_going_on(t_reach, t_now):
                    return False, decision, "defer-early"
            return True, decision, "defer-early"
        # The band: go on iff a later look could still end it otherwise.
        for m in range(look + 1, len(self.looks)):
            n_m, a = self.looks[m], self.level(s, m)
            if ref_cp_lower(x_c + n_m - n_l, n_m, a) >= self.p0:
                return False, decision, "undecidable-continue"
            # Only where the band abstains (paper) and a later stage follows does deferring
            # change the outcome.
            if (self.rule == "paper" and s < len(self.sigmas) - 1
                    and ref_cp_upper(x_c, n_m, a) < self.p0):
                return False, decision, "undecidable-continue"
        return True, decision, "abstain-futile" if self.rule == "paper" else "defer-futile"

    def run(self, select, stream):
        """Stop on a stream [K, L, C] of per-look votes; returns (certificate, used, whys)."""
        num = len(self.sigmas)
        estimate = np.zeros((num, stream.shape[2]), np.int64)
        used = [0] * num
        whys = []
        for s in range(num):
            k = num - 1 - s
            for look in range(len(self.looks)):
                estimate[k] += stream[k, look]
                used[k] = self.looks[look]
                stop, decision, why = self.stops(select[k], estimate[k], k, s, look, estimate,
                                                 used)
                if stop:
                    whys.append(why)
                    break
            defers = decision == "defer" or (decision == "undecidable" and self.rule == "split")
            if not defers:
                break
        return self.certificate(select, estimate, used), used, whys


# ============================================================================================
# Simulated votes
# ============================================================================================


class Stream:
    """A CountSource over votes drawn in advance: selection [I, K, C], looks [I, K, L, C]."""

    def __init__(self, select, increments):
        self.selection, self.increments = select, increments
        self.num_classes = select.shape[2]

    def select(self, rows, scale):
        return self.selection[rows, scale]

    def estimate(self, rows, scale, look):
        return self.increments[rows, scale, look]


def draw_stream(rng, probs, n0, looks) -> Stream:
    """Multinomial votes for class probabilities [I, K, C] at the looks of a schedule."""
    steps = np.diff([0, *looks])
    increments = np.stack([rng.multinomial(step, probs) for step in steps], axis=2)
    return Stream(rng.multinomial(n0, probs), increments)


def prefix(stream: Stream, looks_used):
    """Estimation counts [I, K, C] of the first looks_used[i, k] + 1 looks (-1: none)."""
    cumulative = np.cumsum(stream.increments, axis=2)
    out = np.zeros(stream.selection.shape, np.int64)
    for i, k in np.ndindex(*looks_used.shape):
        if looks_used[i, k] >= 0:
            out[i, k] = cumulative[i, k, looks_used[i, k]]
    return out


# ============================================================================================
# 1. The look schedule and the rule's settings
# ============================================================================================


def test_look_schedule_examples():
    assert look_schedule(10_000, 1000, 1000, 2.0) == (1000, 2000, 4000, 8000, 10_000)
    # A partial last block; a first look inside the first block rounds up to it.
    assert look_schedule(10, 4, 1, 2.0) == (4, 8, 10)
    # Growth 1.2 still advances by at least one block: ceil(1.2 b) > b + 1 only from b = 6.
    assert look_schedule(1000, 100, 100, 1.2) == (100, 200, 300, 400, 500, 600, 800, 1000)
    assert look_schedule(500, 100, 10_000, 2.0) == (500,)  # first look beyond n: one look
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, block = int(rng.integers(1, 5000)), int(rng.integers(1, 700))
        first, growth = int(rng.integers(1, 3000)), float(rng.uniform(1.01, 4))
        looks = look_schedule(n, block, first, growth)
        assert list(looks) == ref_looks(n, block, first, growth)
        # Every look is on a block boundary or at n, and the last is n.
        assert looks[-1] == n and all(v % block == 0 for v in looks[:-1])


def test_look_weights_spend_the_level_once():
    for num in range(1, 12):
        weights = look_weights(num)
        assert len(weights) == num and sum(weights) == pytest.approx(1.0, abs=1e-12)
        assert weights == pytest.approx(ref_weights(num))


@pytest.mark.parametrize(
    "change",
    [
        {"looks": (100, 100)}, {"looks": (200, 100)}, {"looks": ()},
        {"weights": (0.5, 0.4)}, {"weights": (1.0,)}, {"weights": (1.5, -0.5)},
        {"radius_tolerance": -0.1}, {"radius_tolerance": math.inf}, {"alpha": 0.6},
        {"p0": 0.3}, {"sigmas": (0.5, 0.25)}, {"stopping": "fast"}, {"stopping": None},
        {"target_radii": ()}, {"target_radii": (0.5, 0.25)}, {"target_radii": (0.5, 0.5)},
        {"target_radii": (-0.25, 0.5)}, {"target_radii": (0.5, math.inf)},
        {"certificate": Certificate("split", (0.2, 0.3, 0.5))},  # three shares, two scales
    ],
)
def test_rule_rejects_bad_settings(change):
    settings = {"sigmas": (0.25, 0.5), "alpha": 0.01, "p0": 0.5, "looks": (100, 200),
                "weights": (0.5, 0.5), "radius_tolerance": 0.05, **change}
    with pytest.raises(ValueError):
        SequentialRule(**settings)


@pytest.mark.parametrize("args", [(0, 10, 10, 2.0), (10, 0, 10, 2.0), (10, 10, 0, 2.0),
                                  (10, 10, 10, 1.0), (10.5, 10, 10, 2.0)])
def test_look_schedule_rejects_bad_settings(args):
    with pytest.raises(ValueError):
        look_schedule(*args)


# ============================================================================================
# 2. The certificate from stopped counts
# ============================================================================================


def random_probs(rng, num_scales, num_classes):
    """Class probabilities per scale: a favourite whose share shrinks at larger scales."""
    favourite = int(rng.integers(num_classes))
    probs = rng.dirichlet(np.full(num_classes, 0.5), size=num_scales)
    for k in range(num_scales):
        lean = rng.uniform(0.0, 1.0) * (1 - k / (num_scales + 1))
        probs[k] = (1 - lean) * probs[k]
        probs[k, favourite] += lean
    return probs


@pytest.mark.parametrize(
    "certificate",
    [Certificate("paper"), Certificate("split"), Certificate("split", (0.2, 0.3, 0.5))],
    ids=["paper", "split", "split-shares"],
)
def test_one_look_is_the_fixed_n_cascade(certificate):
    rng = np.random.default_rng(1)
    sigmas = (0.25, 0.5, 1.0)
    probs = np.stack([random_probs(rng, 3, 6) for _ in range(150)])
    select, estimate = rng.multinomial(30, probs), rng.multinomial(400, probs)
    for alpha, p0 in ((0.001, 0.5), (0.05, 0.6)):
        rule = SequentialRule(sigmas, alpha, p0, (400,), (1.0,), 0.0, certificate)
        got = certify_sequential_table(select, estimate, np.full((150, 3), 400), rule)
        want = certify_table(select, estimate, sigmas, alpha, p0, certificate)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)  # the same numbers, bit for bit
        assert len(set(want[2].tolist())) == 4  # every stage, and -1, occurred


def test_a_later_look_spends_its_own_share_of_the_level():
    # One scale, looks (100, 1000): the bound at look 1 is at alpha/2, at look 2 at alpha/2
    # too (two looks: 1/2 each); with looks (100, 500, 1000) the middle one gets alpha/4.
    alpha = 0.01
    for looks, look, share in (((100, 1000), 1, 0.5), ((100, 500, 1000), 1, 0.25)):
        rule = SequentialRule((0.5,), alpha, 0.5, looks, look_weights(len(looks)))
        draws = looks[look]
        hits = int(0.9 * draws)
        pred, radius, stage = certify_sequential([[0, 9]], [[draws - hits, hits]], [draws], rule)
        assert (pred, stage) == (1, 0)
        assert radius == pytest.approx(0.5 * norm.ppf(ref_cp_lower(hits, draws, alpha * share)))


def test_the_level_is_the_stage_level_times_the_look_weight():
    # Looks (100, 200, 400): weights 1/4, 1/4, 1/2. Stage levels: paper alpha, alpha / 2;
    # split by default 0.8 and 0.2 alpha; split with shares (0.6, 0.4) 0.6 and 0.4 alpha.
    alpha, looks, weights = 0.01, (100, 200, 400), (0.25, 0.25, 0.5)
    for certificate, stage_levels in (
        (Certificate("paper"), (alpha, alpha / 2)),
        (Certificate("split"), (0.8 * alpha, 0.2 * alpha)),
        (Certificate("split", (0.6, 0.4)), (0.6 * alpha, 0.4 * alpha)),
    ):
        rule = SequentialRule((0.25, 0.5), alpha, 0.5, looks, weights, 0.0, certificate)
        for stage, look in np.ndindex(2, 3):
            assert rule.level(stage, look) == pytest.approx(stage_levels[stage] * weights[look],
                                                            rel=1e-12)
    # The default certificate is split.
    assert SequentialRule((0.25, 0.5), alpha, 0.5, looks, weights).level(0, 2) == pytest.approx(
        0.8 * alpha * 0.5, rel=1e-12)


def test_used_must_be_a_look_and_match_the_votes():
    rule = SequentialRule((0.25, 0.5), 0.01, 0.5, (100, 200), (0.5, 0.5))
    select = [[0, 10], [10, 0]]
    with pytest.raises(ValueError, match="not sampled"):  # scale 1 defers into scale 0
        certify_sequential(select, [[0, 0], [5, 95]], [0, 100], rule)
    with pytest.raises(ValueError, match="looks"):
        certify_sequential(select, [[0, 150], [5, 145]], [150, 150], rule)
    with pytest.raises(ValueError, match="looks"):  # votes do not add up to the draws used
        certify_sequential(select, [[0, 100], [5, 90]], [100, 100], rule)
    with pytest.raises(ValueError, match="row 0"):
        certify_sequential_table([select], [[[0, 0], [5, 95]]], [[0, 100]], rule)
    with pytest.raises(ValueError, match="not sampled"):  # estimation votes, no selection
        certify_sequential([[0, 0], [10, 0]], [[0, 100], [5, 95]], [100, 100], rule)
    with pytest.raises(ValueError, match="shape|must be"):
        certify_sequential_table([select], [[[0, 100], [5, 95]]], [[100, 100, 100]], rule)


# ============================================================================================
# 3. The stopping rule against the reference, on random count streams
# ============================================================================================


def random_targets(rng) -> tuple[float, ...]:
    """The report's radii half of the time, else one to four random ascending radii."""
    if rng.uniform() < 0.5:
        return REPORT_RADII
    return tuple(sorted({round(float(r), 3) for r in rng.uniform(0.0, 1.5, rng.integers(1, 5))}))


def random_stream_case(rng, rule="paper", stopping="tolerance"):
    """A random image (K scales, C classes), schedule and settings, and its vote stream; with
    the shares (split) and the target radii (radii) of its Ref (None: not used)."""
    num_scales, num_classes = int(rng.integers(1, 4)), int(rng.integers(2, 9))
    sigmas = tuple(sorted(rng.choice([0.12, 0.25, 0.5, 0.75, 1.0], num_scales, replace=False)))
    n = int(10 ** rng.uniform(2, 3.7))
    looks = look_schedule(n, int(rng.integers(10, 400)), int(rng.integers(10, 300)),
                          float(rng.choice([1.5, 2.0, 3.0])))
    probs = random_probs(rng, num_scales, num_classes)[None]
    if rng.uniform() < 0.3:  # a top class near p0: undecidable and futility stops
        probs[0, :, 0] = 0.5 + rng.uniform(-0.03, 0.03)
        probs[0, :, 1:] = (1 - probs[0, :, :1]) / (num_classes - 1)
    p0 = 0.5 if rng.uniform() < 0.5 else float(rng.uniform(0.5, 0.8))
    alpha = float(10 ** rng.uniform(-4, -1))
    tol = float(rng.choice([0.0, 0.01, 0.05, 0.2, 5.0]))
    shares = random_shares(rng, num_scales) if rule == "split" else None
    targets = random_targets(rng) if stopping == "radii" else REPORT_RADII
    seq = SequentialRule(sigmas, alpha, p0, looks, look_weights(len(looks)), tol,
                         Certificate(rule, shares), stopping, targets)
    ref = Ref(sigmas, alpha, p0, looks, look_weights(len(looks)), tol, rule, shares, stopping,
              targets)
    return seq, ref, draw_stream(rng, probs, int(rng.integers(1, 60)), looks)


@pytest.mark.parametrize("stopping", ["tolerance", "radii"])
@pytest.mark.parametrize("rule", ["paper", "split"])
def test_stopping_rule_and_certificate_match_the_reference(rule, stopping):
    rng = np.random.default_rng(2)
    reasons = Counter()
    for _ in range(150):
        seq, ref, stream = random_stream_case(rng, rule, stopping)
        (pred, radius, stage), used, whys = ref.run(stream.selection[0], stream.increments[0])
        reasons.update(whys)
        run = run_sequential(stream, 1, seq)
        assert run.used[0].tolist() == used, whys
        assert (int(run.predict[0]), int(run.stage[0])) == (pred, stage), whys
        assert run.radius[0] == pytest.approx(radius, rel=1e-9, abs=1e-12), whys
        # The certificate of the stopped counts alone is the run's (what recertify redoes).
        again = certify_sequential(run.select[0], run.estimate[0], run.used[0], seq)
        assert again == (int(run.predict[0]), float(run.radius[0]), int(run.stage[0]))
    futile = "abstain-futile" if rule == "paper" else "defer-futile"
    for why in ("certify-early", "certify-last", "defer-early", "defer-last", "defer-smallest",
                futile, "undecidable-last"):
        assert reasons[why] >= 3, reasons
    # The band's futile stop is the rule's: the paper's abstains, the split rule defers.
    assert ("abstain-futile" in reasons) == (rule == "paper")


def test_images_stop_independently_of_each_other():
    # The same votes run as one batch of 200 images or image by image: the same stops, draws
    # and certificates (the sharding and batching invariant of design.md §2).
    rng = np.random.default_rng(3)
    rule = SequentialRule.from_settings((0.25, 0.5, 1.0), 0.001, 0.5, 2000, 100, 100, 2.0,
                                        0.05)
    probs = np.stack([random_probs(rng, 3, 5) for _ in range(200)])
    stream = draw_stream(rng, probs, 20, rule.looks)
    together = run_sequential(stream, 200, rule)
    for i in range(0, 200, 7):
        alone = run_sequential(Stream(stream.selection[i:i + 1], stream.increments[i:i + 1]), 1,
                               rule)
        for key in ("select", "estimate", "used", "predict", "radius", "stage"):
            np.testing.assert_array_equal(getattr(alone, key)[0], getattr(together, key)[i])
    # The rule did stop early: fewer draws than the cascade's n per reached scale.
    reached = (together.used > 0).sum(axis=1)
    assert together.used.sum() < 0.8 * rule.n * reached.sum()


def test_tolerance_zero_goes_on_while_the_radius_can_grow():
    # An image whose votes all go to its class: its radius grows with every look, so with
    # tolerance 0 it uses all n draws; with a large tolerance it stops at the first look.
    rule = SequentialRule.from_settings((0.5,), 0.001, 0.5, 8000, 1000, 1000, 2.0, 0.0)
    stream = Stream(np.array([[[0, 50]]]), np.array([[[[0, 1000], [0, 1000], [0, 2000],
                                                       [0, 4000]]]]))
    assert run_sequential(stream, 1, rule).used.tolist() == [[8000]]
    eager = SequentialRule(rule.sigmas, rule.alpha, rule.p0, rule.looks, rule.weights, 10.0)
    run = run_sequential(stream, 1, eager)
    assert run.used.tolist() == [[1000]] and run.predict.tolist() == [1]


def test_radii_goes_on_until_the_bucket_is_decided():
    # All votes for the image's class, looks 1000 .. 8000 (weights 1/6, 1/6, 1/6, 1/2): the
    # radius at look l is 0.5 Phi^-1((alpha w_l)^(1/n_l)), 1.19, 1.31, 1.43 and 1.55 at n; the
    # plausible share is 1, so the reachable radius is the last one.
    alpha, n = 0.001, 8000
    stream = Stream(np.array([[[0, 50]]]), np.array([[[[0, 1000], [0, 1000], [0, 2000],
                                                       [0, 4000]]]]))
    radius = [0.5 * norm.ppf((alpha * w) ** (1 / draws))
              for w, draws in ((1 / 6, 1000), (1 / 6, 2000), (1 / 6, 4000), (1 / 2, 8000))]
    for targets, used in (
        ((0.25, 0.5, 1.0), 1000),  # above every target at once
        ((1.25,), 2000),  # 1.19 is below 1.25, 1.55 above: on to 1.31
        ((1.0, 1.5), 8000),  # only n reaches 1.5
        ((0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0), 8000),  # the report's radii (the default)
        ((1.6, 2.0), 1000),  # 1.55 reaches neither: nothing to go on for
    ):
        rule = SequentialRule.from_settings((0.5,), alpha, 0.5, n, 1000, 1000, 2.0, 0.0,
                                            stopping="radii", target_radii=targets)
        assert rule.looks == (1000, 2000, 4000, 8000)
        run = run_sequential(stream, 1, rule)
        assert run.used.tolist() == [[used]], targets
        assert run.predict.tolist() == [1]
        assert run.radius[0] == pytest.approx(radius[rule.looks.index(used)], rel=1e-9)


def test_band_stops_where_no_later_look_can_certify_under_split_only():
    # Scale 1 (stage 0, looks 100 and 110): 85 of 100 for class 1 against p0 = 0.9 is in the
    # band at either rule's level. At 110 draws no outcome certifies (95 of 110 stays below
    # 0.9), but none voting class 1 (85 of 110) would defer. The paper's rule, which abstains
    # in the band, goes on to see whether it defers; the split rule defers either way, so it
    # stops at once. Scale 0 then certifies class 1 with all its votes.
    alpha, p0, looks = 0.01, 0.9, (100, 110)
    select = np.array([[[0, 50], [0, 50]]])
    increments = np.array([[[[0, 100], [0, 10]], [[15, 85], [10, 0]]]])
    # (a_{0,0} = a_{0,1}, a_{1,0}): split by default 0.8 and 0.2 alpha, times the weight 1/2.
    levels = {"paper": (alpha * 0.5, alpha / 2 * 0.5), "split": (0.8 * alpha * 0.5, 0.1 * alpha)}
    for rule_name, used in (("paper", [100, 110]), ("split", [100, 100])):
        a00, a10 = levels[rule_name]
        assert beta.ppf(a00, 85, 16) < p0 <= beta.isf(a00, 86, 15)  # the band
        # a_{0,1} = a00 (equal weights): 95 of 110 cannot certify, 85 of 110 would defer.
        assert beta.ppf(a00, 95, 16) < p0 and beta.isf(a00, 86, 25) < p0
        for stopping in ("tolerance", "radii"):
            rule = SequentialRule((0.25, 0.5), alpha, p0, looks, (0.5, 0.5), 5.0,
                                  Certificate(rule_name), stopping)
            run = run_sequential(Stream(select, increments), 1, rule)
            assert run.used.tolist() == [used], (rule_name, stopping)
            assert (run.predict.tolist(), run.stage.tolist()) == ([1], [0])
            # Stage 1 certifies at a_{1,0} with 100 of 100 votes (the larger scale's
            # off-class term, 15 of 100, does not bind).
            own = 0.25 * (norm.ppf(a10 ** (1 / 100)) - norm.ppf(p0))
            assert run.radius[0] == pytest.approx(own, rel=1e-9)
    # Where a later look can still certify, the split rule goes on in the band too.
    rule = SequentialRule((0.25, 0.5), alpha, p0, (100, 400), (0.5, 0.5), 5.0)
    wide = np.array([[[[0, 100], [0, 300]], [[15, 85], [0, 300]]]])
    assert beta.ppf(0.8 * alpha / 2, 385, 16) >= p0  # 300 more for class 1 certify at 400
    run = run_sequential(Stream(select, wide), 1, rule)
    assert run.used.tolist() == [[0, 400]] and run.stage.tolist() == [1]


# ============================================================================================
# 4. Soundness against ground truth
# ============================================================================================


def linear_probs(rng, num, sigmas, z_high=2.5):
    """A linear binary classifier at distance |z| from x: P[true class] = Phi(|z| / sigma).

    Returns (true class [num], probabilities [num, K, 2], |z| [num]). With one base classifier
    at every scale, the cascade's smoothed classifier keeps the true class within
    |z| - sigma_0 * Phi^-1(p0) of x (scale k votes it with probability >= p0 iff the
    distance to the boundary is >= sigma_k * Phi^-1(p0), and the smallest scale decides
    last).
    """
    y = rng.integers(0, 2, size=num)
    z = rng.uniform(0.0, z_high, size=num)
    p_true = norm.cdf(z[:, None] / np.asarray(sigmas)[None, :])
    probs = np.zeros((num, len(sigmas), 2))
    probs[np.arange(num), :, y] = p_true
    probs[np.arange(num), :, 1 - y] = 1 - p_true
    return y, probs, z


def oracle_radius(probs, pred, stage, sigmas, p0):
    """The radius the certificate's own formula gives at the true probabilities: what its
    intervals claim. A certificate above it rests on an interval that failed."""
    out = np.full(len(pred), -np.inf)
    z_p0 = norm.ppf(p0)
    rows = np.flatnonzero(pred >= 0)
    k, c, sigma = stage[rows], pred[rows], np.asarray(sigmas)
    r = sigma[k] * (norm.ppf(probs[rows, k, c]) - z_p0)
    for j in range(len(sigmas)):  # each larger scale's term, where scale j is above k
        other = probs[rows, j].copy()
        other[np.arange(len(rows)), c] = -np.inf
        term = sigma[j] * (z_p0 - norm.ppf(other.max(axis=1)))
        r = np.where(j > k, np.minimum(r, term), r)
    out[rows] = r
    return out


def violations(run, probs, sigmas, p0):
    """Certificates above the radius their intervals claim at the true probabilities (a
    class whose true share at the certifying scale is below p0 has a negative one)."""
    oracle = oracle_radius(probs, run.predict, run.stage, sigmas, p0)
    # A tiny slack for the floating point of Phi(Phi^-1(p)) at the exact truth.
    return (run.predict >= 0) & (run.radius > oracle + 1e-12)


def test_no_certificate_above_the_true_radius_in_ten_thousand_cases():
    rng = np.random.default_rng(4)
    sigmas = (0.25, 0.5, 1.0)
    total = certified = early = later_stage = 0
    # At p0 = 0.75 images closer to the boundary defer at the larger scales (with the split
    # certificate, the default, also through the band: half of them certify at a smaller
    # scale, whose off-class terms make them the slow ones). Either stopping rule.
    for p0, z_high, num, stopping in ((0.5, 2.5, 8000, "tolerance"), (0.75, 1.2, 2000, "radii")):
        rule = SequentialRule.from_settings(sigmas, 1e-6, p0, 2000, 100, 100, 2.0, 0.05,
                                            stopping=stopping)
        y, probs, z = linear_probs(rng, num, sigmas, z_high)
        run = run_sequential(draw_stream(rng, probs, 50, rule.looks), len(y), rule)
        assert not violations(run, probs, sigmas, p0).any()
        # Against the geometry too: the true class, never beyond |z| - sigma_0 * Phi^-1(p0).
        ok = run.predict >= 0
        assert np.all(run.predict[ok] == y[ok])
        assert np.all(run.radius[ok] <= z[ok] - sigmas[0] * norm.ppf(p0) + 1e-12)
        total += len(y)
        certified += int(ok.sum())
        early += int((ok & (run.used[np.arange(len(y)), run.stage] < rule.n)).sum())
        later_stage += int((ok & (run.stage < 2)).sum())
    assert total >= 10_000
    # Not vacuous: many certificates, many decided before n, many after a deferral.
    assert certified > 0.5 * total and early > 0.2 * total and later_stage > 0.02 * total


def boundary_cases(rng, num, sigmas):
    """Random class probabilities with the top class near p0 = 1/2 at the smallest scale,
    where a bound that ignored its level would often be wrong."""
    probs = np.stack([random_probs(rng, len(sigmas), 4) for _ in range(num)])
    top = np.argmax(probs[:, 0], axis=1)
    rest = probs[:, 0].copy()
    rest[np.arange(num), top] = 0
    share = rng.uniform(0.5, 0.6, size=num)
    rest *= ((1 - share) / np.maximum(rest.sum(axis=1), 1e-12))[:, None]
    rest[np.arange(num), top] = share
    probs[:, 0] = rest
    return probs


def test_violation_rate_is_at_most_alpha_with_the_rule_stopping():
    rng = np.random.default_rng(5)
    alpha, num = 0.05, 3000
    limit = binom.ppf(1 - 1e-4, num, alpha)
    for sigmas in ((0.25, 0.5, 1.0), (0.5,)):
        rule = SequentialRule.from_settings(sigmas, alpha, 0.5, 2000, 100, 100, 2.0, 0.02)
        probs = boundary_cases(rng, num, sigmas)
        run = run_sequential(draw_stream(rng, probs, 50, rule.looks), num, rule)
        bad = int(violations(run, probs, sigmas, 0.5).sum())
        assert bad <= limit, (sigmas, bad, limit)
        assert (run.predict >= 0).sum() > 0.3 * num  # not vacuous
    # Not vacuous either: on the last (one-scale) run's stopped votes, a radius from the
    # observed share alone, without its sampling error, is too large far more often.
    hits = run.estimate[np.arange(num), 0, run.predict]
    naive = 0.5 * norm.ppf(hits / run.used[:, 0])
    oracle = oracle_radius(probs, run.predict, run.stage, (0.5,), 0.5)
    assert int(((run.predict >= 0) & (naive > oracle)).sum()) > 2 * limit


def worst_look_violations(rng, certify_at, num, sigma, looks):
    """For one scale: does *some* look's certificate exceed the truth? (A stopping rule that
    knew the truth would stop there.) certify_at(stream, look) -> (predict, radius)."""
    y, probs, truth = linear_probs(rng, num, (sigma,), z_high=0.4)
    stream = draw_stream(rng, probs, 50, looks)
    bad = np.zeros(num, bool)
    for look in range(len(looks)):
        predict, radius = certify_at(stream, look)
        bad |= (predict >= 0) & ((predict != y) | (radius > truth + 1e-12))
    return int(bad.sum())


def test_any_stopping_time_keeps_the_level_and_a_per_look_level_does_not():
    # The union bound holds for every look at once, so even a stopping rule that chose, with
    # hindsight, the one look whose certificate is wrong, is wrong with probability <= alpha.
    # The same check catches a certificate that spent the full level at every look.
    rng = np.random.default_rng(6)
    alpha, num, sigma = 0.05, 3000, 0.5
    looks = look_schedule(3200, 100, 100, 2.0)  # 100, 200, 400, 800, 1600, 3200
    rule = SequentialRule((sigma,), alpha, 0.5, looks, look_weights(len(looks)))

    def sequential(stream, look):
        used = np.full((num, 1), looks[look])
        pred, radius, _ = certify_sequential_table(stream.selection,
                                                   prefix(stream, np.full((num, 1), look)),
                                                   used, rule)
        return pred, radius

    def fixed_n_at_each_look(stream, look):
        # The fixed-n cascade at the full level (a one-look rule is exactly that, and fast).
        fixed = SequentialRule((sigma,), alpha, 0.5, (looks[look],), (1.0,))
        used = np.full((num, 1), looks[look])
        pred, radius, _ = certify_sequential_table(
            stream.selection, prefix(stream, np.full((num, 1), look)), used, fixed)
        return pred, radius

    limit = binom.ppf(1 - 1e-4, num, alpha)
    assert worst_look_violations(rng, sequential, num, sigma, looks) <= limit
    assert worst_look_violations(rng, fixed_n_at_each_look, num, sigma, looks) > 1.5 * limit
