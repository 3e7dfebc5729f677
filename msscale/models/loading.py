"""Loading the two models: a diffusers denoiser directory and a timm classifier + local weights.

Nothing is downloaded: timm models are built with pretrained=False and weights come from a
local file (safetensors, or a pickle loaded with weights_only=True).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from msscale.atomic import sha256_file
from msscale.errors import UserError
from msscale.paths import regular_file
from msscale.smoothing.denoise import Classifier, DenoiseAndClassify, OneShotDenoiser

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


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


def load_scheduler(path: str | Path):
    """The diffusers scheduler saved under <path>/scheduler (any class with alphas_cumprod)."""
    import diffusers

    config_file = Path(path) / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        raise UserError(f"denoiser {path} has no scheduler/scheduler_config.json")
    class_name = _read_config(config_file).get("_class_name", "DDPMScheduler")
    scheduler_class = getattr(diffusers, str(class_name), None)
    if not isinstance(scheduler_class, type) or not issubclass(
        scheduler_class, diffusers.SchedulerMixin
    ):
        raise UserError(f"denoiser {path}: unknown scheduler class {class_name!r}")
    scheduler = scheduler_class.from_pretrained(path, subfolder="scheduler")
    if not hasattr(scheduler, "alphas_cumprod"):
        raise UserError(f"denoiser {path}: scheduler {class_name} has no alphas_cumprod")
    return scheduler


def load_unet(path: str | Path):
    """The UNet2DModel saved by diffusers' save_pretrained at `path` (or `path`/unet)."""
    from diffusers import UNet2DModel

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"denoiser.path {path} is not a directory")
    unet_dir = _unet_dir(path)
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


def load_denoiser(path: str | Path) -> OneShotDenoiser:
    """A one-shot denoiser from a diffusers directory: UNet weights plus scheduler/."""
    unet = load_unet(path)
    scheduler = load_scheduler(path)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod)
    return OneShotDenoiser(unet.eval(), alphas_cumprod, prediction_type)


def _read_state_dict(checkpoint: Path) -> dict:
    regular_file(checkpoint, "classifier.checkpoint")
    if checkpoint.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(checkpoint)
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(
                f"classifier.checkpoint {checkpoint} is not a readable safetensors file: {err}"
            ) from None
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # a bad pickle can raise almost anything
        raise UserError(f"classifier.checkpoint {checkpoint} cannot be read: {err}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def _head_classes(model, state: dict) -> int | None:
    head = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    weight = state.get(f"{head}.weight") if head else None
    return None if weight is None else int(weight.shape[0])


def build_classifier(cfg: dict) -> Classifier:
    """A timm classifier from the config's `classifier` section (docs/design.md §4)."""
    import timm

    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # a random-init classifier is the same in every process
            model = timm.create_model(
                cfg["name"], pretrained=False, num_classes=cfg["num_classes"], **cfg["kwargs"]
            )
    except (RuntimeError, TypeError, ValueError) as err:
        raise UserError(f"classifier.name {cfg['name']!r}: cannot build it: {err}") from None
    if cfg["checkpoint"] is not None:
        state = _read_state_dict(Path(cfg["checkpoint"]))
        found = _head_classes(model, state)
        if found is not None and found != cfg["num_classes"]:
            raise UserError(
                f"classifier.checkpoint {cfg['checkpoint']} has {found} classes "
                f"but classifier.num_classes is {cfg['num_classes']}"
            )
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise UserError(
                f"classifier.checkpoint {cfg['checkpoint']} does not fit {cfg['name']}: {first}"
            ) from None
    else:
        log.warning("classifier.checkpoint is null: %s has random weights", cfg["name"])
    data_cfg = timm.data.resolve_data_config({}, model=model)
    input_size = cfg["input_size"] or data_cfg["input_size"][-1]
    mean = cfg["mean"] or list(data_cfg["mean"])
    std = cfg["std"] or list(data_cfg["std"])
    return Classifier(model.eval(), input_size, mean, std)


def build_smoothed_model(cfg: dict, device: torch.device) -> DenoiseAndClassify:
    """Denoiser + classifier of a certify config, frozen, on `device`."""
    model = DenoiseAndClassify(
        load_denoiser(cfg["denoiser"]["path"]), build_classifier(cfg["classifier"])
    )
    model.requires_grad_(False)
    return model.eval().to(device)


def prepare_for_inference(model: DenoiseAndClassify, cfg: dict) -> DenoiseAndClassify:
    """Apply the config's `channels_last` and `compile` to a built model (in place)."""
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if cfg["compile"]:
        model.compile(dynamic=False)  # VoteSampler pads the last batch: one shape only
    return model


def model_fingerprint(cfg: dict) -> str:
    """sha256 over the denoiser's files and the classifier's name and weights."""
    digest = hashlib.sha256()
    root = Path(cfg["denoiser"]["path"])
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
    if classifier["checkpoint"] is not None:
        checkpoint = regular_file(classifier["checkpoint"], "classifier.checkpoint")
        digest.update(sha256_file(checkpoint).encode())
    return digest.hexdigest()


def save_denoiser(unet, scheduler, path: str | Path) -> None:
    """Write a denoiser directory that load_denoiser reads: UNet at the top, scheduler/."""
    path = Path(path)
    unet.save_pretrained(path)
    scheduler.save_pretrained(path / "scheduler")
