"""`msscale ablate-calibration`: what diffusion calibration does to the cascade, measured.

Each setting of the config fine-tunes the demo's UNet on the digits with its own overrides
of the embedded fine-tuning config (or keeps the pretrained UNet: `null`), then certifies
the same test digits under the `full` schedule. One set of counts per setting gives the
cascade (at every `p0` of the config, offline, as `msscale recertify` would) and Cohen's
CERTIFY at each single scale *with that setting's denoiser*, so a gain of the cascade can
be told apart from a better denoiser at one scale. Every figure is a count of images with a
two-sided 95% Clopper-Pearson interval; the reading of the results is docs/calibration.md.

Settings are run in order and kept: a re-run reuses the fine-tuned UNet and the certified
shards of every setting that finished and resumes the one that did not.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from msscale.atomic import atomic_write_text
from msscale.bench.sequential import RADII
from msscale.certify.report import accuracy_interval, certify_counts, method_summary
from msscale.config import Key, load_config, nonempty
from msscale.errors import UserError
from msscale.smoothing.certificate import CERTIFICATES

log = logging.getLogger(__name__)

# The README's three claims as paired comparisons on the same images: (name, method A,
# method B, radii). "first cascade" is the cascade of the config's first setting.
CLAIMS = (
    ("cascade - smallest scale", "cascade", "smallest", (0.0,)),
    ("cascade - largest scale", "cascade", "largest", (0.0, 1.0, 1.5)),
    ("cascade - first setting's cascade", "cascade", "first cascade", (0.0, 0.5, 1.0, 1.5)),
)

ABLATION_SCHEMA = {
    "out": Key(str, "runs/ablate-calibration", check=nonempty),
    "images": Key(int, 100, min=1, help="test digits certified per setting"),
    "n0": Key(int, 50, min=1),
    "n": Key(int, 500, min=1),
    "alpha": Key(float, 0.001, min=1e-12, max=0.499999),
    "certificate": Key(str, "split", choices=CERTIFICATES,
                       help="the cascade certificate (docs/design.md §1.2)"),
    "p0s": Key(list, [0.5, 0.6, 0.7, 0.8], item_type=float,
               help="thresholds the cascade is certified at (offline, from the same counts)"),
    "shards": Key(int, 2, min=1, help="local processes per certification"),
    "simulate_n": Key(list, [10_000, 100_000], item_type=int,
                      help="larger n at which the cascade is simulated from the counts"),
    "simulate_replicates": Key(int, 10, min=1),
    "finetune": Key(list, [], item_type=str,
                    help="overrides of the embedded fine-tuning config for every setting"),
    "settings": Key(dict, help="name -> list of fine-tuning overrides; null: pretrained UNet"),
}


def load_ablation_config(path, overrides=()) -> dict:
    cfg = load_config(path, list(overrides), ABLATION_SCHEMA)
    for name, setting in cfg["settings"].items():
        if not str(name).replace("-", "_").isidentifier():
            raise UserError(f"config key settings: name {name!r} is not a plain word "
                            "(it names a directory)")
        if setting is not None and not (
                isinstance(setting, list) and all(isinstance(o, str) for o in setting)):
            raise UserError(f"config key settings.{name}: expected a list of key=value "
                            f"overrides or null, got {setting!r}")
    if not all(0.5 <= p0 < 1 for p0 in cfg["p0s"]):
        raise UserError(f"config key p0s: every p0 must be in [0.5, 1), got {cfg['p0s']}")
    if not all(n >= 1 for n in cfg["simulate_n"]):
        raise UserError(f"config key simulate_n: expected draws >= 1, got {cfg['simulate_n']}")
    return cfg


def run_ablation(cfg: dict) -> list[dict]:
    """Fine-tune and certify every setting; returns one result per setting (`results_of`)."""
    from msscale.certify.array import run_array
    from msscale.demo.embedded import ensure_digits
    from msscale.demo.models import ASSETS
    from msscale.demo.run import certify_digits_config, finetune_digits

    out = Path(cfg["out"])
    data = out / "data"
    for split in ("train", "test"):
        ensure_digits(split, data / split)
    results, first = [], None
    for number, (name, setting) in enumerate(cfg["settings"].items(), 1):
        where = out / name
        _record_setting(where, setting, cfg)
        log.info("setting %d/%d: %s %s", number, len(cfg["settings"]), name, setting or "")
        denoiser = ASSETS / "denoiser"
        if setting is not None:
            denoiser = where / "finetune" / "final"
            if not denoiser.is_dir():
                denoiser = finetune_digits(where / "finetune", data,
                                           [*cfg["finetune"], *setting])
        certify = certify_digits_config(where / "certify", data / "test", denoiser, [
            f"data.max_images={cfg['images']}", f"smoothing.n0={cfg['n0']}",
            f"smoothing.n={cfg['n']}", f"smoothing.alpha={cfg['alpha']}",
            f"smoothing.certificate={cfg['certificate']}", "smoothing.schedule=full"])
        counts = run_array(certify, "local", cfg["shards"])
        cascade = certify_counts(counts, cfg["alpha"], 0.5)
        first = first or cascade
        results.append({"name": name, "overrides": setting,
                        **results_of(counts, cfg, cascade, first)})
        atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "ablation.md", format_ablation(results, cfg))
    return results


def _record_setting(where: Path, setting, cfg: dict) -> None:
    """Record what a setting's directory holds; refuse to reuse it for something else."""
    record = {"overrides": setting, "finetune": cfg["finetune"], "images": cfg["images"],
              "n0": cfg["n0"], "n": cfg["n"]}
    path = where / "setting.json"
    if path.is_file():
        if json.loads(path.read_text()) != record:
            raise UserError(f"{where} holds a setting run with other values "
                            f"({path.read_text().strip()}); remove it or choose another out")
        return
    where.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record) + "\n")


