"""Loading the two models: a diffusers denoiser and the classifier (msscale/models/classifiers.py).

A denoiser is a diffusers directory (UNet2DModel + scheduler) or a hub id, resolved to its
cached snapshot (msscale/models/hub.py); classifiers may be timm or transformers models.
Local weights are read as safetensors, or as pickles with weights_only=True.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from msscale.atomic import sha256_file
from msscale.errors import UserError
from msscale.models.classifiers import build_classifier, classifier_files
from msscale.models.hub import resolve_dir
from msscale.smoothing.denoise import DenoiseAndClassify, OneShotDenoiser

__all__ = ["build_classifier", "build_smoothed_model", "load_denoiser", "model_fingerprint"]

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# msscale's own facts about a denoiser directory that diffusers' files cannot hold; written
# by `msscale import-denoiser` (msscale/models/openai_import.py), optional otherwise.
DENOISER_META = "msscale_denoiser.json"


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when there is one; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but no CUDA device is visible")
    return torch.device(name)


def _unet_dir(path: Path) -> Path:
    """A bare UNet save_pretrained directory, or a pipeline directory with a unet/ subfolder."""
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    return path


def denoiser_root(path: str | Path) -> Path:
    """denoiser.path as a local directory: itself, or a hub id's cached snapshot."""
    return resolve_dir(str(path), "denoiser.path")


def load_scheduler(path: str | Path):
    """The diffusers scheduler under <path>/scheduler (any class with alphas_cumprod); a hub
    pipeline that keeps scheduler_config.json beside the UNet's config works too."""
    import diffusers

    root = denoiser_root(path)
    folder = root / "scheduler"
    if not (folder / "scheduler_config.json").is_file():
        folder = root  # the google/ddpm-* layout: UNet and scheduler configs side by side
    config_file = folder / "scheduler_config.json"
    if not config_file.is_file():
        raise UserError(f"denoiser {path} has no scheduler/scheduler_config.json")
    class_name = _read_config(config_file).get("_class_name", "DDPMScheduler")
    scheduler_class = getattr(diffusers, str(class_name), None)
    if not isinstance(scheduler_class, type) or not issubclass(
        scheduler_class, diffusers.SchedulerMixin
    ):
        raise UserError(f"denoiser {path}: unknown scheduler class {class_name!r}")
    scheduler = scheduler_class.from_pretrained(folder)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise UserError(f"denoiser {path}: scheduler {class_name} has no alphas_cumprod")
    return scheduler


def load_unet(path: str | Path):
    """The UNet2DModel saved by diffusers' save_pretrained at `path` (or `path`/unet)."""
    from diffusers import UNet2DModel

    unet_dir = _unet_dir(denoiser_root(path))
    if not (unet_dir / "config.json").is_file():
        raise UserError(f"denoiser.path {path} holds no UNet config.json (save_pretrained output)")
    # from_pretrained builds a UNet2DModel from another class's config with only a warning
    class_name = _read_config(unet_dir / "config.json").get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise UserError(f"denoiser.path {path} holds a {class_name}, not a UNet2DModel")
    try:
        return UNet2DModel.from_pretrained(unet_dir)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"denoiser.path {path}: cannot load the UNet: {err}") from None


def _read_config(path: Path) -> dict:
    """A diffusers config.json as a dict; anything else is a UserError naming the file."""
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a JSON config ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    return config


def denoiser_meta(path: str | Path) -> dict:
    """<path>/msscale_denoiser.json, checked; {"timestep_scale": 1.0} where there is none.

    `timestep_scale`: the UNet's input timestep is the scheduler's times this factor
    (improved-diffusion models trained with rescale_timesteps: 1000 / steps).
    """
    file = denoiser_root(path) / DENOISER_META
    if not file.is_file():
        return {"timestep_scale": 1.0}
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{file} is not valid JSON: {err}") from None
    scale = meta.get("timestep_scale", 1.0) if isinstance(meta, dict) else None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise UserError(f"{file}: timestep_scale must be a positive number, got {scale!r}")
    return {**meta, "timestep_scale": float(scale)}


def alphas_cumprod_of(scheduler) -> torch.Tensor:
    """The scheduler's alphas_cumprod; from its trained_betas in float64 where it has them.

    diffusers accumulates the product in float32, which drifts by about 1e-5 relative over
    4000 cosine steps; the float64 product of the stored betas is exact to float32 rounding.
    """
    trained = scheduler.config.get("trained_betas")
    if trained is None:
        return torch.as_tensor(scheduler.alphas_cumprod)
    return torch.cumprod(1 - torch.tensor(trained, dtype=torch.float64), dim=0)


def load_denoiser(path: str | Path, fit: str = "resize") -> OneShotDenoiser:
    """A one-shot denoiser from a diffusers directory: UNet weights plus scheduler/."""
    unet = load_unet(path)
    scheduler = load_scheduler(path)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    scale = denoiser_meta(path)["timestep_scale"]
    return OneShotDenoiser(
        unet.eval(), alphas_cumprod_of(scheduler), prediction_type, scale, fit=fit
    )


def build_smoothed_model(cfg: dict, device: torch.device) -> DenoiseAndClassify:
    """Denoiser + classifier of a certify config, frozen, on `device`."""
    denoiser = load_denoiser(cfg["denoiser"]["path"], cfg["denoiser"].get("fit", "resize"))
    model = DenoiseAndClassify(denoiser, build_classifier(cfg["classifier"]))
    model.requires_grad_(False)
    return model.eval().to(device)


def prepare_for_inference(model: DenoiseAndClassify, cfg: dict) -> DenoiseAndClassify:
    """Apply the config's `channels_last` and `compile` to a built model (in place)."""
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if cfg["compile"]:
        model.compile(dynamic=False)  # ShardSampler pads the last batch: one shape only
    return model


def model_fingerprint(cfg: dict) -> str:
    """sha256 over the denoiser's files and the classifier's name and weights."""
    digest = hashlib.sha256()
    root = denoiser_root(cfg["denoiser"]["path"])
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        if file.suffix in WEIGHT_SUFFIXES or file.suffix == ".json":
            digest.update(str(file.relative_to(root)).encode())
            digest.update(sha256_file(file).encode())
    classifier = cfg["classifier"]
    digest.update(
        json.dumps(
            {k: v for k, v in classifier.items() if k != "checkpoint"}, sort_keys=True
        ).encode()
    )
    for file in classifier_files(classifier):  # checkpoint, timm's pretrained file, HF dir
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def save_denoiser(unet, scheduler, path: str | Path, meta: dict | None = None) -> None:
    """Write a denoiser directory that load_denoiser reads: UNet at the top, scheduler/,
    and msscale_denoiser.json where `meta` is given (see denoiser_meta)."""
    path = Path(path)
    unet.save_pretrained(path)
    scheduler.save_pretrained(path / "scheduler")
    if meta is not None:
        (path / DENOISER_META).write_text(json.dumps(meta, indent=2) + "\n")
