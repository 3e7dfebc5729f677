"""The base classifier of a config's `classifier` section: timm or transformers.

- `source: timm` (default): `name` is a timm model name. Weights: `checkpoint` (a local
  file, loaded into the model), or `pretrained: true` (timm's own weights, fetched into the
  Hugging Face cache and loaded by timm's loader; `kwargs.pretrained_cfg_overlay.file` may
  point at a local file instead), or neither (random weights, with a warning).
- `source: transformers`: `name` is a directory or hub id of an
  AutoModelForImageClassification (its logits are the classifier's output).

Preprocessing (docs/design.md §1.1): the denoised image is resized to the classifier's
resolution with its interpolation and normalised with its mean and std. Each of
`input_size`, `interpolation`, `mean`, `std` is taken from the config where set, else from
timm's resolve_data_config or the transformers image processor's config (`size` or
`crop_size`, `resample`, `image_mean`, `image_std`). The whole image is resized; crops
are left to the data (docs/reproduce.md: how the ImageNet shards are made).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from msscale.errors import UserError
from msscale.models.hub import hub_snapshot, resolve_dir
from msscale.paths import regular_file
from msscale.smoothing.denoise import Classifier

log = logging.getLogger(__name__)

# PIL's resampling filters as the transformers image processors store them
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _get(cfg: dict, key: str, default=None):
    """Config sections built by hand (tests, demo) may lack the newer keys."""
    value = cfg.get(key)
    return default if value is None else value


def build_classifier(cfg: dict) -> Classifier:
    """The Classifier of a config's `classifier` section (see the module docstring)."""
    source = _get(cfg, "source", "timm")
    if source == "transformers":
        return _build_transformers(cfg)
    if source != "timm":
        raise UserError(f"classifier.source {source!r}: expected timm or transformers")
    return _build_timm(cfg)


def _preprocessing(cfg: dict, found: dict) -> tuple:
    """(input_size, mean, std, interpolation): the config's where set, else `found`."""
    return tuple(
        cfg.get(key) if cfg.get(key) is not None else found[key]
        for key in ("input_size", "mean", "std", "interpolation")
    )


# ----------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------


def read_state_dict(checkpoint: Path) -> dict:
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


def timm_pretrained_file(name: str, kwargs: dict) -> Path:
    """The local weights file timm's pretrained loader reads for `name`.

    `kwargs.pretrained_cfg_overlay.file` if given, else the file of the pretrained config's
    hub id, from the Hugging Face cache (fetched there when online).
    """
    import timm

    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if overlay.get("file"):
        return Path(overlay["file"])
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is None or not pretrained_cfg.hf_hub_id:
        raise UserError(
            f"classifier.name {name!r}: timm has no hub weights for it; give a local file as "
            "classifier.checkpoint or classifier.kwargs.pretrained_cfg_overlay.file"
        )
    repo_id = pretrained_cfg.hf_hub_id.partition("@")[0]
    names = [pretrained_cfg.hf_hub_filename] if pretrained_cfg.hf_hub_filename else []
    names = names or ["model.safetensors", "pytorch_model.bin"]  # timm's order of preference
    what = f"classifier.name {name} (pretrained)"
    for filename in names[:-1]:
        try:
            return hub_snapshot(repo_id, what, files=[filename]) / filename
        except UserError:
            continue  # the repository may hold only the next format
    return hub_snapshot(repo_id, what, files=names[-1:]) / names[-1]


def _create_timm(cfg: dict):
    import timm

    kwargs = dict(cfg.get("kwargs") or {})
    pretrained = bool(cfg.get("pretrained"))
    if pretrained:
        file = timm_pretrained_file(cfg["name"], kwargs)
        overlay = {**(kwargs.pop("pretrained_cfg_overlay", None) or {}), "file": str(file)}
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # a random-init classifier is the same in every process
            return timm.create_model(
                cfg["name"], pretrained=pretrained, num_classes=cfg["num_classes"], **kwargs
            )
    except (RuntimeError, TypeError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"classifier.name {cfg['name']!r}: cannot build it: {first}") from None


def _check_pretrained_classes(model, cfg: dict) -> None:
    """timm silently gives a pretrained model of another class count a random head."""
    found = model.pretrained_cfg.get("num_classes")
    if found and found != cfg["num_classes"]:
        raise UserError(
            f"classifier.num_classes is {cfg['num_classes']} but timm's pretrained "
            f"{cfg['name']} has {found} classes (its head would be random); set "
            f"num_classes: {found}, or give a fine-tuned classifier.checkpoint instead"
        )


