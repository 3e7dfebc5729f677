"""Sequential certification: the cascade with early stopping over a fixed look schedule.

docs/design.md §1.5 has the rule and why it is valid. In short: each scale's estimation counts
are examined at a few looks fixed in advance (block boundaries up to n); every bound at
stage s and look l is taken at alpha_s * w_l, alpha_s the certificate's stage level and
sum_l w_l = 1, so a stage's bounds over all looks fail with probability at most alpha_s and
the bound at whatever look a scale stopped at inherits it; with the split certificate the
stages' levels sum to alpha. The stopping rule (`radii` or `tolerance`) only decides when to
stop; the certificate is a pure function of the stopped counts (`certify_sequential_table`),
so `recertify` redoes it.

Conventions as in stats.py: scales ascending, stage s runs scale K - 1 - s, abstention is
prediction -1 with radius 0.0, stage -1 when every scale deferred. `used[i, k]` is the number
of estimation draws image i used at scale k: a look of the schedule, or 0 if never reached.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy.stats import norm

from msscale.smoothing.certificate import CERTIFY, DEFAULT_CERTIFICATE, DEFER, PAPER, Certificate
from msscale.smoothing.stats import (
    ABSTAIN,
    _as_counts,
    _check_alpha,
    _check_p0,
    _check_sigmas,
    clopper_pearson_lower,
    clopper_pearson_upper,
    off_class_upper_bound,
)

# The radii a report lists (certify/report.py), which the `radii` stopping rule decides.
RADIUS_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
STOPPING = ("radii", "tolerance")
# The `radii` rule projects the share of a class to n draws at its one-sided bound at this
# level: going on is worth it while a plausible share could still cross a target radius.
PLAUSIBLE = 0.05


# --------------------------------------------------------------------------------------------
# The look schedule
# --------------------------------------------------------------------------------------------


def look_schedule(n: int, noise_block: int, first_look: int, growth: float) -> tuple[int, ...]:
    """Draws at each look: geometric block counts from ceil(first_look / noise_block) up to
    all ceil(n / noise_block) blocks, each look at least one block after the previous."""
    for name, value in (("n", n), ("noise_block", noise_block), ("first_look", first_look)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(growth, bool) or not isinstance(growth, numbers.Real) or not growth > 1:
        raise ValueError(f"look_growth must be a number > 1, got {growth!r}")
    total = -(-n // noise_block)
    blocks = [min(total, -(-first_look // noise_block))]
    while blocks[-1] < total:
        blocks.append(min(total, max(blocks[-1] + 1, math.ceil(blocks[-1] * growth))))
    return tuple(min(b * noise_block, n) for b in blocks)


def look_weights(num_looks: int) -> tuple[float, ...]:
    """The share of a stage's level spent at each look: half at the last, the rest evenly."""
    if num_looks == 1:
        return (1.0,)
    early = 0.5 / (num_looks - 1)
    return (early,) * (num_looks - 1) + (0.5,)


