"""Statistics of randomized smoothing: confidence bounds, single-scale and cascade certificates.

Everything here is a pure function of vote counts (docs/design.md §1.2), so a certificate can
be recomputed offline for another alpha, p0 or subset of scales without drawing new samples.

Conventions:
- counts are non-negative integers; ``select`` are the n0 selection votes, ``estimate`` the n
  estimation votes of one image;
- ``sigmas`` are ascending; ``stage`` is an index into them, -1 when no scale decided;
- an abstention is prediction -1 with radius 0.0;
- ``alpha`` of a one-sided bound lies in (0, 1/2): the bounds are computed as two-sided
  intervals at level 2*alpha, which must stay below 1.
"""

from __future__ import annotations

import math
import numbers
from decimal import ROUND_FLOOR, Decimal

import numpy as np
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import multinomial_proportions_confint, proportion_confint

from msscale.smoothing.certificate import CERTIFY, DEFAULT_CERTIFICATE, UNDECIDABLE, Certificate

ABSTAIN = -1
# A class needs at least this many draws to be its own bin in the off-class bound (the usual
# validity condition of Goodman's chi-square approximation).
MIN_BIN_COUNT = 5


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _check_alpha(alpha, name: str = "alpha", upper: float = 0.5) -> float:
    """Return alpha as a float, or raise ValueError unless 0 < alpha < upper."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"{name} must be a number in (0, {upper}), got {alpha!r}")
    alpha = float(alpha)
    if not 0.0 < alpha < upper:
        raise ValueError(f"{name} must be in (0, {upper}), got {alpha!r}")
    return alpha


def _check_p0(p0) -> float:
    """Return p0 as a float, or raise ValueError unless 1/2 <= p0 < 1."""
    if isinstance(p0, bool) or not isinstance(p0, numbers.Real):
        raise ValueError(f"p0 must be a number in [0.5, 1), got {p0!r}")
    p0 = float(p0)
    if not 0.5 <= p0 < 1.0:
        raise ValueError(f"p0 must be in [0.5, 1), got {p0!r}")
    return p0


def _check_sigma(sigma, name: str = "sigma") -> float:
    """Return a noise scale as a float, or raise ValueError unless it is finite and > 0."""
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise ValueError(f"{name} must be a positive number, got {sigma!r}")
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0.0):
        raise ValueError(f"{name} must be a finite positive number, got {sigma!r}")
    return sigma


def _as_counts(x, name: str, ndim: int | None = None) -> np.ndarray:
    """Return x as an int64 array of non-negative integer counts, or raise ValueError."""
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be an array of counts: {err}") from err
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name} must hold integer counts, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        # Floats are accepted only when they are whole numbers (e.g. counts read from a text
        # file); a fractional "count" is a bug upstream and must not be silently truncated.
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must hold whole-number counts")
    if np.any(arr < 0):
        raise ValueError(f"{name} must hold non-negative counts")
    return arr.astype(np.int64)


def _check_classes(counts: np.ndarray, name: str) -> None:
    """Raise ValueError unless the last axis (classes) has at least two entries."""
    if counts.shape[-1] < 2:
        raise ValueError(f"{name} must have at least 2 classes, got shape {counts.shape}")


def _check_sigmas(sigmas, num_scales: int) -> np.ndarray:
    """Return sigmas as a float64 array of num_scales strictly ascending positive scales."""
    try:
        arr = np.asarray(sigmas, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"sigmas must be a list of numbers: {err}") from err
    if arr.ndim != 1 or arr.shape[0] != num_scales:
        raise ValueError(
            f"sigmas must be a 1-D list of {num_scales} scales (one per row of counts), "
            f"got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"sigmas must be finite and positive, got {arr.tolist()}")
    if np.any(np.diff(arr) <= 0):
        raise ValueError(f"sigmas must be strictly ascending, got {arr.tolist()}")
    return arr


# --------------------------------------------------------------------------------------------
# Confidence bounds
# --------------------------------------------------------------------------------------------


def _binomial_args(k, n) -> tuple[np.ndarray, np.ndarray]:
    """Validate successes k and trials n (broadcastable): integers, n >= 1, 0 <= k <= n."""
    k_arr = _as_counts(k, "k (successes)")
    n_arr = _as_counts(n, "n (trials)")
    try:
        k_arr, n_arr = np.broadcast_arrays(k_arr, n_arr)
    except ValueError as err:
        raise ValueError(f"k and n have incompatible shapes: {err}") from err
    if np.any(n_arr < 1):
        raise ValueError("n (trials) must be at least 1")
    if np.any(k_arr > n_arr):
        raise ValueError("k (successes) must not exceed n (trials)")
    return k_arr, n_arr


def _scalar_or_array(x: np.ndarray):
    """Return a python float for a 0-d result, else the float64 array."""
    x = np.asarray(x, dtype=np.float64)
    return float(x) if x.ndim == 0 else x


def clopper_pearson_lower(k, n, alpha):
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion.

    k successes out of n trials (arrays broadcast). Computed as the lower end of the two-sided
    interval at level 2*alpha; it is exactly 0 when k = 0. Returns a float for scalar input,
    else a float64 array.
    """
    alpha = _check_alpha(alpha)
    k_arr, n_arr = _binomial_args(k, n)
    lower, _ = proportion_confint(k_arr, n_arr, alpha=2 * alpha, method="beta")
    lower = np.where(k_arr == 0, 0.0, lower)
    return _scalar_or_array(lower)


