"""`msscale import-denoiser`: an OpenAI diffusion checkpoint -> a denoiser directory.

Reads a guided-diffusion or improved-diffusion checkpoint (a pickled state dict, read with
torch.load(weights_only=True); fp16 tensors become fp32) and writes what `denoiser.path`
loads (msscale/models/loading.py, load_denoiser):

    OUT/config.json, OUT/diffusion_pytorch_model.safetensors   the UNet2DModel
    OUT/scheduler/scheduler_config.json                        DDPMScheduler, trained_betas
    OUT/msscale_denoiser.json                                  timestep_scale and provenance

The scheduler holds guided-diffusion's betas as float64 values (`trained_betas`), so the
alphas_cumprod that load_denoiser computes from them in float64 equal the reference's.
`timestep_scale` is what the model multiplies its input timestep by: 1000 / diffusion_steps
for a model trained with rescale_timesteps (improved-diffusion's CIFAR-10 model: 0.25),
else 1. The directory is written under a temporary name and renamed, so it is whole or
absent; a checkpoint that does not fit the architecture writes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from msscale.atomic import sha256_file
from msscale.errors import UserError
from msscale.models.loading import DENOISER_META
from msscale.models.openai_unet import (
    build_arch,
    convert_state_dict,
    expected_keys,
    resolve_flags,
    unet_config,
)

log = logging.getLogger(__name__)

SHOWN_KEYS = 3  # keys named in a does-not-fit message, per kind


def betas(schedule: str, steps: int) -> np.ndarray:
    """guided-diffusion's get_named_beta_schedule, in float64."""
    if schedule == "linear":  # Ho et al.'s, stretched to any number of steps
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    if schedule == "cosine":  # Nichol & Dhariwal's, each beta capped at 0.999

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([
            min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
            for i in range(steps)
        ])
    raise UserError(f"noise_schedule {schedule!r}: expected linear or cosine")


def make_scheduler(flags: dict):
    """A DDPMScheduler with the checkpoint's training betas and output parametrisation."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=flags["diffusion_steps"],
        trained_betas=betas(flags["noise_schedule"], flags["diffusion_steps"]).tolist(),
        variance_type="learned_range" if flags["learn_sigma"] else "fixed_large",
        prediction_type="sample" if flags["predict_xstart"] else "epsilon",
        clip_sample=True,  # guided-diffusion's clip_denoised
    )


def timestep_scale(flags: dict) -> float:
    """What the model's input timestep is multiplied by (guided's _scale_timesteps)."""
    return 1000.0 / flags["diffusion_steps"] if flags["rescale_timesteps"] else 1.0


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's state dict {name: tensor}; refuses anything else."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a bad pickle can raise almost anything
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {path} cannot be read as a state dict: {first}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"checkpoint {path} is not a state dict of named tensors")
    return state


def _listing(keys: set[str]) -> str:
    shown = ", ".join(sorted(keys)[:SHOWN_KEYS])
    return f"{shown}, ..." if len(keys) > SHOWN_KEYS else shown


def check_keys(state: dict, expected: set[str], what: str) -> None:
    """One line naming the first few missing and unexpected keys, with their counts."""
    missing, unexpected = expected - set(state), set(state) - expected
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_listing(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_listing(unexpected)})")
    raise UserError(f"{what}: {'; '.join(parts)}; check --arch and --override")


def check_shapes(converted: dict, origin: dict, model, what: str) -> None:
    """Every tensor has the shape the architecture gives its parameter."""
    wanted = model.state_dict()
    wrong = [k for k, v in converted.items() if tuple(v.shape) != tuple(wanted[k].shape)]
    if wrong:
        key = wrong[0]
        raise UserError(
            f"{what}: {len(wrong)} tensors have other shapes than the architecture's, "
            f"e.g. {origin[key]} {list(converted[key].shape)} where "
            f"{list(wanted[key].shape)} is expected; check --arch and --override"
        )


def build_unet(config: dict, converted: dict, origin: dict, what: str):
    """The UNet2DModel of `config` holding `converted` (built without initialising it)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DModel

    with init_empty_weights():
        unet = UNet2DModel(**config)
    if set(converted) != set(unet.state_dict()):  # a mapping bug, not the user's input
        raise RuntimeError(f"key mapping mismatch: {set(converted) ^ set(unet.state_dict())}")
    check_shapes(converted, origin, unet, what)
    unet.load_state_dict(converted, strict=True, assign=True)
    return unet.eval()


def _write(out: Path, unet, scheduler, meta: dict) -> None:
    """Write the directory under a temporary name beside `out`, then rename it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        unet.save_pretrained(tmp)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / DENOISER_META).write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_denoiser(checkpoint: str, arch: str, overrides: list[str], out: str) -> Path:
    """Convert `checkpoint` (architecture `arch` + FLAG=VALUE overrides) into `out`."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists():
        raise UserError(f"--out {out} exists; remove it or choose another directory")
    flags = resolve_flags(arch, overrides)
    structure = build_arch(flags)
    config = unet_config(flags)
    what = f"checkpoint {checkpoint} does not fit --arch {arch}"
    if overrides:
        what += f" with {' '.join(overrides)}"
    state = read_checkpoint(checkpoint)
    names = expected_keys(structure)
    check_keys(state, set(names), what)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    converted, origin = convert_state_dict(state, structure)
    unet = build_unet(config, converted, origin, what)
    meta = {
        "format": 1,
        "timestep_scale": timestep_scale(flags),
        "imported_from": {
            "checkpoint": checkpoint.name,
            "sha256": sha256_file(checkpoint),
            "dtypes": dtypes,
            "arch": arch,
            "overrides": list(overrides),
            "flags": flags,
        },
    }
    _write(out, unet, make_scheduler(flags), meta)
    params = sum(p.numel() for p in unet.parameters())
    log.info("wrote %s: UNet2DModel with %.1fM parameters (from %s, %s), timestep_scale %g",
             out, params / 1e6, checkpoint.name, "/".join(dtypes), meta["timestep_scale"])
    return out
