"""Tests of msscale.smoothing.stats: bounds, Cohen's CERTIFY/PREDICT, the multi-scale cascade.

Expected values come from ground truth (a linear classifier whose smoothed probabilities and
robust radius are known in closed form), from formulas written out in the test, or from an
independent reference implementation of docs/design.md §1.2 written below from the text alone.
The cascade has two certificates: `split` (the default) and `paper`; a test about one of them
names it.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import beta, binom, chi2, norm

from msscale.smoothing.certificate import Certificate
from msscale.smoothing.stats import (
    cascade_certify,
    cascade_predict,
    certify_table,
    clopper_pearson_lower,
    clopper_pearson_upper,
    cohen_certify,
    cohen_predict,
    floor_decimals,
    off_class_bins,
    off_class_upper_bound,
)

# ============================================================================================
# Independent reference (written from docs/design.md §1.2, not from msscale/smoothing/stats.py)
# ============================================================================================


def ref_cp_lower(k: int, n: int, a: float) -> float:
    """One-sided Clopper-Pearson lower bound: the a-quantile of Beta(k, n - k + 1)."""
    return 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))


def ref_cp_upper(k: int, n: int, a: float) -> float:
    """One-sided Clopper-Pearson upper bound: the (1-a)-quantile of Beta(k + 1, n - k)."""
    return 1.0 if k == n else float(beta.ppf(1.0 - a, k + 1, n - k))


def ref_goodman_upper(cells: list[int], level: float) -> list[float]:
    """Upper ends of Goodman's (1965) simultaneous intervals for multinomial proportions.

    With N draws in k cells and A the upper level/k quantile of chi-square with 1 degree of
    freedom, cell i's interval is [A + 2 n_i -+ sqrt(A (A + 4 n_i (N - n_i) / N))] / (2 (N + A)).
    """
    total = sum(cells)
    a = float(chi2.ppf(1.0 - level / len(cells), df=1))
    return [
        (a + 2 * ni + math.sqrt(a * (a + 4 * ni * (total - ni) / total))) / (2 * (total + a))
        for ni in cells
    ]


def ref_top(counts) -> int:
    """argmax with ties going to the lowest class index."""
    best = 0
    for c in range(1, len(counts)):
        if counts[c] > counts[best]:
            best = c
    return best


def ref_bins(counts, c_hat: int) -> list[int]:
    """The design's binning: c_hat's count first, then >= 5 classes and pools of small ones."""
    rest = sorted((-int(counts[c]), c) for c in range(len(counts)) if c != c_hat)
    cells = [int(counts[c_hat])]
    pool = 0
    for neg, _ in rest:
        cnt = -neg
        if cnt >= 5:
            cells.append(cnt)
        else:
            pool += cnt
            if pool >= 5:
                cells.append(pool)
                pool = 0
    if pool:
        if len(cells) >= 2:
            cells[-1] += pool
        else:
            cells.append(pool)
    return cells


def ref_pb_high(counts, c_hat: int, a: float) -> tuple[float, str]:
    """pB_high of the design and which path computed it ("goodman" or "cp")."""
    cells = ref_bins(counts, c_hat)
    total = int(sum(counts))
    if len(cells) >= 3:
        return min(1.0, max(ref_goodman_upper(cells, 2 * a)[1:])), "goodman"
    return ref_cp_upper(total - int(counts[c_hat]), total, a), "cp"


def ref_levels(alpha: float, num_stages: int, rule: str = "paper", shares=None) -> list[float]:
    """The level of stage s = 0 .. K-1 (largest scale first): `paper` alpha / (s + 1);
    `split` alpha * share_s, by default 4/5 to the largest scale and the rest evenly."""
    if rule == "paper":
        return [alpha / (s + 1) for s in range(num_stages)]
    if shares is None:
        shares = [1.0] if num_stages == 1 else [0.8] + [0.2 / (num_stages - 1)] * (num_stages - 1)
    assert len(shares) == num_stages
    return [alpha * share for share in shares]


def ref_cascade(select, estimate, sigmas, alpha, p0, rule="paper", shares=None):
    """The cascade step by step as docs/design.md §1.2 words it: (pred, radius, stage, why).

    `paper` abstains in the undecidable band; `split` defers there, and then `why` starts
    with "after-band:"."""
    num = len(sigmas)
    levels = ref_levels(alpha, num, rule, shares)
    band = ""
    for s in range(num):
        k = num - 1 - s
        a_s = levels[s]
        c = ref_top(select[k])
        n_a = int(estimate[k][c])
        n = int(sum(estimate[k]))
        lo, hi = ref_cp_lower(n_a, n, a_s), ref_cp_upper(n_a, n, a_s)
        if lo >= p0:
            r = sigmas[k] * (norm.ppf(lo) - norm.ppf(p0))
            why = "own"
            for j in range(k + 1, num):
                pb, path = ref_pb_high(estimate[j], c, a_s)
                term = -math.inf if pb >= 1.0 else sigmas[j] * (norm.ppf(p0) - norm.ppf(pb))
                if term < r:
                    r, why = term, "offclass-" + path
            if r < 0:
                return -1, 0.0, k, band + "negative-" + why
            return c, float(r), k, band + "certified-" + why
        if hi >= p0:
            if rule == "paper":
                return -1, 0.0, k, "undecidable"
            band = "after-band:"
    return -1, 0.0, -1, band + "all-defer"


def test_reference_goodman_matches_its_definition_on_a_textbook_case():
    # Sanity of the reference itself: with one cell holding everything its interval must reach
    # 1, and a zero cell's interval is [0, A / (N + A)].
    up = ref_goodman_upper([0, 100, 0], 0.1)
    a = chi2.ppf(1 - 0.1 / 3, df=1)
    assert up[1] == pytest.approx(1.0)
    assert up[0] == pytest.approx(a / (100 + a))


# ============================================================================================
# 1. Soundness against ground truth: a linear classifier
# ============================================================================================


def linear_cases(rng, num: int, z_low: float, z_high: float):
    """Random linear binary classifiers f(x) = [w.x + b > 0] and points x.

    Returns (true class, P[f = 1 under noise], true robust radius, sigma) per case. The offset
    b is chosen so that |w.x + b| / (sigma ||w||) is uniform in [z_low, z_high].
    """
    d = 8
    w = rng.normal(size=(num, d))
    x = rng.uniform(0.0, 1.0, size=(num, d))
    sigma = rng.choice([0.12, 0.25, 0.5, 1.0], size=num)
    norm_w = np.linalg.norm(w, axis=1)
    z = rng.uniform(z_low, z_high, size=num) * rng.choice([-1.0, 1.0], size=num)
    b = z * sigma * norm_w - np.einsum("ij,ij->i", w, x)
    margin = np.einsum("ij,ij->i", w, x) + b
    true_class = (margin > 0).astype(int)
    p_one = norm.cdf(margin / (sigma * norm_w))
    true_radius = np.abs(margin) / norm_w
    return true_class, p_one, true_radius, sigma


def draw_binary_counts(rng, p_one, draws: int) -> np.ndarray:
    """[num, 2] vote counts of classes 0 and 1 for `draws` noisy evaluations each."""
    ones = rng.binomial(draws, p_one)
    return np.stack([draws - ones, ones], axis=1)


def test_linear_ground_truth_formulas_hold():
    # The closed forms the soundness tests rely on, checked by simulating f under noise.
    rng = np.random.default_rng(0)
    w, b, sigma = np.array([0.6, -0.8, 0.3]), 0.1, 0.5
    x = np.array([0.5, 0.2, 0.4])
    margin = w @ x + b
    noisy = x + sigma * rng.normal(size=(200_000, 3))
    frequency = np.mean(noisy @ w + b > 0)
    assert frequency == pytest.approx(norm.cdf(margin / (sigma * np.linalg.norm(w))), abs=4e-3)
    # The closest point of the other class lies at distance |margin| / ||w||.
    radius = abs(margin) / np.linalg.norm(w)
    step = -np.sign(margin) * w / np.linalg.norm(w)
    assert (w @ (x + 0.999 * radius * step) + b > 0) == (margin > 0)
    assert (w @ (x + 1.001 * radius * step) + b > 0) != (margin > 0)


def certify_linear(rng, num, n0, n, alpha, z_low, z_high):
    """Certify random linear cases with cohen_certify and the K=1 cascade."""
    true_class, p_one, true_radius, sigma = linear_cases(rng, num, z_low, z_high)
    select = draw_binary_counts(rng, p_one, n0)
    estimate = draw_binary_counts(rng, p_one, n)
    cohen = [cohen_certify(select[i], estimate[i], sigma[i], alpha) for i in range(num)]
    cascade = [
        cascade_certify(select[i][None], estimate[i][None], [sigma[i]], alpha, 0.5)
        for i in range(num)
    ]
    return true_class, true_radius, cohen, cascade


def count_violations(results, true_class, true_radius) -> int:
    """Certificates that are wrong: another class than the truth, or a too large radius."""
    bad = 0
    for (pred, radius, *_), y, r_true in zip(results, true_class, true_radius, strict=True):
        if pred != -1 and (pred != y or radius > r_true):
            bad += 1
    return bad


def test_certified_radius_never_exceeds_true_radius_at_small_alpha():
    # At alpha = 1e-6 a sound certificate is wrong in any of these 1500 cases with
    # probability <= 0.15%; the seed is fixed, so the check is deterministic.
    rng = np.random.default_rng(1)
    for n in (100, 10_000):
        true_class, true_radius, cohen, cascade = certify_linear(
            rng, 750, 100, n, 1e-6, 0.0, 3.0
        )
        assert count_violations(cohen, true_class, true_radius) == 0
        assert count_violations(cascade, true_class, true_radius) == 0
        assert sum(pred != -1 for pred, *_ in cohen) > 100  # the check is not vacuous


def test_violation_rate_is_at_most_alpha():
    # A one-sided (1-alpha) bound is wrong with probability <= alpha per case. With 3000 cases
    # at alpha = 0.05 a sound bound gives <= 150 on average; the threshold leaves the 1e-4
    # upper tail, while a bound at level 2*alpha (a one-/two-sided mix-up) gives ~300.
    rng = np.random.default_rng(2)
    num, alpha = 3000, 0.05
    # pA near 1/2 .. 0.9, where Clopper-Pearson's discreteness costs little coverage.
    true_class, true_radius, cohen, cascade = certify_linear(rng, num, 1000, 1000, alpha, 0.0,
                                                             1.3)
    limit = binom.ppf(1 - 1e-4, num, alpha)
    bad_cohen = count_violations(cohen, true_class, true_radius)
    assert bad_cohen <= limit
    assert count_violations(cascade, true_class, true_radius) == bad_cohen
    # Not vacuous: a bound that ignores the sampling error (pA_low = nA / n) is wrong about
    # half of the time, far above the limit.
    assert bad_cohen > 0.2 * num * alpha


def test_certified_radius_approaches_true_radius_as_n_grows():
    rng = np.random.default_rng(3)
    ratios = []
    for n in (100, 1000, 10_000, 100_000):
        true_class, true_radius, cohen, cascade = certify_linear(
            rng, 300, 100, n, 0.001, 0.5, 2.5
        )
        ratio = [r / t if p != -1 else 0.0 for (p, r), t in zip(cohen, true_radius, strict=True)]
        for (pred, radius), (c_pred, c_radius, _) in zip(cohen, cascade, strict=True):
            assert c_pred == pred and c_radius == pytest.approx(radius, rel=1e-12, abs=1e-15)
        ratios.append(float(np.mean(ratio)))
    assert all(a < b for a, b in zip(ratios, ratios[1:], strict=False)), ratios
    assert ratios[0] < 0.7
    assert 0.93 < ratios[-1] <= 1.0


# ============================================================================================
# Clopper-Pearson bounds
# ============================================================================================


def test_clopper_pearson_closed_forms_and_edges():
    # Closed forms: k = n gives lower = alpha^(1/n); k = 0 gives upper = 1 - alpha^(1/n).
    alpha = 0.01
    assert clopper_pearson_lower(20, 20, alpha) == pytest.approx(alpha ** (1 / 20))
    assert clopper_pearson_upper(0, 20, alpha) == pytest.approx(1 - alpha ** (1 / 20))
    assert clopper_pearson_lower(0, 20, alpha) == 0.0
    assert clopper_pearson_upper(20, 20, alpha) == 1.0
    # One-sided: the lower bound is the alpha-quantile of Beta(k, n-k+1).
    assert clopper_pearson_lower(7, 20, alpha) == pytest.approx(beta.ppf(alpha, 7, 14))
    assert clopper_pearson_upper(7, 20, alpha) == pytest.approx(beta.ppf(1 - alpha, 8, 13))


def test_clopper_pearson_is_vectorised():
    k = np.array([0, 3, 10, 10])
    n = np.array([10, 10, 10, 20])
    low = clopper_pearson_lower(k, n, 0.05)
    up = clopper_pearson_upper(k, n, 0.05)
    assert low.shape == up.shape == (4,)
    for i in range(4):
        assert low[i] == pytest.approx(ref_cp_lower(k[i], n[i], 0.05))
        assert up[i] == pytest.approx(ref_cp_upper(k[i], n[i], 0.05))
    assert np.all(low < k / n + 1e-12) and np.all(up > k / n - 1e-12)


@pytest.mark.parametrize(
    "k, n, alpha",
    [(-1, 10, 0.05), (11, 10, 0.05), (0, 0, 0.05), (2.5, 10, 0.05), (5, 10, 0.0),
     (5, 10, 0.5), (5, 10, "0.05")],
)
def test_clopper_pearson_rejects_bad_input(k, n, alpha):
    with pytest.raises(ValueError):
        clopper_pearson_lower(k, n, alpha)


# ============================================================================================
# 2. The cascade's branches on hand-made tables
# ============================================================================================

SIGMAS = [0.25, 0.5]
# The split rule's default shares for two scales are (4/5, 1/5).
PAPER, SPLIT = Certificate("paper"), Certificate("split")
# A test that decides at stage 1 of two scales after a confident deferral holds for both
# rules, at stage 1's level alpha * share: 1/2 (paper) or 1/5 (split).
BOTH = pytest.mark.parametrize("certificate, share", [(PAPER, 1 / 2), (SPLIT, 1 / 5)],
                               ids=["paper", "split"])
EITHER = pytest.mark.parametrize("certificate", [PAPER, SPLIT], ids=["paper", "split"])


def table(*rows):
    return np.array(rows, dtype=np.int64)


@pytest.mark.parametrize(
    "certificate, share",
    [(PAPER, 1.0), (SPLIT, 0.8), (Certificate("split", (0.3, 0.7)), 0.3), (None, 0.8)],
    ids=["paper", "split", "split-0.3", "default"],
)
def test_certify_at_largest_scale_without_touching_unsampled_smaller_scale(certificate, share):
    alpha, n = 0.001, 1000
    select = table([0, 0, 0], [0, 100, 0])  # scale 0 was not sampled
    estimate = table([0, 0, 0], [0, n, 0])
    kwargs = {} if certificate is None else {"certificate": certificate}
    pred, radius, stage = cascade_certify(select, estimate, SIGMAS, alpha, **kwargs)
    # Stage 0's level is alpha (paper) or alpha * share_0 (split, by default 4/5); with all n
    # votes pA_low = level^(1/n).
    assert (pred, stage) == (1, 1)
    assert radius == pytest.approx(0.5 * norm.ppf((alpha * share) ** (1 / n)), rel=1e-9)


@BOTH
def test_defer_then_certify_with_own_term_binding(certificate, share):
    alpha, p0 = 0.001, 0.5
    # Scale 1 is spread over 10 classes (top share 0.1): it defers confidently.
    select = table([0, 0, 90, 10, 0, 0, 0, 0, 0, 0], [10] * 10)
    estimate = table([50, 50, 700, 50, 50, 25, 25, 25, 25, 0], [100] * 10)
    pred, radius, stage = cascade_certify(select, estimate, SIGMAS, alpha, p0, certificate)
    a1 = alpha * share  # stage 1
    own = 0.25 * norm.ppf(beta.ppf(a1, 700, 301))
    # Scale 1 bins: c_hat's 100 and nine bins of 100 -> Goodman with k = 10 at level 2*a1.
    off = 0.5 * -norm.ppf(ref_goodman_upper([100] * 10, 2 * a1)[1])
    assert own < off  # this case is about the own term binding
    assert (pred, stage) == (2, 0)
    assert radius == pytest.approx(own, rel=1e-9)


@BOTH
def test_off_class_bound_of_larger_scale_binds(certificate, share):
    alpha, p0 = 0.001, 0.5
    select = table([0, 0, 100], [0, 50, 50])
    # Scale 1: selection picks class 1, whose estimate 350/1000 is confidently below 1/2.
    estimate = table([0, 2, 998], [300, 350, 350])
    pred, radius, stage = cascade_certify(select, estimate, SIGMAS, alpha, p0, certificate)
    a1 = alpha * share
    own = 0.25 * (norm.ppf(beta.ppf(a1, 998, 3)) - norm.ppf(p0))
    # Off-class bins for c_hat = 2 at scale 1: [350 (c_hat), 350, 300], k = 3.
    up = ref_goodman_upper([350, 350, 300], 2 * a1)[1]
    off = 0.5 * (norm.ppf(p0) - norm.ppf(up))
    assert off < own
    assert (pred, stage) == (2, 0)
    assert radius == pytest.approx(off, rel=1e-9)


@BOTH
def test_larger_scale_with_one_other_class_uses_clopper_pearson(certificate, share):
    alpha, p0 = 0.001, 0.7
    select = table([0, 0, 100], [0, 0, 100])
    # Scale 1 agrees with class 2 but only at 600/1000 < p0: it defers.
    estimate = table([0, 5, 995], [0, 400, 600])
    pred, radius, stage = cascade_certify(select, estimate, SIGMAS, alpha, p0, certificate)
    a1 = alpha * share
    own = 0.25 * (norm.ppf(beta.ppf(a1, 995, 6)) - norm.ppf(p0))
    # Bins [600, 400] (the empty class adds nothing): 2 bins -> CP upper of 400 of 1000.
    off = 0.5 * (norm.ppf(p0) - norm.ppf(beta.ppf(1 - a1, 401, 600)))
    assert (pred, stage) == (2, 0)
    assert radius == pytest.approx(min(own, off), rel=1e-9)
    assert off < own


def test_paper_undecidable_abstains_at_that_scale():
    select = table([0, 100], [0, 100])
    estimate = table([0, 1000], [480, 520])  # pA_low < 1/2 <= pA_high at scale 1
    assert cascade_certify(select, estimate, SIGMAS, 0.001, 0.5, PAPER) == (-1, 0.0, 1)
    # The split rule defers through the band; scale 0 then certifies class 1 on its own
    # votes, but scale 1's other class (480 of 1000, upper bound above 1/2) makes R < 0:
    # abstain at scale 0.
    assert cascade_certify(select, estimate, SIGMAS, 0.001, 0.5, SPLIT) == (-1, 0.0, 0)


@pytest.mark.parametrize("shares", [None, (0.9, 0.1)])
def test_split_defers_through_the_band_and_certifies_at_the_smaller_scale(shares):
    alpha, p0 = 0.001, 0.7
    select = table([0, 100, 0], [0, 100, 0])
    # Scale 1: 700 of 1000 for class 1, inside the band at p0 = 0.7 (at either rule's level).
    # Default shares (4/5, 1/5), or (0.9, 0.1).
    estimate = table([0, 1000, 0], [290, 700, 10])
    certificate = Certificate("split", shares)
    a0, a1 = (0.8 * alpha, 0.2 * alpha) if shares is None else (0.9 * alpha, 0.1 * alpha)
    assert beta.ppf(a0, 700, 301) < p0 <= beta.ppf(1 - a0, 701, 300)
    pred, radius, stage = cascade_certify(select, estimate, SIGMAS, alpha, p0, certificate)
    # Stage 1 at alpha * share_1: all 1000 votes give pA_low = a1^(1/1000); scale 1's off-class
    # bins for class 1 are [700, 290, 10]: Goodman, k = 3 at level 2 * a1, for the 290.
    own = 0.25 * (norm.ppf(a1 ** (1 / 1000)) - norm.ppf(p0))
    off = 0.5 * (norm.ppf(p0) - norm.ppf(ref_goodman_upper([700, 290, 10], 2 * a1)[1]))
    assert 0 < off < own  # the larger scale's cap binds
    assert (pred, stage) == (1, 0)
    assert radius == pytest.approx(off, rel=1e-9)
    # The default certificate is split; the paper's rule abstains in the band at scale 1.
    if shares is None:
        assert cascade_certify(select, estimate, SIGMAS, alpha, p0) == (pred, radius, stage)
    assert cascade_certify(select, estimate, SIGMAS, alpha, p0, PAPER) == (-1, 0.0, 1)


def test_split_band_at_the_smallest_scale_abstains_with_stage_minus_one():
    band = table([480, 520])  # pA_low < 1/2 <= pA_high
    assert cascade_certify(table([0, 100]), band, [0.5], 0.001, 0.5, SPLIT) == (-1, 0.0, -1)
    assert cascade_certify(table([0, 100]), band, [0.5], 0.001, 0.5, PAPER) == (-1, 0.0, 0)
    # Every scale in the band: the split rule defers through all of them.
    select, estimate = table([0, 100], [0, 100]), table([480, 520], [480, 520])
    assert cascade_certify(select, estimate, SIGMAS, 0.001, 0.5, SPLIT) == (-1, 0.0, -1)
    assert cascade_certify(select, estimate, SIGMAS, 0.001, 0.5, PAPER) == (-1, 0.0, 1)


@EITHER
def test_all_scales_defer(certificate):
    select = table([100, 0, 0], [100, 0, 0])
    estimate = table([400, 300, 300], [400, 300, 300])
    assert cascade_certify(select, estimate, SIGMAS, 0.001, 0.5, certificate) == (-1, 0.0, -1)


@EITHER
def test_p0_above_half_shifts_the_radius(certificate):
    # One scale: level alpha under both rules.
    alpha, p0 = 0.001, 0.8
    select, estimate = table([0, 100]), table([50, 950])
    pred, radius, stage = cascade_certify(select, estimate, [0.5], alpha, p0, certificate)
    expected = 0.5 * (norm.ppf(beta.ppf(alpha, 950, 51)) - norm.ppf(p0))
    assert (pred, stage) == (1, 0)
    assert radius == pytest.approx(expected, rel=1e-9)
    # 750 of 1000 against p0 = 0.76: below p0 but not confidently -> undecidable (paper:
    # abstain at this scale; split: defer past the last one). 600 of 1000 against 0.8:
    # confidently below (yet above 1/2, where Cohen would certify) -> defer past the last scale.
    band_stage = 0 if certificate.rule == "paper" else -1
    assert cascade_certify(table([0, 100]), table([250, 750]), [0.5], alpha, 0.76,
                           certificate) == (-1, 0.0, band_stage)
    assert cascade_certify(table([0, 100]), table([400, 600]), [0.5], alpha, p0,
                           certificate) == (-1, 0.0, -1)


@EITHER
def test_negative_radius_abstains_at_the_certifying_scale(certificate):
    # Scale 1 deferred (its c_hat 0 had no votes), but its votes all go to class 1: the bound on
    # "not c_hat" there is 1 (n_chat = 0, 2 bins -> CP upper of n out of n), Phi^-1 = inf.
    select = table([100, 0], [100, 0])
    estimate = table([1000, 0], [0, 1000])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no nan / divide warnings on the way
        assert off_class_upper_bound(estimate[1], 0, 0.0005) == 1.0
        assert cascade_certify(select, estimate, SIGMAS, 0.001, 0.5, certificate) == (-1, 0.0, 0)


def deferring_scale(n: int) -> tuple[list[int], list[int]]:
    """(select, estimate) of a larger scale that defers and never binds for class 1.

    Its selection picks class 0, which has no estimation votes (pA_high small: defer); all its
    votes are for class 1, so the bound on "not class 1" there is tiny.
    """
    return [10, 0], [0, n]


def test_paper_alpha_is_split_by_stage():
    # nA_m = the smallest count (out of n) whose lower bound at alpha/m reaches 1/2: a count
    # that certifies at stage s must fail at stage s+1, where the level is smaller.
    alpha, n = 0.01, 1000

    def smallest_certifying(a):
        return next(k for k in range(n + 1) if beta.ppf(a, k, n - k + 1) >= 0.5)

    k1, k2, k3 = (smallest_certifying(alpha / m) for m in (1, 2, 3))
    assert k1 < k2 < k3
    sel_big, est_big = deferring_scale(n)
    sigmas3 = [0.25, 0.5, 1.0]
    for k, certifying_stage in ((k1, 0), (k2, 1), (k3, 2)):
        for num_scales in (1, 2, 3):
            select = table([0, 10], *[sel_big] * (num_scales - 1))
            estimate = table([n - k, k], *[est_big] * (num_scales - 1))
            pred, radius, stage = cascade_certify(select, estimate, sigmas3[:num_scales], alpha,
                                                  0.5, PAPER)
            assert stage == 0  # the larger scales deferred
            stage_s = num_scales - 1  # the smallest scale runs at stage K-1
            if stage_s <= certifying_stage:
                assert pred == 1 and radius >= 0.0
            else:  # pA_low < 1/2 <= pA_high at this level: undecidable
                assert (pred, radius) == (-1, 0.0)


def test_split_alpha_follows_the_shares():
    # The same with the split rule's default shares: the smallest scale runs at alpha (one
    # scale), alpha / 5 (two: 4/5, 1/5) or alpha / 10 (three: 4/5, 1/10, 1/10). A count short
    # of its level is in the band there, which defers: stage -1.
    alpha, n = 0.01, 1000

    def smallest_certifying(a):
        return next(k for k in range(n + 1) if beta.ppf(a, k, n - k + 1) >= 0.5)

    counts = {m: smallest_certifying(alpha / m) for m in (1, 5, 10)}
    assert counts[1] < counts[5] < counts[10]
    sel_big, est_big = deferring_scale(n)
    sigmas3 = [0.25, 0.5, 1.0]
    for num_scales, divisor in ((1, 1), (2, 5), (3, 10)):
        for m, k in counts.items():
            select = table([0, 10], *[sel_big] * (num_scales - 1))
            estimate = table([n - k, k], *[est_big] * (num_scales - 1))
            got = cascade_certify(select, estimate, sigmas3[:num_scales], alpha, 0.5, SPLIT)
            if m >= divisor:  # its level alpha / divisor is at least alpha / m
                assert got[0] == 1 and got[1] >= 0.0 and got[2] == 0
            else:
                assert got == (-1, 0.0, -1)


@pytest.mark.parametrize(
    "certificate, levels",
    [
        (PAPER, (1, 1 / 2, 1 / 3)),  # the smallest scale's level with K = 1, 2, 3 scales
        (SPLIT, (1, 1 / 5, 1 / 10)),
        (None, (1, 1 / 5, 1 / 10)),  # the default: split
    ],
    ids=["paper", "split", "default"],
)
def test_stage_level_sets_the_radius(certificate, levels):
    alpha, n = 0.01, 1000
    sel_big, est_big = deferring_scale(n)
    sigmas3 = [0.25, 0.5, 1.0]
    kwargs = {} if certificate is None else {"certificate": certificate}
    for num_scales in (1, 2, 3):
        a_s = alpha * levels[num_scales - 1]
        for hits in (900, n):
            select = table([0, 10], *[sel_big] * (num_scales - 1))
            estimate = table([n - hits, hits], *[est_big] * (num_scales - 1))
            pred, radius, stage = cascade_certify(select, estimate, sigmas3[:num_scales], alpha,
                                                  **kwargs)
            # All n votes: pA_low = a_s^(1/n).
            low = a_s ** (1 / n) if hits == n else beta.ppf(a_s, hits, n - hits + 1)
            own = 0.25 * norm.ppf(low)
            # Larger scales: bins [n (class 1)] only, so CP upper of 0 of n = 1 - a_s^(1/n).
            offs = [s * -norm.ppf(1 - a_s ** (1 / n)) for s in sigmas3[1:num_scales]]
            assert (pred, stage) == (1, 0)
            assert radius == pytest.approx(min([own, *offs]), rel=1e-9)


def test_split_shares_set_the_stage_levels():
    # Shares (0.6, 0.3, 0.1): the smallest of three scales certifies at alpha / 10 and the
    # middle one at 0.3 alpha, each with all n of its votes (the larger scales defer, and their
    # off-class terms, at sigma 0.5 or 1 with the same level, do not bind).
    alpha, n = 0.01, 1000
    sel_big, est_big = deferring_scale(n)
    certificate = Certificate("split", (0.6, 0.3, 0.1))
    sigmas3 = [0.25, 0.5, 1.0]
    for stage_index, level, sigma in ((0, 0.1 * alpha, 0.25), (1, 0.3 * alpha, 0.5)):
        select = [[0, 10], sel_big, sel_big]
        estimate = [[0, n], est_big, est_big]
        if stage_index == 1:
            select[:2], estimate[:2] = [[0, 0], [0, 10]], [[0, 0], [0, n]]  # 0 never sampled
        pred, radius, stage = cascade_certify(table(*select), table(*estimate), sigmas3, alpha,
                                              0.5, certificate)
        assert (pred, stage) == (1, stage_index)
        assert radius == pytest.approx(sigma * norm.ppf(level ** (1 / n)), rel=1e-9)


@EITHER
def test_k1_with_half_threshold_is_cohen(certificate):
    rng = np.random.default_rng(4)
    for _ in range(300):
        num_classes = int(rng.integers(2, 6))
        probs = rng.dirichlet(np.full(num_classes, 0.3))
        sel = rng.multinomial(int(rng.integers(1, 50)), probs)
        est = rng.multinomial(int(rng.integers(1, 500)), probs)
        sigma, alpha = float(rng.choice([0.25, 0.5, 1.0])), float(10 ** rng.uniform(-4, -1))
        pred, radius = cohen_certify(sel, est, sigma, alpha)
        c_pred, c_radius, c_stage = cascade_certify(sel[None], est[None], [sigma], alpha, 0.5,
                                                    certificate)
        assert (c_pred, c_radius) == (pred, pytest.approx(radius, rel=1e-12, abs=1e-15))
        if pred != -1:
            assert c_stage == 0


def test_reaching_an_unsampled_scale_is_an_error():
    select = table([0, 0], [100, 0])
    estimate = table([0, 0], [400, 600])  # scale 1 defers into the unsampled scale 0
    with pytest.raises(ValueError, match="not sampled"):
        cascade_certify(select, estimate, SIGMAS, 0.001)
    with pytest.raises(ValueError, match="row 0"):
        certify_table(select[None], estimate[None], SIGMAS, 0.001)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sigmas": [0.5, 0.25]},  # not ascending
        {"sigmas": [0.25]},  # wrong length
        {"alpha": 0.7},
        {"p0": 0.4},
        {"p0": 1.0},
        {"estimate": [[0, 1], [-1, 2]]},
        {"estimate": [[0, 1, 0], [1, 2, 0]]},  # shape mismatch
    ],
)
def test_cascade_rejects_bad_input(kwargs):
    args = {"select": [[0, 5], [5, 0]], "estimate": [[0, 50], [50, 0]], "sigmas": SIGMAS,
            "alpha": 0.001, "p0": 0.5}
    args.update(kwargs)
    with pytest.raises(ValueError):
        cascade_certify(**args)


# ============================================================================================
# 3. The off-class bins and bound
# ============================================================================================


@pytest.mark.parametrize(
    "counts, c_hat, bins",
    [
        ([40, 30, 20, 10], 1, [30, 40, 20, 10]),  # several >= 5 classes, c_hat not the top
        ([80, 4, 4, 4, 4, 4, 4, 1], 0, [80, 8, 8, 9]),  # pools of small classes; 1 joins last
        ([50, 30, 20, 3, 2, 1], 0, [50, 30, 20, 6]),  # 3+2 -> bin of 5, leftover 1 joins it
        ([90, 2, 1], 0, [90, 3]),  # leftover pool becomes its own bin
        ([90, 3, 2], 0, [90, 5]),  # pool reaches exactly 5
        ([0, 10, 7, 3], 0, [0, 10, 10]),  # n_chat = 0
        ([1, 5, 1, 5], 0, [1, 5, 6]),  # equal counts, leftover pool joins the last bin
        ([90, 0, 0], 0, [90]),  # nothing besides c_hat
    ],
)
def test_off_class_bins(counts, c_hat, bins):
    assert off_class_bins(counts, c_hat).tolist() == bins
    assert ref_bins(counts, c_hat) == bins


@pytest.mark.parametrize(
    "counts, c_hat, largest, num_bins",
    [
        ([40, 30, 20, 10], 1, 40, 4),
        ([80, 4, 4, 4, 4, 4, 4, 1], 0, 9, 4),  # the leftover makes the largest bin
        ([50, 30, 20, 3, 2, 1], 0, 30, 4),
        ([0, 10, 7, 3], 0, 10, 3),  # n_chat = 0 still counts as one of the k bins
        ([0, 500, 500], 0, 500, 3),
    ],
)
def test_off_class_upper_bound_goodman_path(counts, c_hat, largest, num_bins):
    a_s = 0.005
    n = sum(counts)
    # Goodman's upper end for `largest` of n with k = num_bins at level 2*a_s, written out.
    big_a = chi2.ppf(1 - 2 * a_s / num_bins, df=1)
    expected = (big_a + 2 * largest + math.sqrt(big_a * (big_a + 4 * largest * (n - largest) / n))
                ) / (2 * (n + big_a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = off_class_upper_bound(counts, c_hat, a_s)
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "counts, c_hat", [([90, 2, 1], 0), ([90, 3, 2], 0), ([90, 0, 0], 0), ([10, 990], 1),
                      ([0, 12], 0)],
)
def test_off_class_upper_bound_cp_path(counts, c_hat):
    a_s = 0.005
    n = sum(counts)
    k = n - counts[c_hat]
    expected = 1.0 if k == n else beta.ppf(1 - a_s, k + 1, n - k)
    assert off_class_upper_bound(counts, c_hat, a_s) == pytest.approx(expected, rel=1e-12)


def test_off_class_upper_bound_rejects_bad_input():
    with pytest.raises(ValueError):
        off_class_upper_bound([0, 0, 0], 0, 0.01)
    with pytest.raises(ValueError):
        off_class_upper_bound([1, 2, 3], 3, 0.01)
    with pytest.raises(ValueError):
        off_class_upper_bound([1, 2, 3], 0, 0.6)


# ============================================================================================
# 4. The cascade against the independent reference on random tables
# ============================================================================================


def random_probs(rng, num_classes: int, favourite: int, lean: float) -> np.ndarray:
    """Random class probabilities, mixed with a point mass on the favourite class."""
    conc = 10 ** rng.uniform(-1.5, 1.0)
    probs = rng.dirichlet(np.full(num_classes, conc))
    return (1 - lean) * probs + lean * np.eye(num_classes)[favourite]


def two_class_probs(num_classes: int, favourite: int, rival: int, rival_share: float
                    ) -> np.ndarray:
    """A large scale that confuses the favourite with one rival, plus a trickle elsewhere."""
    probs = np.full(num_classes, 0.002)
    probs[rival] += rival_share
    probs[favourite] += 1 - rival_share
    return probs / probs.sum()


def random_case(rng):
    """A random [K, C] table pair with larger scales flatter, like real smoothing votes.

    In a third of the cases ("confused") the larger scales split their votes between the
    image's class and one rival, and p0 sits a little above the rival's share: they defer, and
    the off-class bound (rival bin near p0) decides the radius, often over fewer than 3 bins
    (the trickle pools into the rival's bin), which is its Clopper-Pearson path.
    """
    num_scales = int(rng.integers(1, 4))
    num_classes = int(rng.integers(2, 11))
    sigmas = sorted(rng.choice([0.12, 0.25, 0.5, 0.75, 1.0], num_scales, replace=False))
    n0 = int(rng.integers(1, 100))
    n = int(10 ** rng.uniform(1, 3.5))
    favourite = int(rng.integers(num_classes))
    rival = (favourite + 1 + int(rng.integers(num_classes - 1))) % num_classes
    rival_share = rng.uniform(0.45, 0.8)
    confused = rng.uniform() < 0.35
    select = np.zeros((num_scales, num_classes), dtype=np.int64)
    estimate = np.zeros_like(select)
    for k in range(num_scales):
        if confused and k > 0:
            probs = two_class_probs(num_classes, favourite, rival, rival_share)
        else:
            # A smaller scale leans more towards the image's class.
            lean = rng.uniform(0.5 if confused else 0.0, 1.0) * (1 - k / num_scales)
            probs = random_probs(rng, num_classes, favourite, lean)
        select[k] = rng.multinomial(n0, probs)
        estimate[k] = rng.multinomial(n, probs)
    if confused:
        p0 = float(np.clip(rival_share + rng.uniform(0.0, 0.15), 0.5, 0.95))
    else:
        p0 = 0.5 if rng.uniform() < 0.4 else float(rng.uniform(0.5, 0.9))
    alpha = float(10 ** rng.uniform(-4, -1))
    return select, estimate, np.array(sigmas, dtype=float), alpha, p0


REASONS = ("certified-own", "certified-offclass-goodman", "certified-offclass-cp",
           "negative-offclass-goodman", "negative-offclass-cp", "all-defer")


def random_shares(rng, num_scales: int):
    """None (the default shares) half of the time, else random positive shares summing to 1."""
    if rng.uniform() < 0.5:
        return None
    shares = rng.dirichlet(np.full(num_scales, 2.0))
    return tuple(float(x) for x in shares / shares.sum())


@pytest.mark.parametrize("rule", ["paper", "split"])
def test_cascade_matches_independent_reference(rule):
    rng = np.random.default_rng(5)
    reasons = Counter()
    for _ in range(600):
        select, estimate, sigmas, alpha, p0 = random_case(rng)
        shares = random_shares(rng, len(sigmas)) if rule == "split" else None
        certificate = Certificate(rule, shares)
        pred, radius, stage, why = ref_cascade(select, estimate, sigmas, alpha, p0, rule, shares)
        reasons[why] += 1
        # certify_table on a table of one image, then the `cascade` schedule's table where the
        # scales below the deciding one were never sampled: both must match the reference.
        unreached = select.copy(), estimate.copy()
        if stage > 0:
            for arr in unreached:
                arr[:stage] = 0
        for sel, est in ((select, estimate), unreached):
            got_p, got_r, got_s = certify_table(sel[None], est[None], sigmas, alpha, p0,
                                                certificate)
            assert (int(got_p[0]), int(got_s[0])) == (pred, stage), why
            assert got_r[0] == pytest.approx(radius, rel=1e-9, abs=1e-9), why
    # Every branch of the cascade was exercised, including both off-class paths; the paper's
    # rule abstained in the band, the split rule deferred through it to a certificate, an
    # abstention from R < 0, and past the smallest scale.
    ends = Counter()  # how each image ended, whether or not it went through a band
    for why, count in reasons.items():
        ends[why.removeprefix("after-band:")] += count
    for why in REASONS:
        assert ends[why] >= 3, reasons
    if rule == "paper":
        assert reasons["undecidable"] >= 3, reasons
    else:
        assert "undecidable" not in reasons
        for why in ("certified-own", "negative-offclass-cp", "all-defer"):
            assert reasons["after-band:" + why] >= 3, reasons


def test_certify_table_shapes_and_dtypes():
    rng = np.random.default_rng(6)
    select = rng.multinomial(50, [0.1, 0.2, 0.7], size=(4, 2))
    estimate = rng.multinomial(500, [0.1, 0.2, 0.7], size=(4, 2))
    pred, radius, stage = certify_table(select, estimate, SIGMAS, 0.001, 0.5)
    assert pred.dtype == np.int64 and stage.dtype == np.int64 and radius.dtype == np.float64
    assert pred.shape == radius.shape == stage.shape == (4,)
    for i in range(4):
        assert (pred[i], radius[i], stage[i]) == cascade_certify(select[i], estimate[i], SIGMAS,
                                                                 0.001, 0.5)


# ============================================================================================
# 5. Predictions and writing radii
# ============================================================================================


def two_sided_p(n_a: int, n_b: int) -> float:
    """Exact two-sided binomial p-value at 1/2 for n_a > n_b, written out."""
    total = n_a + n_b
    tail = sum(math.comb(total, i) for i in range(n_b + 1)) / 2**total
    return min(1.0, 2 * tail)


def test_cohen_predict():
    p = two_sided_p(9, 1)  # = 2 * 11 / 1024
    assert cohen_predict([0, 9, 1], p * 1.01) == 1
    assert cohen_predict([0, 9, 1], p * 0.99) == -1
    # nB is the runner-up class, not all the other votes: 12 vs 1 is significant at 0.01,
    # 12 vs 6 would not be.
    assert two_sided_p(12, 1) < 0.01 < two_sided_p(12, 6)
    assert cohen_predict([0, 12, 1, 1, 1, 1, 1, 1], 0.01) == 1
    assert cohen_predict([10, 10, 0], 0.2) == -1  # a tie is never significant
    assert cohen_predict([3, 9, 1, 8], 0.05) == -1
    with pytest.raises(ValueError):
        cohen_predict([0, 0], 0.05)


def test_cascade_predict():
    counts = table([5, 5, 0], [2, 6, 2], [4, 3, 3])
    assert cascade_predict(counts, 0.5) == (1, 1)  # scale 2 at 0.4 defers, scale 1 at 0.6
    # No scale reaches 0.7: the smallest scale's top class (tie -> lowest index), stage 0.
    assert cascade_predict(counts, 0.7) == (0, 0)
    assert cascade_predict(table([9, 1], [3, 7]), 0.7) == (1, 1)  # exactly p0 predicts
    assert cascade_predict(table([9, 1], [4, 6]), 0.5) == (1, 1)
    with pytest.raises(ValueError, match="not sampled"):
        cascade_predict(table([0, 0], [4, 4]), 0.6)


def test_floor_decimals_examples():
    assert floor_decimals(0.1234569) == 0.123456
    assert floor_decimals(2.0) == 2.0
    assert floor_decimals(0.0) == 0.0
    assert floor_decimals(0.9999999) == 0.999999
    assert floor_decimals(1.23456789, 2) == 1.23
    out = floor_decimals(np.array([1e-7, 0.5, 0.7654321]))
    assert out.tolist() == [0.0, 0.5, 0.765432]


def test_floor_decimals_never_rounds_up():
    rng = np.random.default_rng(7)
    units = rng.integers(0, 4_000_000, size=2000)
    # Values on the 6-decimal grid (whose double may lie just below the grid point), just
    # below it (where x * 1e6 rounds up to the integer in floating point), and arbitrary.
    values = np.concatenate([
        units / 1e6, np.nextafter(units / 1e6, -np.inf), rng.uniform(0, 4, size=2000)
    ])
    floored = floor_decimals(values)
    assert floored.shape == values.shape
    step = Fraction(1, 10**6)
    for x, y in zip(values, floored, strict=True):
        # The text written for the radius, read back exactly, is at most x and within 1e-6.
        written = Fraction(f"{y:.6f}")
        assert written <= Fraction(float(x)) < written + step
        assert y <= x