def clopper_pearson_upper(k, n, alpha):
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion.

    k successes out of n trials (arrays broadcast). Computed as the upper end of the two-sided
    interval at level 2*alpha; it is exactly 1 when k = n. Returns a float for scalar input,
    else a float64 array.
    """
    alpha = _check_alpha(alpha)
    k_arr, n_arr = _binomial_args(k, n)
    _, upper = proportion_confint(k_arr, n_arr, alpha=2 * alpha, method="beta")
    upper = np.where(k_arr == n_arr, 1.0, upper)
    return _scalar_or_array(upper)


def _normal_quantile(p: float) -> float:
    """Phi^-1(p) with p clipped to [0, 1]: -inf at 0 and +inf at 1, never nan.

    Bounds computed in floating point can land a rounding error outside [0, 1]; norm.ppf would
    return nan there, and a nan radius compares False with everything, so it could certify.
    """
    return float(norm.ppf(min(max(p, 0.0), 1.0)))


def off_class_bins(estimate_counts, c_hat: int) -> np.ndarray:
    """The bins of the off-class bound (docs/design.md §1.2); bin 0 is c_hat's count.

    The other classes are sorted by count, descending (ties by class index); a class with at
    least 5 draws is its own bin, smaller ones accumulate into a pool that becomes a bin once
    it reaches 5; a leftover pool joins the last bin, or becomes a bin if there is none
    besides c_hat. Zero-count classes add nothing, so only their order could matter, and the
    bins do not depend on it.
    """
    counts = _as_counts(estimate_counts, "estimate_counts", ndim=1)
    c_hat = _check_class_index(c_hat, counts.shape[0])
    others = np.delete(counts, c_hat)
    # A stable sort of the negated counts is descending with ties in class-index order.
    others = others[np.argsort(-others, kind="stable")]
    bins = [int(counts[c_hat])]
    pool = 0
    for count in others:
        if count >= MIN_BIN_COUNT:
            bins.append(int(count))
            continue
        pool += int(count)
        if pool >= MIN_BIN_COUNT:
            bins.append(pool)
            pool = 0
    if pool > 0:
        if len(bins) > 1:
            bins[-1] += pool
        else:
            bins.append(pool)
    return np.asarray(bins, dtype=np.int64)


def _check_class_index(c_hat, num_classes: int) -> int:
    """Return c_hat as an int, or raise ValueError unless it is a class index."""
    if isinstance(c_hat, bool) or not isinstance(c_hat, numbers.Integral):
        raise ValueError(f"c_hat must be a class index (integer), got {c_hat!r}")
    if not 0 <= int(c_hat) < num_classes:
        raise ValueError(f"c_hat must be in [0, {num_classes}), got {c_hat}")
    return int(c_hat)


def off_class_upper_bound(estimate_counts, c_hat: int, alpha_s: float) -> float:
    """pB_high: a simultaneous upper bound, at alpha_s, on max over c != c_hat of P[c].

    Exactly docs/design.md §1.2: with the bins of ``off_class_bins`` (bin 0 = c_hat), if there
    are at least 3 bins, the largest upper end over the bins other than c_hat of Goodman's
    simultaneous intervals at level 2*alpha_s; otherwise the one-sided alpha_s Clopper-Pearson
    upper bound of (n - n_chat) out of n. A bin is a union of classes, so its bound also bounds
    each of its classes.

    n_chat may be 0: statsmodels' Goodman formula gives that bin the interval
    [0, chi2 / (chi2 + n)] (no division by zero, no nan) and it still counts as one of the k
    categories of the Bonferroni split, as the design's bin list says; its interval is not used.
    """
    alpha_s = _check_alpha(alpha_s, "alpha_s")
    counts = _as_counts(estimate_counts, "estimate_counts", ndim=1)
    _check_classes(counts, "estimate_counts")
    n = int(counts.sum())
    if n == 0:
        raise ValueError("estimate_counts are all zero: the off-class bound needs draws")
    bins = off_class_bins(counts, c_hat)
    if bins.shape[0] >= 3:
        intervals = multinomial_proportions_confint(bins, alpha=2 * alpha_s, method="goodman")
        upper = float(np.max(intervals[1:, 1]))
    else:
        upper = clopper_pearson_upper(n - int(bins[0]), n, alpha_s)
    return min(max(upper, 0.0), 1.0)


# --------------------------------------------------------------------------------------------
# Single scale (Cohen et al. 2019)
# --------------------------------------------------------------------------------------------


def _top_class(counts: np.ndarray) -> int:
    """argmax of a count vector; ties go to the lowest class index (np.argmax's rule)."""
    return int(np.argmax(counts))


def cohen_certify(select_counts, estimate_counts, sigma: float, alpha: float) -> tuple[int, float]:
    """Cohen et al.'s CERTIFY at one noise scale.

    c_hat = argmax of the selection counts (ties: lowest index); pA_low = one-sided (1 - alpha)
    Clopper-Pearson lower bound of estimate[c_hat] out of estimate.sum(). Returns (-1, 0.0)
    (abstain) if pA_low < 1/2, else (c_hat, sigma * Phi^-1(pA_low)).
    """
    sigma = _check_sigma(sigma)
    alpha = _check_alpha(alpha)
    select = _as_counts(select_counts, "select_counts", ndim=1)
    estimate = _as_counts(estimate_counts, "estimate_counts", ndim=1)
    _check_classes(select, "select_counts")
    if select.shape != estimate.shape:
        raise ValueError(
            f"select_counts and estimate_counts must have the same shape, "
            f"got {select.shape} and {estimate.shape}"
        )
    if select.sum() == 0 or estimate.sum() == 0:
        raise ValueError("select_counts and estimate_counts must each have at least one draw")
    c_hat = _top_class(select)
    p_a_low = clopper_pearson_lower(int(estimate[c_hat]), int(estimate.sum()), alpha)
    if p_a_low < 0.5:
        return ABSTAIN, 0.0
    return c_hat, sigma * _normal_quantile(p_a_low)


def cohen_predict(counts, alpha: float) -> int:
    """Cohen et al.'s PREDICT at one noise scale.

    nA, nB = the two largest counts (ties: lowest index first); returns the top class if the
    two-sided binomial test of nA out of nA + nB at 1/2 has p-value <= alpha, else -1 (abstain).
    alpha is the level of a two-sided test, in (0, 1).
    """
    alpha = _check_alpha(alpha, upper=1.0)
    counts = _as_counts(counts, "counts", ndim=1)
    _check_classes(counts, "counts")
    if counts.sum() == 0:
        raise ValueError("counts are all zero: PREDICT needs at least one draw")
    order = np.argsort(-counts, kind="stable")
    n_a, n_b = int(counts[order[0]]), int(counts[order[1]])
    p_value = binomtest(n_a, n_a + n_b, 0.5, alternative="two-sided").pvalue
    return int(order[0]) if p_value <= alpha else ABSTAIN


# --------------------------------------------------------------------------------------------
# Multi-scale cascade
# --------------------------------------------------------------------------------------------


def _check_table(select, estimate) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pair of [..., K, C] count arrays of equal shape."""
    if select.shape != estimate.shape:
        raise ValueError(
            f"select and estimate must have the same shape, got {select.shape} and "
            f"{estimate.shape}"
        )
    if select.shape[-2] < 1:
        raise ValueError(f"counts must have at least one scale, got shape {select.shape}")
    _check_classes(select, "counts")
    return select, estimate


def _cascade_inputs(select, estimate, sigmas, alpha, p0, ndim: int):
    """Validated (select, estimate, sigmas, alpha, p0) for one table (ndim 2) or many (3)."""
    select = _as_counts(select, "select", ndim=ndim)
    estimate = _as_counts(estimate, "estimate", ndim=ndim)
    _check_table(select, estimate)
    sigmas = _check_sigmas(sigmas, select.shape[-2])
    return select, estimate, sigmas, _check_alpha(alpha), _check_p0(p0)


def stage_bounds(estimate_at_scale: np.ndarray, c_hat: int, level: float) -> tuple[float, float]:
    """(pA_low, pA_high): the one-sided Clopper-Pearson bounds of c_hat's share, at `level`."""
    n_a, n = int(estimate_at_scale[c_hat]), int(estimate_at_scale.sum())
    return clopper_pearson_lower(n_a, n, level), clopper_pearson_upper(n_a, n, level)


def _cascade(select: np.ndarray, estimate: np.ndarray, sigmas: np.ndarray, alpha: float,
             p0: float, certificate: Certificate) -> tuple[int, float, int]:
    """The cascade on validated inputs; see cascade_certify."""
    num_scales = sigmas.shape[0]
    levels = certificate.stage_levels(alpha, num_scales)
    z_p0 = _normal_quantile(p0)
    for s in range(num_scales):
        k = num_scales - 1 - s  # stage s runs the (s+1)-th largest scale
        if select[k].sum() == 0 or estimate[k].sum() == 0:
            raise ValueError(
                f"the cascade reached scale index {k} (sigma={sigmas[k]:g}) but its "
                "selection or estimation counts are all zero: that scale was not sampled"
            )
        c_hat = _top_class(select[k])
        p_a_low, p_a_high = stage_bounds(estimate[k], c_hat, levels[s])
        decision = certificate.decide(p_a_low, p_a_high, p0)
        if decision == CERTIFY:
            radius = sigmas[k] * (_normal_quantile(p_a_low) - z_p0)
            # Every larger scale deferred; it must keep deferring (or agree) inside the ball.
            for j in range(k + 1, num_scales):
                p_b_high = off_class_upper_bound(estimate[j], c_hat, levels[s])
                # p_b_high = 1 gives -inf here, hence abstention: never nan.
                radius = min(radius, sigmas[j] * (z_p0 - _normal_quantile(p_b_high)))
            if radius < 0:
                return ABSTAIN, 0.0, k
            return c_hat, float(radius), k
        if decision == UNDECIDABLE:
            return ABSTAIN, 0.0, k  # the paper's rule abstains in the band
        # Below p0 (confidently, or for the split rule also undecidably): the next scale.
    return ABSTAIN, 0.0, -1


def cascade_certify(select, estimate, sigmas, alpha: float, p0: float = 0.5,
                    certificate: Certificate = DEFAULT_CERTIFICATE) -> tuple[int, float, int]:
    """The multi-scale cascade certificate of docs/design.md §1.2 for one image.

    select, estimate: [K, C] vote counts per scale; sigmas: [K], strictly ascending. Stages run
    from the largest sigma down, each at its level of `certificate` (the split rule by
    default). Returns (prediction, radius, stage): prediction -1 and radius 0.0 on
    abstention; stage is the index into the ascending sigmas of the scale where the cascade
    stopped (certified, abstained because R < 0, or undecidable under the paper's rule), -1
    when every scale deferred. Raises ValueError if the cascade reaches a scale whose
    selection or estimation counts are all zero (not sampled).
    """
    inputs = _cascade_inputs(select, estimate, sigmas, alpha, p0, ndim=2)
    return _cascade(*inputs, certificate)


def certify_table(select, estimate, sigmas, alpha: float, p0: float = 0.5,
                  certificate: Certificate = DEFAULT_CERTIFICATE
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cascade_certify for every image of [I, K, C] count tables.

    Returns (predict [I] int64, radius [I] float64, stage [I] int64). A ValueError from one
    image names its position in the table.
    """
    select, estimate, sigmas, alpha, p0 = _cascade_inputs(select, estimate, sigmas, alpha, p0,
                                                          ndim=3)
    num_images = select.shape[0]
    predict = np.full(num_images, ABSTAIN, dtype=np.int64)
    radius = np.zeros(num_images, dtype=np.float64)
    stage = np.full(num_images, -1, dtype=np.int64)
    for i in range(num_images):
        try:
            predict[i], radius[i], stage[i] = _cascade(select[i], estimate[i], sigmas, alpha, p0,
                                                       certificate)
        except ValueError as err:
            raise ValueError(f"image at row {i}: {err}") from err
    return predict, radius, stage


def cascade_predict(counts, p0: float = 0.5) -> tuple[int, int]:
    """The cascade's plain threshold rule, without certificate (for clean accuracy).

    counts: [K, C] votes per scale, scales ascending. From the largest scale down, returns
    (top class, stage) of the first scale whose top class (ties: lowest index) holds a share
    >= p0 of that scale's votes. If no scale reaches p0, this rule does not abstain: it
    returns the smallest scale's top class with stage 0, because the smallest noise is the
    most informative about the image (use cohen_predict for a predictor that may abstain).
    Raises ValueError if the rule reaches a scale with no votes (not sampled).
    """
    p0 = _check_p0(p0)
    counts = _as_counts(counts, "counts", ndim=2)
    if counts.shape[0] < 1:
        raise ValueError(f"counts must have at least one scale, got shape {counts.shape}")
    _check_classes(counts, "counts")
    for k in range(counts.shape[0] - 1, -1, -1):
        total = int(counts[k].sum())
        if total == 0:
            raise ValueError(
                f"cascade_predict reached scale index {k} but its counts are all zero: "
                "that scale was not sampled"
            )
        top = _top_class(counts[k])
        # The share as one correctly rounded division: 7 / 10 is the same double as 0.7,
        # whereas 0.7 * 10 rounds above 7 and would defer at the boundary.
        if counts[k, top] / total >= p0:
            return top, k
    return _top_class(counts[0]), 0


# --------------------------------------------------------------------------------------------
# Writing radii
# --------------------------------------------------------------------------------------------


def floor_decimals(x, decimals: int = 6):
    """Round down to `decimals` places: the result never exceeds x (never in the favourable
    direction), so a radius written with f"{r:.{decimals}f}" is still certified.

    The floor is taken in exact decimal arithmetic on the double's true value: floor(x * 10**d)
    in floating point can round up to the next grid point (x just below it), and a double
    that prints as a grid point may lie just below it, so that printing it would round up.
    Returns a float for scalar input, else a float64 array; nan and inf are left as they are.
    """
    if isinstance(decimals, bool) or not isinstance(decimals, numbers.Integral) or decimals < 0:
        raise ValueError(f"decimals must be a non-negative integer, got {decimals!r}")
    try:
        values = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"floor_decimals needs numbers, got {x!r}") from err
    quantum = Decimal(1).scaleb(-int(decimals))
    floored = np.array(values, copy=True)
    for i, value in np.ndenumerate(values):
        if math.isfinite(value):
            # Decimal(float) is exact; rounding the floored decimal back to the nearest double
            # keeps it <= value, because rounding to nearest is monotone and value is a double.
            floored[i] = float(Decimal(float(value)).quantize(quantum, rounding=ROUND_FLOOR))
    return _scalar_or_array(floored)