@dataclass(frozen=True)
class SequentialRule:
    """Everything the certificate and the stopping rule depend on (recorded in counts meta)."""

    sigmas: tuple[float, ...]
    alpha: float
    p0: float
    looks: tuple[int, ...]
    weights: tuple[float, ...]
    radius_tolerance: float = 0.0
    certificate: Certificate = DEFAULT_CERTIFICATE
    stopping: str = "tolerance"
    target_radii: tuple[float, ...] = RADIUS_GRID

    def __post_init__(self):
        sigmas = _check_sigmas(self.sigmas, len(self.sigmas))
        object.__setattr__(self, "sigmas", tuple(float(s) for s in sigmas))
        object.__setattr__(self, "alpha", _check_alpha(self.alpha))
        object.__setattr__(self, "p0", _check_p0(self.p0))
        looks = tuple(int(v) for v in self.looks)
        weights = tuple(float(w) for w in self.weights)
        if not looks or looks[0] < 1 or np.any(np.diff(looks) <= 0):
            raise ValueError(f"looks must be strictly ascending positive draws, got {looks}")
        if len(weights) != len(looks) or min(weights) <= 0 or abs(sum(weights) - 1) > 1e-9:
            raise ValueError(f"look weights must be {len(looks)} positive shares summing to 1, "
                            f"got {weights}")
        tol = self.radius_tolerance
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < math.inf:
            raise ValueError(f"radius_tolerance must be a number >= 0, got {tol!r}")
        object.__setattr__(self, "looks", looks)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "radius_tolerance", float(tol))
        if self.stopping not in STOPPING:
            raise ValueError(f"stopping must be one of {', '.join(STOPPING)}, "
                             f"got {self.stopping!r}")
        radii = tuple(float(r) for r in self.target_radii)
        if not radii or not all(0 <= r < math.inf for r in radii) or np.any(np.diff(radii) <= 0):
            raise ValueError(f"target radii must be ascending numbers >= 0, got {list(radii)}")
        object.__setattr__(self, "target_radii", radii)
        # Fails here, not at the first look, when the shares do not fit the scales.
        object.__setattr__(self, "_stage_levels",
                           self.certificate.stage_levels(self.alpha, len(self.sigmas)))

    @classmethod
    def from_settings(cls, sigmas, alpha, p0, n, noise_block, first_look, look_growth,
                      radius_tolerance, certificate: Certificate = DEFAULT_CERTIFICATE,
                      stopping: str = "tolerance", target_radii=RADIUS_GRID) -> SequentialRule:
        """first_look None: n / 100 (rounded up to a block)."""
        first_look = -(-n // 100) if first_look is None else first_look
        looks = look_schedule(n, noise_block, first_look, look_growth)
        return cls(tuple(sigmas), alpha, p0, looks, look_weights(len(looks)), radius_tolerance,
                   certificate, stopping, tuple(target_radii))

    @property
    def n(self) -> int:
        return self.looks[-1]

    def level(self, stage: int, look: int) -> float:
        """a_{s,l} = alpha_s * w_l: the level of every bound at stage s, look l, with alpha_s
        the certificate's level for stage s (docs/design.md §1.5)."""
        return self._stage_levels[stage] * self.weights[look]

    def to_meta(self) -> dict:
        """What the certificate and the stopping rule read back from a counts file."""
        return {"looks": list(self.looks), "look_weights": list(self.weights),
                "radius_tolerance": self.radius_tolerance, "stopping": self.stopping,
                "target_radii": list(self.target_radii)}

    @classmethod
    def from_meta(cls, meta: dict, sigmas, alpha: float, p0: float,
                  certificate: Certificate) -> SequentialRule:
        """The rule recorded in a counts file's metadata, for these sigmas, alpha and p0."""
        return cls(tuple(sigmas), alpha, p0, tuple(meta["looks"]), tuple(meta["look_weights"]),
                   meta["radius_tolerance"], certificate, meta.get("stopping", "tolerance"),
                   tuple(meta.get("target_radii", RADIUS_GRID)))


def sequential_rule(smoothing: dict) -> SequentialRule:
    """The look schedule and stopping rule of a config's `smoothing` section."""
    return SequentialRule.from_settings(
        smoothing["sigmas"], smoothing["alpha"], smoothing["p0"], smoothing["n"],
        smoothing["noise_block"], smoothing["first_look"], smoothing["look_growth"],
        smoothing["radius_tolerance"], Certificate.from_settings(smoothing),
        smoothing["stopping"], smoothing["target_radii"] or RADIUS_GRID,
    )


# --------------------------------------------------------------------------------------------
# Terms of the radius
# --------------------------------------------------------------------------------------------


def _quantile(p):
    """Phi^-1 of bounds clipped to [0, 1]: -inf at 0, +inf at 1, never nan (as in stats)."""
    return norm.ppf(np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0))


