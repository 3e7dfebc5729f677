"""Certificates from counts, and the files people read: certify.tsv, summary.json, report.md,
certified_accuracy.png and TensorBoard scalars."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msscale.atomic import atomic_path, atomic_write_text
from msscale.certify.counts import Counts
from msscale.errors import UserError
from msscale.smoothing.certificate import PAPER, Certificate
from msscale.smoothing.sequential import RADIUS_GRID, SequentialRule, certify_sequential_table
from msscale.smoothing.stats import (
    certify_table,
    clopper_pearson_lower,
    clopper_pearson_upper,
    floor_decimals,
)

log = logging.getLogger(__name__)

#: The files write_results writes (and tb/): none may be the counts they are made from.
REPORT_FILES = ("certify.tsv", "summary.json", "report.md", "certified_accuracy.png")
TSV_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\tstage\tsigma"
CONFIDENCE = 0.95  # of the intervals over images that reports give with each figure
PAPER_METHOD = "cascade, paper's rule"  # a full run's cascade again, under the paper's rule


@dataclass
class Certificates:
    """Per-image outcome of one method (the cascade over some scales, or one scale)."""

    index: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    radius: np.ndarray  # already floored to 6 decimals: the written value is the certified one
    stage: np.ndarray  # index into the *full* ascending sigmas of the counts, -1 if none
    sigmas: np.ndarray  # the full ascending sigmas of the counts

    @property
    def correct(self) -> np.ndarray:
        return (self.predict == self.label).astype(np.int64)


def select_scales(counts: Counts, sigmas: list[float] | None) -> list[int]:
    """Column indices of `sigmas` in the counts (all of them when None)."""
    if sigmas is None:
        return list(range(len(counts.sigmas)))
    columns = []
    for sigma in sorted(sigmas):
        match = np.flatnonzero(np.isclose(counts.sigmas, sigma, rtol=0, atol=1e-9))
        if len(match) == 0:
            raise UserError(
                f"sigma {sigma} is not in the counts (they have {counts.sigmas.tolist()})"
            )
        columns.append(int(match[0]))
    return columns


def certify_counts(counts: Counts, alpha: float, p0: float, sigmas=None,
                   certificate: Certificate | None = None) -> Certificates:
    """The cascade certificate (docs/design.md §1.2) over `sigmas` (default: all), from counts;
    for counts of the `sequential` schedule, at the levels of the recorded look schedule
    (docs/design.md §1.5). `certificate` defaults to the one the counts record."""
    if not len(counts.index):  # every summary would be a mean over nothing: NaN
        raise UserError("the counts hold no images: there is nothing to certify")
    if sigmas is not None and not sigmas:
        raise UserError("no scales given: name at least one sigma")
    columns = select_scales(counts, sigmas)
    select, estimate = counts.select[:, columns], counts.estimate[:, columns]
    try:  # the statistics check their arguments; here those come from a user
        if certificate is None:
            certificate = Certificate.from_meta(counts.meta)
        if counts.meta.get("schedule") == "sequential":
            rule = SequentialRule.from_meta(counts.meta, counts.sigmas[columns], alpha, p0,
                                            certificate)
            predict, radius, stage = certify_sequential_table(
                select, estimate, counts.used[:, columns], rule
            )
        else:
            predict, radius, stage = certify_table(select, estimate, counts.sigmas[columns],
                                                   alpha, p0, certificate)
    except ValueError as err:
        raise UserError(f"cannot certify these counts: {err}") from None
    full_stage = np.where(stage >= 0, np.asarray(columns)[np.maximum(stage, 0)], -1)
    return Certificates(
        counts.index,
        counts.label,
        np.asarray(predict, np.int64),
        floor_decimals(np.asarray(radius, np.float64), 6),
        full_stage.astype(np.int64),
        counts.sigmas,
    )


def level(counts: Counts, key: str, given: float | None) -> float:
    """`alpha` or `p0`: the one given on the command line, else the counts' own."""
    if given is not None:
        return given
    if key not in counts.meta:
        raise UserError(f"the counts' metadata has no {key}: pass --{key}")
    return counts.meta[key]


def write_tsv(certs: Certificates, path: str | Path) -> None:
    """certify.tsv: idx label predict radius correct stage sigma (docs/design.md §3.3)."""
    lines = [TSV_HEADER]
    for i in range(len(certs.index)):
        stage = int(certs.stage[i])
        sigma = float(certs.sigmas[stage]) if stage >= 0 else 0.0
        lines.append(
            f"{certs.index[i]}\t{certs.label[i]}\t{certs.predict[i]}\t{certs.radius[i]:.6f}"
            f"\t{certs.correct[i]}\t{stage}\t{sigma:g}"
        )
    atomic_write_text(path, "\n".join(lines) + "\n")


