"""The fine-tuning config (docs/design.md §1.4, §4): schema and cross-key checks.

`load_finetune_config` validates against FINETUNE_SCHEMA and adds the checks that involve
several keys.
"""

from __future__ import annotations

from msscale.cluster import SLURM
from msscale.config import Key, ascending_scales, load_config, nonempty
from msscale.errors import UserError
from msscale.models.schema import CLASSIFIER

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "polynomial")
RECOVERABLE_RULES = ("mean", "votes")  # msscale/finetune/losses.py, `recoverable`

FINETUNE_SCHEMA = {
    "seed": Key(int, 0, min=0),
    "out": Key(str, "runs/finetune", help="run directory: checkpoints/, tb/, final/",
               check=nonempty),
    "denoiser": {"path": Key(str, help="diffusers UNet2DModel directory with scheduler/",
                             check=nonempty)},
    "classifier": CLASSIFIER,
    "data": {
        "train_shards": Key(str, help="brace-expanded WebDataset URL or a dataset.json",
                            check=nonempty),
        "val_shards": Key(str, None, nullable=True, help="held-out shards, read once in order",
                          check=nonempty),
        "val_images": Key(int, 64, min=1, help="validation images per evaluation"),
        "image_size": Key(int, min=8),
        "shuffle_buffer": Key(int, 1000, min=1),
        "num_workers": Key(int, 2, min=0),
        "epoch_length": Key(int, 1000, min=1, help="batches per pass over the resampled stream"),
        "random_crop": Key(bool, True),
        "flip": Key(bool, True, help="random horizontal flips (off for digits)"),
    },
    "calibration": {
        "sigmas": Key(list, [0.25, 0.5, 1.0], item_type=float, check=ascending_scales,
                      help="the cascade's scales"),
        "sigma_weights": Key(list, None, nullable=True, item_type=float,
                             help="sampling weight per scale; null = uniform"),
        "draws": Key(int, 4, min=1, help="M: noise draws per image"),
        "eval_draws": Key(int, 16, min=1, help="noise draws per validation image and scale"),
        "lambda_ac": Key(float, 1.0, min=0.0),
        "lambda_dm": Key(float, 1.0, min=0.0),
        "recoverable": Key(str, "mean", choices=RECOVERABLE_RULES,
                           help="mean: argmax of the mean probability is y; votes: y holds "
                                ">= p0 of the M argmax votes"),
        "p0": Key(float, 0.5, min=0.5, max=0.999999,
                  help="cascade threshold: the defer figure and the votes rule"),
    },
    "train": {
        "max_steps": Key(int, min=1),
        "checkpoint_every": Key(int, min=1),
        "checkpoints_total_limit": Key(int, 2, min=1),
        "resume": Key(bool, True, help="continue from <out>/checkpoints/latest if it exists"),
        "batch_size": Key(int, min=1, help="global: all processes and accumulation steps"),
        "grad_accum": Key(int, 1, min=1),
        "lr": Key(float, 1e-5, min=0.0),
        "weight_decay": Key(float, 0.0, min=0.0),
        "warmup_steps": Key(int, 0, min=0),
        "lr_schedule": Key(str, "constant_with_warmup", choices=LR_SCHEDULES),
        "max_grad_norm": Key(float, 1.0, nullable=True, min=0.0, help="null: no clipping"),
        "ema_decay": Key(float, 0.999, min=0.0, max=1.0),
        "gradient_checkpointing": Key(bool, False),
        "mixed_precision": Key(str, "auto", choices=("auto", "no", "bf16"),
                               help="auto: bf16 on CUDA, fp32 on CPU"),
        "eval_every": Key(int, 500, min=1),
        "log_every": Key(int, 10, min=1),
        "max_nan_steps": Key(int, 10, min=0, help="non-finite losses tolerated before stopping"),
    },
    "deepspeed": {"config": Key(str, None, nullable=True, help="DeepSpeed JSON; null = DDP")},
    "slurm": SLURM,
}


def check_finetune(cfg: dict) -> dict:
    """Checks across keys that the schema cannot express; returns cfg unchanged."""
    cal = cfg["calibration"]
    sigmas = cal["sigmas"]
    weights = cal["sigma_weights"]
    if weights is not None:
        if len(weights) != len(sigmas):
            raise UserError(
                f"config key calibration.sigma_weights: {len(weights)} weights for "
                f"{len(sigmas)} sigmas {sigmas}"
            )
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise UserError(
                f"config key calibration.sigma_weights: expected non-negative weights with a "
                f"positive sum, got {weights}"
            )
    return cfg


def load_finetune_config(path, overrides=()) -> dict:
    """A fine-tuning config: schema defaults -> YAML -> overrides, then cross-key checks."""
    return check_finetune(load_config(path, list(overrides), FINETUNE_SCHEMA))


def per_device_batch(cfg: dict, world_size: int) -> int:
    """train.batch_size is global; each process takes batch / (world * grad_accum) per step."""
    batch, accum = cfg["train"]["batch_size"], cfg["train"]["grad_accum"]
    if batch % (world_size * accum):
        raise UserError(
            f"train.batch_size {batch} does not divide by {world_size} processes x "
            f"train.grad_accum {accum}"
        )
    return batch // (world_size * accum)