def _bounds(k: np.ndarray, n, level: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper-Pearson (lower, upper) bounds of k out of n, each at `level`."""
    lower = np.atleast_1d(clopper_pearson_lower(k, n, level))
    upper = np.atleast_1d(clopper_pearson_upper(k, n, level))
    return lower, upper


def _own_term(lower: np.ndarray, sigma: float, p0: float) -> np.ndarray:
    """sigma * (Phi^-1(pA_low) - Phi^-1(p0))."""
    return sigma * (_quantile(lower) - float(_quantile(p0)))


def _cap(estimate: np.ndarray, used: np.ndarray, c_hat: int, scale: int, stage: int,
         rule: SequentialRule) -> float:
    """The smallest off-class term of the scales above `scale` (each deferred), for a
    certificate of c_hat at `stage`: each at this stage's alpha and its own stopped look."""
    cap = math.inf
    z_p0 = float(_quantile(rule.p0))
    for j in range(scale + 1, len(rule.sigmas)):
        level = rule.level(stage, rule.looks.index(int(used[j])))
        p_b_high = off_class_upper_bound(estimate[j], c_hat, level)
        # p_b_high = 1 gives -inf here, hence abstention: never nan.
        cap = min(cap, rule.sigmas[j] * (z_p0 - float(_quantile(p_b_high))))
    return cap


# --------------------------------------------------------------------------------------------
# The certificate from stopped counts
# --------------------------------------------------------------------------------------------


def _check_used(select: np.ndarray, estimate: np.ndarray, used: np.ndarray, rows: np.ndarray,
                scale: int, rule: SequentialRule) -> np.ndarray:
    """Look indices of these rows at `scale`; a ValueError unless each has selection votes and
    used a look of the schedule in full."""
    unselected = select[rows, scale].sum(axis=1) == 0
    if np.any(unselected):
        raise ValueError(
            f"image at row {int(rows[np.flatnonzero(unselected)[0]])}: the cascade reached "
            f"scale index {scale} (sigma={rule.sigmas[scale]:g}) but it was not sampled"
        )
    draws = used[rows, scale]
    looks = np.asarray(rule.looks)
    index = np.searchsorted(looks, draws)
    bad = (index >= len(looks)) | (looks[np.minimum(index, len(looks) - 1)] != draws)
    bad |= estimate[rows, scale].sum(axis=1) != draws
    if np.any(bad):
        row = int(rows[np.flatnonzero(bad)[0]])
        if draws[np.flatnonzero(bad)[0]] == 0:
            raise ValueError(
                f"image at row {row}: the cascade reached scale index {scale} "
                f"(sigma={rule.sigmas[scale]:g}) but it was not sampled"
            )
        raise ValueError(
            f"image at row {row}: scale index {scale} used {int(used[row, scale])} draws "
            f"and holds {int(estimate[row, scale].sum())} votes; both must equal one of the "
            f"looks {list(rule.looks)}"
        )
    return index


def _stage_outcome(select, c_hat, estimate, used, rows, scale, stage, rule):
    """(decision [rows], lower bound [rows]) of the rows at `stage`, each at its own look."""
    look = _check_used(select, estimate, used, rows, scale, rule)
    decision = np.empty(len(rows), np.int64)
    lower = np.empty(len(rows), np.float64)
    for at in np.unique(look):
        mine = look == at
        hits = estimate[rows[mine], scale, c_hat[rows[mine]]]
        lo, hi = _bounds(hits, rule.looks[at], rule.level(stage, int(at)))
        lower[mine] = lo
        decision[mine] = rule.certificate.decide(lo, hi, rule.p0)
    return decision, lower


def certify_sequential_table(select, estimate, used, rule: SequentialRule):
    """The certificate of docs/design.md §1.5 for [I, K, C] counts and [I, K] draws used.

    Returns (predict [I] int64, radius [I] float64, stage [I] int64), as stats.certify_table.
    With rule.looks = (n,) and weights (1,) it equals the fixed-n cascade.
    """
    select = _as_counts(select, "select", ndim=3)
    estimate = _as_counts(estimate, "estimate", ndim=3)
    used = _as_counts(used, "used", ndim=2)
    num_images, num_scales = select.shape[:2]
    if estimate.shape != select.shape or used.shape != (num_images, num_scales):
        raise ValueError(f"select {select.shape}, estimate {estimate.shape} and used "
                        f"{used.shape} must be [I, K, C], [I, K, C] and [I, K]")
    if num_scales != len(rule.sigmas):
        raise ValueError(f"counts have {num_scales} scales, the rule {len(rule.sigmas)}")
    predict = np.full(num_images, ABSTAIN, np.int64)
    radius = np.zeros(num_images, np.float64)
    stage_of = np.full(num_images, -1, np.int64)
    c_hat = np.zeros(num_images, np.int64)
    active = np.arange(num_images)
    for stage in range(num_scales):
        if not len(active):
            break
        scale = num_scales - 1 - stage
        c_hat[active] = np.argmax(select[active, scale], axis=1)
        decision, lower = _stage_outcome(select, c_hat, estimate, used, active, scale, stage,
                                         rule)
        ends = active[decision != DEFER]
        stage_of[ends] = scale
        own = _own_term(lower, rule.sigmas[scale], rule.p0)
        certified = decision == CERTIFY
        for row, term in zip(active[certified], own[certified], strict=True):
            cap = _cap(estimate[row], used[row], int(c_hat[row]), scale, stage, rule)
            if min(float(term), cap) >= 0:
                predict[row], radius[row] = c_hat[row], min(float(term), cap)
        active = active[decision == DEFER]
    return predict, radius, stage_of


def certify_sequential(select, estimate, used, rule: SequentialRule) -> tuple[int, float, int]:
    """certify_sequential_table for one image: [K, C] counts and [K] draws used."""
    predict, radius, stage = certify_sequential_table(
        np.asarray(select)[None], np.asarray(estimate)[None], np.asarray(used)[None], rule
    )
    return int(predict[0]), float(radius[0]), int(stage[0])


# --------------------------------------------------------------------------------------------
# The stopping rule
# --------------------------------------------------------------------------------------------


class CountSource(Protocol):
    """Where the votes come from: the shard sampler's model passes or a simulation."""

    num_classes: int

    def select(self, rows: np.ndarray, scale: int) -> np.ndarray:
        """Votes [len(rows), C] of the n0 selection draws of these images at `scale`."""

    def estimate(self, rows: np.ndarray, scale: int, look: int) -> np.ndarray:
        """Votes [len(rows), C] of estimation draws looks[look - 1] .. looks[look] - 1
        (from draw 0 at look 0) of these images at `scale`."""


@dataclass
class SequentialRun:
    """Stopped counts of a sequential run and their certificates."""

    select: np.ndarray  # [I, K, C]
    estimate: np.ndarray  # [I, K, C]: the votes of the draws used
    used: np.ndarray  # [I, K]: estimation draws used (a look, or 0 if never reached)
    predict: np.ndarray  # [I]
    radius: np.ndarray  # [I]
    stage: np.ndarray  # [I]


def _projected(count: np.ndarray, n_look: int, n: int, up: bool) -> np.ndarray:
    """count * n / n_look rounded up (or down) in integer arithmetic, at most n."""
    scaled = -(-count * n // n_look) if up else count * n // n_look
    return np.minimum(scaled, n)


def _gain(reach: np.ndarray, now: np.ndarray) -> np.ndarray:
    """reach - now, 0 where they are equal (also both -inf: nothing to gain, not nan)."""
    with np.errstate(invalid="ignore"):
        return np.where(reach == now, 0.0, reach - now)


def _bucket(radius: np.ndarray, rule: SequentialRule) -> np.ndarray:
    """How many of the target radii a radius reaches (0: below all of them)."""
    return np.searchsorted(np.asarray(rule.target_radii), radius, side="right")


def _settled(now: np.ndarray, reach: np.ndarray, rule: SequentialRule) -> np.ndarray:
    """Whether going on cannot matter: `radii`, the reachable radius lies in the same bucket of
    the target radii as the current one; `tolerance`, it gains less than the tolerance."""
    if rule.stopping == "radii":
        return _bucket(reach, rule) <= _bucket(now, rule)
    return _gain(reach, now) < rule.radius_tolerance


def _certifiable_stops(rows, c_hat, lower, hits, estimate, used, scale, stage, look, rule,
                       caps: dict) -> np.ndarray:
    """Certify now unless the radius reachable at n is unsettled: at the current share of
    c_hat (`tolerance`), or at its plausible upper bound (`radii`)."""
    for row in rows:
        if int(row) not in caps:
            caps[int(row)] = _cap(estimate[row], used[row], int(c_hat[row]), scale, stage, rule)
    cap = np.array([caps[int(row)] for row in rows], np.float64)
    sigma, n, n_look = rule.sigmas[scale], rule.n, rule.looks[look]
    now = np.minimum(_own_term(lower, sigma, rule.p0), cap)
    if rule.stopping == "radii":
        share = clopper_pearson_upper(hits, n_look, PLAUSIBLE)
        projected = np.minimum(np.ceil(np.asarray(share) * n).astype(np.int64), n)
    else:
        projected = _projected(hits, n_look, n, up=True)
    reach_lower = clopper_pearson_lower(projected, n, rule.level(stage, len(rule.looks) - 1))
    reach = np.minimum(_own_term(np.atleast_1d(reach_lower), sigma, rule.p0), cap)
    return _settled(now, reach, rule)


def _rivals(counts: np.ndarray, c_hat: np.ndarray, rule: SequentialRule) -> np.ndarray:
    """[R, rows]: the counts whose off-class term a deferring scale's stop must weigh. The
    later stage's class is not known yet: `tolerance` takes the largest class other than
    c_hat; `radii` the two largest classes, so that the term is settled whichever of them
    the later stage certifies against (the top class, or another one)."""
    if rule.stopping == "radii":
        return -np.sort(-counts, axis=1)[:, :2].T
    others = counts.copy()
    others[np.arange(len(others)), c_hat] = -1
    return others.max(axis=1)[None]


def _deferring_stops(others, scale, stage, look, rule) -> np.ndarray:
    """Defer now unless this scale's off-class term for the next stage is unsettled at n
    (a single-class Clopper-Pearson proxy of that term): at the current share of the
    largest other class (`tolerance`), or at its plausible lower bound (`radii`)."""
    if stage == len(rule.sigmas) - 1:
        return np.ones(np.shape(others), bool)  # the smallest scale: no later stage to serve
    n_look, n, last = rule.looks[look], rule.n, len(rule.looks) - 1
    z_p0 = float(_quantile(rule.p0))
    sigma = rule.sigmas[scale]
    now = clopper_pearson_upper(others, n_look, rule.level(stage + 1, look))
    if rule.stopping == "radii":
        share = clopper_pearson_lower(others, n_look, PLAUSIBLE)
        projected = np.floor(np.asarray(share) * n).astype(np.int64)
    else:
        projected = _projected(others, n_look, n, up=False)
    reach = clopper_pearson_upper(projected, n, rule.level(stage + 1, last))
    term_now = np.atleast_1d(sigma * (z_p0 - _quantile(now)))
    term_reach = np.atleast_1d(sigma * (z_p0 - _quantile(reach)))
    return _settled(term_now, term_reach, rule)


def _undecidable_stops(hits, stage, look, rule) -> np.ndarray:
    """Stop now iff no later look can change the outcome, whatever its draws: not certify even
    if every remaining draw votes c_hat, nor (under the paper's rule, where the band
    abstains, and where a later stage follows) defer even if none does."""
    n_look = rule.looks[look]
    decidable = np.zeros(len(hits), bool)
    band_abstains = rule.certificate.rule == PAPER and stage < len(rule.sigmas) - 1
    for later in range(look + 1, len(rule.looks)):
        draws, level = rule.looks[later], rule.level(stage, later)
        best = clopper_pearson_lower(hits + (draws - n_look), draws, level)
        decidable |= np.atleast_1d(best) >= rule.p0
        if band_abstains:
            decidable |= np.atleast_1d(clopper_pearson_upper(hits, draws, level)) < rule.p0
    return ~decidable


def _look(select, estimate, used, rows, scale, stage, look, rule, caps):
    """(stop [rows], decision [rows]) at this look: docs/design.md §1.5, the stopping rule."""
    c_hat = np.zeros(select.shape[0], np.int64)
    c_hat[rows] = np.argmax(select[rows, scale], axis=1)
    counts = estimate[rows, scale]
    hits = counts[np.arange(len(rows)), c_hat[rows]]
    lower, upper = _bounds(hits, rule.looks[look], rule.level(stage, look))
    decision = rule.certificate.decide(lower, upper, rule.p0)
    if look == len(rule.looks) - 1:
        return np.ones(len(rows), bool), decision
    stop = np.zeros(len(rows), bool)
    mine = decision == CERTIFY
    if mine.any():
        stop[mine] = _certifiable_stops(rows[mine], c_hat, lower[mine], hits[mine], estimate,
                                        used, scale, stage, look, rule, caps)
    # Below p0 for sure: the draws matter only through the off-class term for later stages.
    mine = (decision != CERTIFY) & (upper < rule.p0)
    if mine.any():
        stop[mine] = _deferring_stops(_rivals(counts[mine], c_hat[rows[mine]], rule), scale,
                                      stage, look, rule).all(axis=0)
    # The undecidable band (the paper's rule abstains there, the split rule defers).
    mine = (decision != CERTIFY) & (upper >= rule.p0)
    if mine.any():
        stop[mine] = _undecidable_stops(hits[mine], stage, look, rule)
    return stop, decision


def run_sequential(source: CountSource, num_images: int, rule: SequentialRule) -> SequentialRun:
    """Draw and stop per docs/design.md §1.5; certificates from the stopped counts.

    Stage by stage from the largest scale, look by look: the images still at a scale get
    the estimation draws up to the next look, and each image stops or continues on its own
    counts alone. An image goes on to the next stage iff its scale stopped deferring.
    """
    num_scales, num_classes = len(rule.sigmas), source.num_classes
    select = np.zeros((num_images, num_scales, num_classes), np.int64)
    estimate = np.zeros_like(select)
    used = np.zeros((num_images, num_scales), np.int64)
    active = np.arange(num_images)
    for stage in range(num_scales):
        if not len(active):
            break
        scale = num_scales - 1 - stage
        select[active, scale] = source.select(active, scale)
        rows, deferred, caps = active, [], {}
        for look in range(len(rule.looks)):
            estimate[rows, scale] += source.estimate(rows, scale, look)
            used[rows, scale] = rule.looks[look]
            stop, decision = _look(select, estimate, used, rows, scale, stage, look, rule, caps)
            deferred.append(rows[stop & (decision == DEFER)])
            rows = rows[~stop]
            if not len(rows):
                break
        active = np.sort(np.concatenate(deferred))
    predict, radius, stage_of = certify_sequential_table(select, estimate, used, rule)
    return SequentialRun(select, estimate, used, predict, radius, stage_of)
