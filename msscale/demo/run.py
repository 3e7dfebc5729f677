"""`msscale demo`: the whole method on scikit-learn's digits, on this machine, no download.

1. shards of the digits' training and test splits;
2. calibration fine-tuning of the demo UNet (the code path of tools/submit.py, local executor);
3. certification of the test split (the code path of tools/certify_array.py, local executor)
   with the pretrained UNet under the `full` schedule, which yields Cohen's CERTIFY at each
   single scale and the cascade over all three from one set of draws;
4. the same with the fine-tuned UNet (`full` again: the single scales with the fine-tuned
   UNet tell a better denoiser apart from better deferral);
5. DIR/summary.json, DIR/report.md and DIR/certified_accuracy.png over all ten methods.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from msscale.atomic import atomic_write_text
from msscale.demo.embedded import CONFIGS, ensure_digits, model_overrides
from msscale.demo.models import ASSETS

log = logging.getLogger(__name__)

SIGMAS = [0.25, 0.5, 1.0]
# Sized to finish within 10 minutes (full) and 2 minutes (quick) on 2 CPU cores. The
# calibration setting is the best of the ablation in docs/calibration.md (lambda_ac = 4).
BEST_CALIBRATION = ["calibration.lambda_ac=4"]
PRESETS = {
    "full": {"images": 100, "n0": 50, "n": 500, "finetune_steps": 120, "finetune_batch": 16,
             "shards": 2, "calibration": BEST_CALIBRATION},
    "quick": {"images": 12, "n0": 20, "n": 100, "finetune_steps": 6, "finetune_batch": 8,
              "shards": 2, "calibration": BEST_CALIBRATION},
}
ALPHA = 0.001


def certify_digits_config(out: Path, test: Path, denoiser: Path, overrides=()) -> dict:
    """The embedded certify config over the digits' test shards in `test`, for `denoiser`."""
    from msscale.certify.schema import load_certify_config

    return load_certify_config(CONFIGS / "certify_digits.yaml", [
        *model_overrides(), f"denoiser.path={denoiser}", f"out={out}",
        f"data.shards={test / 'dataset.json'}", f"smoothing.sigmas={SIGMAS}", *overrides,
    ])


def finetune_digits(out: Path, data: Path, overrides=()) -> Path:
    """Calibration fine-tuning of the demo UNet on the digits' shards under `data` (one local
    process, the code path of tools/submit.py); returns <out>/final."""
    from msscale.finetune.job import submit_finetune

    return submit_finetune(CONFIGS / "finetune_digits.yaml", [
        *model_overrides(), f"out={out}",
        f"data.train_shards={data / 'train' / 'dataset.json'}",
        f"data.val_shards={data / 'test' / 'dataset.json'}", *overrides,
    ], nodes=1, cluster="local")


def _certify_config(out: Path, data: Path, denoiser: Path, preset: dict) -> dict:
    """The demo's certification: every scale for every image (the `full` schedule)."""
    return certify_digits_config(out, data, denoiser, [
        f"data.max_images={preset['images']}", f"smoothing.n0={preset['n0']}",
        f"smoothing.n={preset['n']}", f"smoothing.alpha={ALPHA}", "smoothing.p0=0.5",
        "smoothing.schedule=full",
    ])


def _finetune(out: Path, data: Path, preset: dict) -> Path:
    steps = preset["finetune_steps"]
    every = min(steps, 100)  # as configs/ablate_calibration.yaml, whose setting this is
    return finetune_digits(out, data, [
        f"train.max_steps={steps}", f"train.batch_size={preset['finetune_batch']}",
        f"train.checkpoint_every={every}", f"train.eval_every={every}",
        *preset["calibration"],
    ])


def run_demo(out: str | Path, quick: bool = False) -> dict:
    """The ten methods of the demo; returns the summary written to out/summary.json."""
    from msscale.certify.array import run_array
    from msscale.certify.report import (
        PAPER_METHOD,
        methods_of,
        summarize_methods,
        write_comparison,
    )

    started = time.time()
    out, preset = Path(out), PRESETS["quick" if quick else "full"]
    data = out / "data"
    for split in ("train", "test"):
        ensure_digits(split, data / split)
    log.info("step 1/3: calibration fine-tuning (%d steps)", preset["finetune_steps"])
    finetuned = _finetune(out / "finetune", data, preset)
    log.info("step 2/3: certification with the pretrained UNet (full schedule)")
    cfg = _certify_config(out / "certify-pretrained", data / "test", ASSETS / "denoiser", preset)
    pretrained = methods_of(run_array(cfg, "local", preset["shards"]), ALPHA, 0.5)
    log.info("step 3/3: certification with the fine-tuned UNet (full schedule)")
    cfg = _certify_config(out / "certify-finetuned", data / "test", finetuned, preset)
    counts = run_array(cfg, "local", preset["shards"])
    finetuned = methods_of(counts, ALPHA, 0.5)
    methods = {}
    for unet, certs in (("pretrained", pretrained), ("fine-tuned", finetuned)):
        methods |= {f"cohen sigma={s:g} ({unet})": certs[f"sigma={s:g}"] for s in SIGMAS}
        methods[f"cascade ({unet})"] = certs["cascade"]
        methods[f"{PAPER_METHOD} ({unet})"] = certs[PAPER_METHOD]
    summary = {
        "methods": summarize_methods(methods),
        "n": preset["n"], "n0": preset["n0"], "alpha": ALPHA, "images": len(counts.index),
        "seconds": round(time.time() - started, 1),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_comparison(out, methods, summary)
    log.info("demo finished in %.0f s; see %s", summary["seconds"], out / "report.md")
    return summary