def _load_checkpoint(model, cfg: dict) -> None:
    state = read_state_dict(Path(cfg["checkpoint"]))
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


def _build_timm(cfg: dict) -> Classifier:
    import timm

    if cfg.get("pretrained") and cfg.get("checkpoint") is not None:
        raise UserError("classifier.pretrained and classifier.checkpoint exclude each other: "
                        "the checkpoint would replace every pretrained weight")
    model = _create_timm(cfg)
    if cfg.get("pretrained"):
        _check_pretrained_classes(model, cfg)
    if cfg.get("checkpoint") is not None:
        _load_checkpoint(model, cfg)
    elif not cfg.get("pretrained"):
        log.warning("classifier.checkpoint is null: %s has random weights", cfg["name"])
    data = timm.data.resolve_data_config({}, model=model)
    found = {
        "input_size": data["input_size"][-1],
        "mean": list(data["mean"]),
        "std": list(data["std"]),
        "interpolation": data["interpolation"],
    }
    size, mean, std, interpolation = _preprocessing(cfg, found)
    return Classifier(model.eval(), size, mean, std, interpolation)


# ----------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------


class LogitsOf(nn.Module):
    """A transformers image classifier as a function pixel_values -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's name for it, which the fine-tuning loop calls."""
        if enable:
            self.model.gradient_checkpointing_enable()
        else:
            self.model.gradient_checkpointing_disable()


def _square(value, what: str) -> int | None:
    """An image processor's size entry as one side length."""
    if value is None or isinstance(value, int):
        return value
    if "shortest_edge" in value:
        return int(value["shortest_edge"])
    height, width = value.get("height"), value.get("width")
    if height is None or height != width:
        raise UserError(f"{what} {value} is not square; set classifier.input_size")
    return int(height)


def processor_preprocessing(root: Path) -> dict:
    """input_size, mean, std, interpolation from <root>/preprocessor_config.json."""
    file = root / "preprocessor_config.json"
    config = json.loads(file.read_text()) if file.is_file() else {}
    rescale = config.get("rescale_factor", 1 / 255)
    if config.get("do_rescale", True) and abs(rescale - 1 / 255) > 1e-9:
        raise UserError(f"{file}: rescale_factor {config['rescale_factor']} is not 1/255")
    size = None
    if config.get("do_resize", True):
        key = "crop_size" if config.get("do_center_crop") and config.get("crop_size") else "size"
        size = _square(config.get(key), f"{file} {key}")
    resample = config.get("resample", 2)  # PIL.Image.BILINEAR, the processors' usual default
    normalize = config.get("do_normalize", True)
    return {
        "input_size": size,
        "mean": list(config.get("image_mean", [0.5] * 3)) if normalize else [0.0] * 3,
        "std": list(config.get("image_std", [0.5] * 3)) if normalize else [1.0] * 3,
        "interpolation": PIL_RESAMPLE.get(resample, f"PIL resample {resample}"),
    }


def _build_transformers(cfg: dict) -> Classifier:
    from transformers import AutoModelForImageClassification

    if cfg.get("checkpoint") is not None or cfg.get("pretrained"):
        raise UserError("classifier.checkpoint and classifier.pretrained are timm's; with "
                        "source: transformers, name the model directory or hub id")
    root = resolve_dir(cfg["name"], "classifier.name")
    try:
        model = AutoModelForImageClassification.from_pretrained(root, **(cfg.get("kwargs") or {}))
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"classifier.name {cfg['name']}: cannot load it: {first}") from None
    if model.config.num_labels != cfg["num_classes"]:
        raise UserError(f"classifier.name {cfg['name']} has {model.config.num_labels} classes "
                        f"but classifier.num_classes is {cfg['num_classes']}")
    size, mean, std, interpolation = _preprocessing(cfg, processor_preprocessing(root))
    return Classifier(LogitsOf(model).eval(), size, mean, std, interpolation)


def classifier_files(cfg: dict) -> list[Path]:
    """The local files a classifier's weights come from, for the run's fingerprint."""
    if _get(cfg, "source", "timm") == "transformers":
        root = resolve_dir(cfg["name"], "classifier.name")
        return sorted(p for p in root.rglob("*")
                      if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
    if cfg.get("checkpoint") is not None:
        return [regular_file(cfg["checkpoint"], "classifier.checkpoint")]
    if cfg.get("pretrained"):
        return [timm_pretrained_file(cfg["name"], dict(cfg.get("kwargs") or {}))]
    return []