def method_summary(certs: Certificates) -> dict:
    """Certified accuracy on the radius grid, ACR, abstention rate, per-stage counts."""
    correct = certs.correct.astype(bool)
    accuracy = {f"{r}": float(np.mean(correct & (certs.radius >= r))) for r in RADIUS_GRID}
    stages = {
        f"{certs.sigmas[s]:g}": int(np.sum(certs.stage == s)) for s in range(len(certs.sigmas))
    }
    stages["none"] = int(np.sum(certs.stage == -1))
    return {
        "acr": float(np.mean(np.where(correct, certs.radius, 0.0))),
        "abstain": float(np.mean(certs.predict == -1)),
        "certified_accuracy": accuracy,
        "stages": stages,
    }


def main_method(counts: Counts) -> str:
    """The name of a run's own certificate: `sequential` for that schedule, else `cascade`."""
    return "sequential" if counts.meta.get("schedule") == "sequential" else "cascade"


def methods_of(counts: Counts, alpha: float, p0: float) -> dict[str, Certificates]:
    """The run's certificate over every scale (the cascade, or the sequential one), plus,
    when every scale was sampled, the cascade under the paper's rule (if the run's is
    another) and each single scale."""
    methods = {main_method(counts): certify_counts(counts, alpha, p0)}
    if len(counts.sigmas) > 1 and counts.meta.get("schedule", "full") == "full":
        if Certificate.from_meta(counts.meta).rule != PAPER:
            methods[PAPER_METHOD] = certify_counts(counts, alpha, p0, None, Certificate(PAPER))
        for sigma in counts.sigmas:
            methods[f"sigma={sigma:g}"] = certify_counts(counts, alpha, 0.5, [float(sigma)])
    return methods


def summarize_methods(methods: dict[str, Certificates]) -> dict:
    return {name: method_summary(certs) for name, certs in methods.items()}


