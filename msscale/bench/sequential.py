"""Simulated certification: `full`, `cascade` and `sequential` without a model pass.

Each image's true class probabilities per scale are taken from a counts file of a `full`
run (its estimation votes plus a small prior, normalised), and votes are drawn from them as
multinomial counts. The three schedules share the draws: the estimation votes of look l are
drawn once per image and scale, `full` and `cascade` sum all of them (n draws), `sequential`
uses those up to the look where it stops. So the comparison is paired: the differences
between schedules come from the schedules, not from different luck.

`full` and `cascade` give the same certificates from the same draws (the cascade schedule
samples exactly the scales the cascade reaches); they differ in model evaluations. An
image's model evaluations are its selection draws (n0 per scale reached) plus its
estimation draws.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from msscale.certify.counts import Counts
from msscale.errors import UserError
from msscale.smoothing.certificate import DEFAULT_CERTIFICATE, Certificate
from msscale.smoothing.sequential import (
    SequentialRule,
    certify_sequential_table,
    run_sequential,
)
from msscale.smoothing.stats import floor_decimals

log = logging.getLogger(__name__)

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)


def true_probabilities(counts: Counts, prior: float) -> np.ndarray:
    """[I, K, C] class probabilities: estimation votes plus `prior` per class, normalised."""
    if not prior > 0:
        raise UserError(f"the prior must be > 0, got {prior!r}")
    sampled = counts.estimate.sum(axis=2)
    if np.any(sampled == 0):
        raise UserError("the simulation needs counts of a `full` run (every image sampled at "
                        "every scale); these have scales without votes")
    probs = counts.estimate + prior
    return probs / probs.sum(axis=2, keepdims=True)


class PairedDraws:
    """Multinomial votes drawn once: selection [I, K, C] and estimation per look [I, K, L, C]."""

    def __init__(self, probs: np.ndarray, n0: int, looks: tuple[int, ...], seed: int):
        rng = np.random.default_rng(seed)
        self.num_classes = probs.shape[2]
        self.looks = looks
        self.selection = rng.multinomial(n0, probs)
        steps = np.diff((0, *looks))
        self.increments = np.stack([rng.multinomial(step, probs) for step in steps], axis=2)

    def total(self) -> np.ndarray:
        """Estimation votes of all n draws [I, K, C]."""
        return self.increments.sum(axis=2)

    # The CountSource protocol of msscale.smoothing.sequential.
    def select(self, rows: np.ndarray, scale: int) -> np.ndarray:
        return self.selection[rows, scale]

    def estimate(self, rows: np.ndarray, scale: int, look: int) -> np.ndarray:
        return self.increments[rows, scale, look]


def _accuracy(predict, radius, label, radii) -> dict[str, float]:
    """Certified accuracy at `radii` from radii floored to 6 decimals (as report.py writes)."""
    radius = floor_decimals(np.asarray(radius, np.float64), 6)
    correct = predict == label
    return {f"{r}": float(np.mean(correct & (radius >= r))) for r in radii}


def _figures(evaluations: np.ndarray, predict, radius, labels, radii) -> dict:
    return {
        "evaluations_per_image": float(evaluations.mean()),
        "certified_accuracy": _accuracy(predict, radius, labels, radii),
    }


def simulate(probs: np.ndarray, label: np.ndarray, rule: SequentialRule, n0: int,
             tolerances: tuple[float, ...] | None = None, replicates: int = 1,
             seed: int = 0, radii: tuple[float, ...] | None = None) -> dict:
    """Figures of `full`, `cascade` and `sequential` for `replicates` simulated runs over these
    images, on shared draws: one `sequential` row per radius tolerance (default: the rule's
    own stopping), and with `radii` one that decides those radii (stopping=radii), whose
    certified accuracy every row reports (default RADII)."""
    num_images, num_scales = probs.shape[:2]
    rows = np.tile(probs, (replicates, 1, 1))
    labels = np.tile(np.asarray(label, np.int64), replicates)
    draws = PairedDraws(rows, n0, rule.looks, seed)
    log.info("simulating n=%d over %d images x %d replicates", rule.n, num_images, replicates)
    # The fixed-n cascade, as the one-look sequential certificate (the same numbers as
    # stats.certify_table, vectorised over images).
    fixed_n = replace(rule, looks=(rule.n,), weights=(1.0,))
    used = np.full((len(rows), num_scales), rule.n)
    predict, radius, stage = certify_sequential_table(draws.selection, draws.total(), used,
                                                      fixed_n)
    reached = np.where(stage >= 0, num_scales - stage, num_scales)
    columns = RADII if radii is None else tuple(radii)
    schedules = {
        "full": _figures(np.full(len(rows), num_scales * (n0 + rule.n)), predict, radius,
                         labels, columns),
        "cascade": _figures(reached * (n0 + rule.n), predict, radius, labels, columns),
    }
    rules = {}
    if tolerances is None and radii is None:
        rules[f"sequential {rule.stopping}"] = rule
    for tol in tolerances or ():
        rules[f"sequential tol={tol:g}"] = replace(rule, radius_tolerance=tol,
                                                   stopping="tolerance")
    if radii is not None:
        rules["sequential radii"] = replace(rule, stopping="radii", target_radii=columns)
    for name, sequential in rules.items():
        run = run_sequential(draws, len(rows), sequential)
        evaluations = (run.used > 0).sum(axis=1) * n0 + run.used.sum(axis=1)
        schedules[name] = _figures(evaluations, run.predict, run.radius, labels, columns)
    return {
        "n": rule.n, "n0": n0, "images": num_images, "replicates": replicates,
        "alpha": rule.alpha, "p0": rule.p0, "sigmas": list(rule.sigmas),
        **rule.certificate.to_meta(), "looks": list(rule.looks), "radii": list(columns),
        "schedules": schedules,
    }


def radius_header(width: int, radii=RADII) -> str:
    """The r=... column titles of a certified-accuracy table, each `width` wide."""
    return "".join(f"{'r=' + str(r):>{width}}" for r in radii)


def accuracy_cells(row: dict, width: int, radii=RADII) -> str:
    """A schedule's certified accuracy (%) at `radii`, each cell `width` wide."""
    return "".join(f"{100 * row['certified_accuracy'][str(r)]:>{width}.1f}" for r in radii)