def method_figures(certs) -> dict:
    """One method's figures as image counts with their intervals: `method_summary`'s shares
    times the images (certified at each of RADII, abstentions), its stages and ACR."""
    summary, images = method_summary(certs), len(certs.index)
    certified = {f"{r:g}": round(summary["certified_accuracy"][f"{r}"] * images) for r in RADII}
    abstain = round(summary["abstain"] * images)
    return {
        "images": images,
        "certified": certified,
        "certified_interval": {r: list(accuracy_interval(k, images))
                               for r, k in certified.items()},
        "abstain": abstain,
        "abstain_interval": list(accuracy_interval(abstain, images)),
        "stages": summary["stages"],
        "acr": summary["acr"],
    }


def largest_scale_errors(counts, p0s) -> dict:
    """At the largest scale, from the estimation votes: images whose top class is wrong, and
    of those how many hold each p0 (confidently wrong: the cascade cannot defer them)."""
    votes = counts.estimate[:, -1]
    share = votes.max(-1) / np.maximum(votes.sum(-1), 1)
    wrong = votes.argmax(-1) != counts.label
    return {"wrong": int(wrong.sum()),
            "confidently_wrong": {f"{p0:g}": int(np.sum(wrong & (share >= p0))) for p0 in p0s}}


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Two methods on the same images (certified or not at some radius): the images only A
    certifies, those only B does, and the exact two-sided binomial (McNemar) p-value of
    that split; the difference holds at level 0.05 where p < 0.05."""
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = only_a + only_b
    p_value = binomtest(only_a, discordant).pvalue if discordant else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": float(p_value)}


def _certified(certs, radius: float) -> np.ndarray:
    return certs.correct.astype(bool) & (certs.radius >= radius)


def results_of(counts, cfg: dict, cascade, first_cascade) -> dict:
    """Every method of one setting: the cascade at each p0, Cohen at each scale (p0 = 1/2),
    and the CLAIMS at p0 = 1/2. `cascade`: this setting's cascade certificates at p0 = 1/2,
    `first_cascade`: the first setting's."""
    if not np.array_equal(first_cascade.index, counts.index):
        raise UserError("the settings certified different images: compare like with like")
    alpha, sigmas = cfg["alpha"], [float(s) for s in counts.sigmas]
    singles = {s: certify_counts(counts, alpha, 0.5, [s]) for s in sigmas}
    certs = {"cascade": cascade, "smallest": singles[sigmas[0]],
             "largest": singles[sigmas[-1]], "first cascade": first_cascade}
    claims = {f"{name}, r={r:g}": paired(_certified(certs[a], r), _certified(certs[b], r))
              for name, a, b, radii in CLAIMS for r in radii}
    by_p0 = {f"{p0:g}": method_figures(cascade if p0 == 0.5 else
                                       certify_counts(counts, alpha, p0))
             for p0 in cfg["p0s"]}
    single = {f"{s:g}": method_figures(certs) for s, certs in singles.items()}
    return {"cascade": by_p0, "single": single, "claims": claims,
            "largest_scale": largest_scale_errors(counts, cfg["p0s"]),
            "simulated": simulated_methods(counts, cfg)}