def write_results(out: str | Path, counts: Counts, alpha: float, p0: float) -> dict:
    """certify.tsv (the cascade), summary.json, report.md, certified_accuracy.png, tb/."""
    out = Path(out)
    methods = methods_of(counts, alpha, p0)
    write_tsv(methods[main_method(counts)], out / "certify.tsv")
    summary = {
        "methods": summarize_methods(methods),
        "images": int(len(counts.index)),
        "n": counts.meta.get("n"),
        "n0": counts.meta.get("n0"),
        "alpha": alpha,
        "p0": p0,
        "sigmas": counts.sigmas.tolist(),
        "schedule": counts.meta.get("schedule"),
        **Certificate.from_meta(counts.meta).to_meta(),
        "evaluations_per_image": evaluations_summary(counts, methods[main_method(counts)]),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_comparison(out, methods, summary)
    return summary


def evaluations_summary(counts: Counts, certs: Certificates) -> dict:
    """Model evaluations per image: the mean, its selection and estimation parts, the mean
    at each scale, and per schedule: the run's own, and for a `full` run also what the
    `cascade` schedule draws for the same certificates (every scale down to the deciding
    one, n0 + n draws each)."""
    schedule = counts.meta.get("schedule", "full")
    per_schedule = {schedule: float(counts.evaluations.mean())} if len(counts.index) else {}
    if schedule == "full" and len(counts.index):
        draws = counts.meta["n0"] + counts.meta["n"]
        num_scales = len(counts.sigmas)
        reached = np.where(certs.stage >= 0, num_scales - certs.stage, num_scales)
        per_schedule["cascade"] = float(np.mean(reached * draws))
    mean = (lambda x: float(x.mean())) if len(counts.index) else (lambda x: 0.0)
    return {
        "mean": mean(counts.evaluations),
        "selection": mean(counts.select.sum(axis=(1, 2))),
        "estimation": mean(counts.used.sum(axis=1)),
        "by_scale": {f"{s:g}": mean(counts.select[:, k].sum(axis=1) + counts.used[:, k])
                     for k, s in enumerate(counts.sigmas)},
        "schedules": per_schedule,
    }


def write_comparison(out: Path, methods: dict[str, Certificates], summary: dict) -> None:
    """report.md, certified_accuracy.png and TensorBoard curves for these methods."""
    plot_certified_accuracy(methods, out / "certified_accuracy.png")
    atomic_write_text(out / "report.md", render_markdown(summary))
    log_to_tensorboard(methods, out / "tb")


def _curve(certs: Certificates, radii: np.ndarray) -> np.ndarray:
    correct = certs.correct.astype(bool)
    return np.array([np.mean(correct & (certs.radius >= r)) for r in radii])


def plot_certified_accuracy(methods: dict[str, Certificates], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(2.0, max(float(c.radius.max(initial=0.0)) for c in methods.values()) * 1.05)
    radii = np.linspace(0, top, 400)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    cascade_colors = iter(["black", "tab:red", "tab:purple", "tab:brown"])
    # Single scales are drawn dashed and on top, so a cascade that equals one stays visible.
    for name, certs in methods.items():
        if name.startswith(PAPER_METHOD):  # on top of the cascade it is compared with
            style = {"linewidth": 2, "linestyle": ":", "color": next(cascade_colors, None),
                     "zorder": 4}
        elif name.startswith(("cascade", "sequential")):
            style = {"linewidth": 3, "color": next(cascade_colors, None), "zorder": 2}
        else:
            style = {"linewidth": 1.5, "linestyle": "--", "zorder": 3}
        ax.plot(radii, 100 * _curve(certs, radii), label=_legend_label(name), **style)
    ax.set_title("Share of images predicted correctly and certified at radius >= r",
                 fontsize=10)
    ax.set_xlabel("L2 radius r (pixel scale [0,1])")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)  # beside the axes
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _legend_label(name: str) -> str:
    """'sigma=0.5' -> 'sigma=0.5 alone (Cohen et al.)'; other names unchanged."""
    return f"{name} alone (Cohen et al.)" if name.startswith("sigma=") else name


def accuracy_interval(k: int, images: int) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval, at CONFIDENCE, of k images out of `images`."""
    tail = (1 - CONFIDENCE) / 2
    return (float(clopper_pearson_lower(k, images, tail)),
            float(clopper_pearson_upper(k, images, tail)))


def _percent_cell(share: float, images: int) -> str:
    """'93.0 [86, 97]': a share of the images in %, with its interval."""
    low, high = accuracy_interval(round(share * images), images)
    return f"{100 * share:.1f} [{100 * low:.0f}, {100 * high:.0f}]"


def render_markdown(summary: dict) -> str:
    """A table a person can read without the code: one row per method."""
    grid, images = list(RADIUS_GRID), summary["images"]
    header = "| method | " + " | ".join(f"r={r}" for r in grid) + " | ACR | abstain (%) |"
    rule = "|" + "---|" * (len(grid) + 3)
    rows = []
    for name, m in summary["methods"].items():
        cells = " | ".join(_percent_cell(m["certified_accuracy"][str(r)], images) for r in grid)
        abstain = _percent_cell(m["abstain"], images)
        rows.append(f"| {name} | {cells} | {m['acr']:.3f} | {abstain} |")
    decided = [
        f"- {name}: "
        + ", ".join(f"{k if k == 'none' else f'sigma={k}'}: {v}" for k, v in m["stages"].items())
        for name, m in summary["methods"].items()
        if name.startswith(("cascade", "sequential"))
    ]
    settings = ", ".join(
        f"{key}={summary[key]}"
        for key in ("n0", "n", "alpha", "p0", "sigmas", "schedule", "certificate", "stage_shares")
        if key in summary
    )
    per_schedule = summary.get("evaluations_per_image", {}).get("schedules", {})
    cost = [
        "Model evaluations per image (selection and estimation draws, mean): "
        + ", ".join(f"{name} schedule {value:.0f}" for name, value in per_schedule.items())
        + ". The sequential schedule stops a scale's estimation draws early "
        "(docs/design.md §1.5); n is the most it draws.",
        "",
    ] if per_schedule else []
    return "\n".join(
        [
            "# Certification report",
            "",
            f"{summary['images']} images; {settings}.",
            "",
            *cost,
            "Certified accuracy (%) at L2 radius r (pixel scale [0,1]): the share of images whose",
            "prediction is correct and certified at a radius of at least r (r=0.0: correct and",
            "not abstained). ACR is the average certified radius (0 for wrong or abstained",
            "images); abstain is the share of images given no prediction. Single-scale rows",
            "(sigma=...) are Cohen et al.'s CERTIFY at that sigma alone; the cascade tries the",
            "largest sigma first and defers to a smaller one where it cannot certify its top",
            "class above p0 (split rule: each scale spends its share of alpha, and every",
            "certificate holds with probability at least 1 - alpha; the paper's rule spends",
            "alpha/(s+1) at the s-th scale tried and abstains where p0 lies inside the interval,",
            "and may exceed alpha, docs/design.md §1.2). n0 and n are the selection and",
            "estimation draws per image and scale. In brackets: the two-sided",
            f"{100 * CONFIDENCE:.0f}% Clopper-Pearson interval of each share over the {images} "
            "images.",
            "",
            header,
            rule,
            *rows,
            "",
            "Number of images by the scale where the cascade stopped, certifying or abstaining",
            "(none: every scale deferred, so it abstained):",
            *decided,
            "",
            "![certified accuracy](certified_accuracy.png)",
            "",
        ]
    )


def log_to_tensorboard(methods: dict[str, Certificates], logdir: Path) -> None:
    """Certified accuracy against radius (step = radius in 1/100) for each method."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(logdir))
    try:
        for name, certs in methods.items():
            radii = np.arange(0, 201) / 100
            for step, value in enumerate(_curve(certs, radii)):
                writer.add_scalar(f"certified_accuracy/{name}", float(value), global_step=step)
            summary = method_summary(certs)
            writer.add_scalar(f"acr/{name}", summary["acr"], 0)
            writer.add_scalar(f"abstain/{name}", summary["abstain"], 0)
    finally:
        writer.close()