def format_simulation(results: list[dict]) -> str:
    """One table per n: model evaluations per image, how many times fewer than `cascade`,
    and certified accuracy (%) at each radius, per schedule."""
    lines = []
    for result in results:
        cascade = result["schedules"]["cascade"]["evaluations_per_image"]
        lines += [
            f"n={result['n']}, n0={result['n0']}, {result['images']} images x "
            f"{result['replicates']} replicates, alpha={result['alpha']}, p0={result['p0']}, "
            f"sigmas={result['sigmas']}, {result['certificate']} certificate, "
            f"looks={result['looks']}",
            f"{'schedule':22}{'evals/image':>12}{'vs cascade':>11}"
            f"{radius_header(8, result['radii'])}",
        ]
        for name, row in result["schedules"].items():
            evals = row["evaluations_per_image"]
            lines.append(f"{name:22}{evals:>12.0f}{cascade / evals:>10.2f}x"
                         f"{accuracy_cells(row, 8, result['radii'])}")
        lines.append("")
    return "\n".join(lines)


def run_simulation(counts_path, ns=(10_000, 100_000), tolerances=(0.02,), *, n0=100,
                   alpha=None, p0=None, noise_block=100, first_look=None, look_growth=2.0,
                   prior=0.01, replicates=10, seed=0, radii=RADII,
                   certificate: Certificate = DEFAULT_CERTIFICATE) -> list[dict]:
    """The simulation at each n from the counts file of a `full` run; alpha and p0 default
    to the run's; first_look None is n / 100."""
    from msscale.certify.counts import load_counts

    counts = load_counts(counts_path)
    probs = true_probabilities(counts, prior)
    alpha = counts.meta.get("alpha") if alpha is None else alpha
    p0 = counts.meta.get("p0") if p0 is None else p0
    if alpha is None or p0 is None:
        raise UserError(f"{counts_path} records no alpha or p0: give --alpha and --p0")
    if min(n0, replicates) < 1:
        raise UserError("n0 and replicates must be at least 1")
    results = []
    for n in ns:
        try:  # the settings come from a user here
            rule = SequentialRule.from_settings(counts.sigmas, alpha, p0, n, noise_block,
                                                first_look, look_growth, 0.0, certificate,
                                                "radii", radii)
            for tol in tolerances:
                replace(rule, radius_tolerance=tol)
        except ValueError as err:
            raise UserError(f"cannot simulate n={n}: {err}") from None
        result = simulate(probs, counts.label, rule, n0, tuple(tolerances), replicates, seed,
                          tuple(radii))
        results.append({**result, "counts": str(counts_path), "prior": prior})
    return results