def simulated_methods(counts, cfg: dict) -> dict:
    """Certified accuracy of the cascade at each p0 and each larger n of `simulate_n`, with
    votes drawn from these counts' shares (msscale/bench/sequential.py, as
    `msscale bench-sequential` does): what more draws would do to the undecidable band.
    The single scales (Cohen, p0 = 1/2) are simulated from the same shares, for reference."""
    from msscale.bench.sequential import simulate, true_probabilities
    from msscale.smoothing.certificate import Certificate
    from msscale.smoothing.sequential import SequentialRule

    probs = true_probabilities(counts, prior=0.01)
    sigmas = tuple(float(s) for s in counts.sigmas)
    methods = [(f"cascade p0={p0:g}", sigmas, p0, slice(None)) for p0 in cfg["p0s"]]
    methods += [(f"sigma={s:g}", (s,), 0.5, slice(k, k + 1)) for k, s in enumerate(sigmas)]
    figures = {}
    for name, scales, p0, columns in methods:
        for n in cfg["simulate_n"]:
            rule = SequentialRule(scales, cfg["alpha"], p0, (n,), (1.0,),
                                  certificate=Certificate(cfg["certificate"]))
            result = simulate(probs[:, columns], counts.label, rule, cfg["n0"],
                              tolerances=(), replicates=cfg["simulate_replicates"])
            figures[f"{name}, n={n}"] = result["schedules"]["cascade"]["certified_accuracy"]
    return figures


def _cell(k: int, bounds: list[float], images: int) -> str:
    return f"{100 * k / images:.0f} [{100 * bounds[0]:.0f}, {100 * bounds[1]:.0f}]"


def _row(label: str, figures: dict) -> str:
    images = figures["images"]
    cells = [_cell(figures["certified"][f"{r:g}"], figures["certified_interval"][f"{r:g}"],
                   images) for r in RADII]
    stages = figures["stages"]
    stops = " / ".join(str(stages[s]) for s in sorted(stages, key=_stage_order, reverse=True))
    abstain = _cell(figures["abstain"], figures["abstain_interval"], images)
    return f"| {label} | {' | '.join(cells)} | {abstain} | {stops} | {figures['acr']:.3f} |"


def _stage_order(name: str) -> float:
    return -1.0 if name == "none" else float(name)


def format_ablation(results: list[dict], cfg: dict) -> str:
    """The ablation as markdown: one table of all methods per setting, one of p0."""
    first = results[0]["single"]
    scales = " / ".join(sorted(first, key=float, reverse=True))
    header = ("| method | " + " | ".join(f"r={r:g}" for r in RADII)
              + f" | abstain | stops at sigma {scales} / none | ACR |")
    rule = "|" + "---|" * (len(RADII) + 4)
    lines = [f"Certified accuracy (%) [95% Clopper-Pearson interval] over {cfg['images']} test "
             f"digits, n0 = {cfg['n0']}, n = {cfg['n']}, alpha = {cfg['alpha']:g}; cascade "
             f"({cfg['certificate']} certificate) at p0 = 1/2, single scales (Cohen) with the "
             "same denoiser.", ""]
    for result in results:
        wrong = result["largest_scale"]
        lines += [f"**{result['name']}** ({_describe(result['overrides'])}); at the largest "
                  f"scale {wrong['wrong']} images have a wrong top class, "
                  f"{wrong['confidently_wrong']['0.5']} of them with >= 1/2 of the votes.", "",
                  header, rule, _row("cascade", result["cascade"]["0.5"])]
        lines += [_row(f"sigma={s}", figures)
                  for s, figures in sorted(result["single"].items(), key=lambda x: float(x[0]))]
        lines.append("")
    lines += ["The cascade at other thresholds p0 (same counts):", "", header, rule]
    for result in results:
        lines += [_row(f"{result['name']}, p0={p0}", figures)
                  for p0, figures in result["cascade"].items()]
    claims = list(results[0]["claims"])
    lines += ["", "The README's claims as paired differences on the same images (p0 = 1/2): "
              "images certified by the first method minus by the second, and the exact "
              "two-sided McNemar p-value; a difference holds at level 0.05 where p < 0.05:", "",
              "| setting | " + " | ".join(claims) + " |", "|" + "---|" * (len(claims) + 1)]
    for result in results:
        cells = [f"{c['only_a'] - c['only_b']:+d} (p={c['p_value']:.2g})"
                 for c in result["claims"].values()]
        lines.append(f"| {result['name']} | " + " | ".join(cells) + " |")
    lines += ["", f"The cascade at larger n, simulated from each setting's counts (votes drawn "
              f"from its shares, {cfg['simulate_replicates']} replicates of the images; "
              "certified accuracy %, mean over replicates):", "",
              "| setting | method, n | " + " | ".join(f"r={r:g}" for r in RADII) + " |",
              "|" + "---|" * (len(RADII) + 2)]
    for result in results:
        for where, accuracy in result["simulated"].items():
            cells = " | ".join(f"{100 * accuracy[f'{r}']:.1f}" for r in RADII)
            lines.append(f"| {result['name']} | {where} | {cells} |")
    return "\n".join(lines) + "\n"


def _describe(overrides) -> str:
    return "pretrained UNet" if overrides is None else ", ".join(overrides) or "defaults"
