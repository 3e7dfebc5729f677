"""The certification config: its keys, defaults and checks (docs/design.md §4)."""

from __future__ import annotations

import os

from msscale.cluster import SLURM
from msscale.config import Key, ascending_scales, load_config, nonempty
from msscale.errors import UserError
from msscale.models.schema import CLASSIFIER
from msscale.smoothing.certificate import CERTIFICATES, Certificate
from msscale.smoothing.sequential import STOPPING, sequential_rule

SEQUENTIAL_KEYS = ("radius_tolerance", "first_look", "look_growth", "stopping", "target_radii")


def _below_half(path: str, alpha: float) -> None:
    """The certificate needs alpha < 1/2 (docs/design.md §1.1); refused here, not after sampling."""
    if alpha >= 0.5:
        raise UserError(f"config key {path}: expected < 0.5, got {alpha!r}")


def _growth(path: str, value: float) -> None:
    if not value > 1:
        raise UserError(f"config key {path}: expected a number > 1, got {value!r}")


CERTIFY_SCHEMA = {
    "seed": Key(int, 0, min=0),
    "out": Key(str, "runs/certify", check=nonempty),
    "device": Key(str, "auto", choices=("auto", "cpu", "cuda")),
    "precision": Key(
        str, "fp32", choices=("fp32", "bf16"), help="bf16: autocast (GPUs, CPUs with AVX512-BF16)"
    ),
    "channels_last": Key(bool, True, help="run the models in channels_last memory format"),
    "compile": Key(bool, False, help="torch.compile the models (slow start, faster sampling)"),
    "denoiser": {
        "path": Key(str, help="diffusers directory or hub id", check=nonempty),
        "fit": Key(str, "resize", choices=("resize", "pad"),
                   help="images of another size than the UNet's: resize them, or reflect-pad "
                   "the noisy image to the UNet's size and crop the denoised one back"),
    },
    "classifier": CLASSIFIER,
    "data": {
        "shards": Key(
            str, help="brace-expanded WebDataset URL or a dataset.json", check=nonempty
        ),
        "skip": Key(int, 1, min=1, help="certify every skip-th image"),
        "max_images": Key(int, None, nullable=True, min=1),
    },
    "smoothing": {
        "sigmas": Key(list, [0.25, 0.5, 1.0], item_type=float, check=ascending_scales),
        "n0": Key(int, 100, min=1),
        "n": Key(int, 10000, min=1),
        "alpha": Key(float, 0.001, min=1e-12, check=_below_half),
        "p0": Key(float, 0.5, min=0.5, max=0.999999),
        "certificate": Key(str, "split", choices=CERTIFICATES,
                           help="split: valid at alpha whatever the cascade decides; paper: "
                           "Jeong & Shin's alpha/(s+1) (docs/design.md §1.2)"),
        "stage_shares": Key(list, None, nullable=True, item_type=float,
                            help="split: each stage's share of alpha, largest sigma first "
                            "(null: 4/5 to the largest, the rest evenly)"),
        "schedule": Key(str, "full", choices=("full", "cascade", "sequential"),
                        help="sequential: the cascade stopped early (docs/design.md §1.5)"),
        "stopping": Key(str, "radii", choices=STOPPING,
                        help="sequential: stop once the bucket among target_radii is decided "
                        "(radii), or once n draws would add less than radius_tolerance"),
        "target_radii": Key(list, None, nullable=True, item_type=float,
                            help="sequential, stopping=radii: the radii to decide (null: the "
                            "report's)"),
        "radius_tolerance": Key(
            float, 0.02, min=0.0,
            help="sequential, stopping=tolerance: stop a certifiable scale once n draws would "
            "add less radius",
        ),
        "first_look": Key(int, None, nullable=True, min=1,
                          help="sequential: estimation draws at the first look (null: n/100)"),
        "look_growth": Key(float, 2.0, check=_growth, help="sequential: ratio of the looks"),
        "batch_size": Key(int, 256, min=1),
        "noise_block": Key(int, 1000, min=1, help="draws per counter-based noise block"),
        "flush_every": Key(int, 16, min=1, help="images between progress flushes"),
    },
    "bench": {
        "images": Key(int, 4, min=1, help="images timed"),
        "warmup": Key(int, 1, min=0, help="images run first, not timed"),
        "rounds": Key(int, 3, min=1, help="timed repetitions; figures are their median"),
        "inputs": Key(str, "data", choices=("data", "random"), help="data.shards or noise"),
        "random_denoiser": Key(
            dict, None, nullable=True, help="UNet2DModel config: random weights at denoiser.path"
        ),
        "schedule_images": Key(
            int, 0, min=0, help="images certified under each schedule side by side (0: none)"
        ),
        "schedule_n": Key(
            int, None, nullable=True, min=1, help="their estimation draws (null: smoothing.n)"
        ),
    },
    "slurm": SLURM,
}


def load_certify_config(path: str | os.PathLike | None, overrides=()) -> dict:
    """A certify config: schema defaults -> YAML file -> `key.sub=value` overrides."""
    cfg = load_config(path, list(overrides), CERTIFY_SCHEMA)
    smoothing = cfg["smoothing"]
    try:  # what must agree across keys, checked by the objects that use the keys
        certificate = Certificate.from_settings(smoothing)
        certificate.stage_levels(smoothing["alpha"], len(smoothing["sigmas"]))
        if smoothing["schedule"] == "sequential":
            sequential_rule(smoothing)
    except ValueError as err:
        raise UserError(f"config section smoothing: {err}") from None
    return cfg
