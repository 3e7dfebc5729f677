"""Classifiers people have (timm pretrained, transformers) and denoisers by hub id, offline.

Nothing is downloaded: every test runs with huggingface_hub in offline mode and its cache
pointed at a temporary directory. Hub ids resolve through a cache laid out as
huggingface_hub lays it out (models--owner--name/refs/main naming a snapshot directory).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from msscale.certify.schema import load_certify_config
from msscale.cli import main
from msscale.errors import UserError
from msscale.models.loading import build_classifier, load_denoiser, model_fingerprint
from msscale.models.tiny import make_tiny_models
from msscale.smoothing.denoise import Classifier, OneShotDenoiser, resize

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in offline mode (read at call time by huggingface_hub)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Copy `source`'s files into the cache as the snapshot of repo_id's main branch."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def classifier_cfg(**values) -> dict:
    """A `classifier` section as the config schema completes it."""
    base = {"source": "timm", "pretrained": False, "checkpoint": None, "input_size": None,
            "interpolation": None, "mean": None, "std": None, "kwargs": {}}
    return {**base, **values}


# ----------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------


def _saved_timm(tmp_path, name="test_resnet", num_classes=1000) -> tuple[Path, dict]:
    import timm

    torch.manual_seed(5)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    file = tmp_path / f"{name}.safetensors"
    save_file(model.state_dict(), str(file))
    return file, model.state_dict()


def _same_weights(classifier: Classifier, state: dict) -> bool:
    ours = classifier.model.state_dict()
    return all(torch.equal(ours[k], v) for k, v in state.items())


def test_timm_pretrained_from_a_local_file_goes_through_timms_loader(tmp_path):
    file, state = _saved_timm(tmp_path)
    cfg = classifier_cfg(name="test_resnet", num_classes=1000, pretrained=True,
                         kwargs={"pretrained_cfg_overlay": {"file": str(file)}})
    classifier = build_classifier(cfg)
    assert _same_weights(classifier, state)
    # test_resnet's own data config: 160 px, bilinear, mean/std 0.5
    assert (classifier.input_size, classifier.interpolation) == (160, "bilinear")


def test_timm_pretrained_by_name_comes_from_the_hub_cache(tmp_path, hub_cache):
    file, state = _saved_timm(tmp_path, "test_vit")
    weights = tmp_path / "repo"
    weights.mkdir()
    shutil.copy(file, weights / "model.safetensors")
    put_in_cache(hub_cache, "timm/test_vit.r160_in1k", weights)
    cfg = classifier_cfg(name="test_vit", num_classes=1000, pretrained=True)
    classifier = build_classifier(cfg)
    assert _same_weights(classifier, state)
    assert (classifier.input_size, classifier.interpolation) == (160, "bicubic")
    assert torch.allclose(classifier.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))


def test_timm_pretrained_offline_and_not_cached_names_the_id_and_the_fix():
    cfg = classifier_cfg(name="test_vit", num_classes=1000, pretrained=True)
    with pytest.raises(UserError) as err:
        build_classifier(cfg)
    message = str(err.value)
    assert "timm/test_vit.r160_in1k" in message and "hf download" in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_timm_pretrained_with_another_class_count_is_refused(tmp_path):
    file, _ = _saved_timm(tmp_path)
    cfg = classifier_cfg(name="test_resnet", num_classes=10, pretrained=True,
                         kwargs={"pretrained_cfg_overlay": {"file": str(file)}})
    with pytest.raises(UserError, match="has 1000 classes"):
        build_classifier(cfg)


def test_config_preprocessing_overrides_the_models(tmp_path):
    cfg = classifier_cfg(name="test_vit", num_classes=10, input_size=32,
                         interpolation="nearest", mean=[0.1, 0.2, 0.3], std=[1.0, 1.0, 1.0])
    classifier = build_classifier(cfg)
    assert (classifier.input_size, classifier.interpolation) == (32, "nearest")
    assert torch.allclose(classifier.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))


# ----------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    """A transformers ViT classifier for 16x16 images, 10 classes, with its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    root = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=10)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(root)
    ViTImageProcessor(size={"height": 16, "width": 16}, resample=3,
                      image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3]).save_pretrained(root)
    return root


def test_transformers_classifier_matches_its_image_processor(tiny_vit):
    from transformers import ViTForImageClassification, ViTImageProcessor

    classifier = build_classifier(classifier_cfg(source="transformers", name=str(tiny_vit),
                                                 num_classes=10))
    assert (classifier.input_size, classifier.interpolation) == (16, "bicubic")
    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    processor = ViTImageProcessor.from_pretrained(tiny_vit)
    inputs = processor(images=list(pixels), return_tensors="pt")
    model = ViTForImageClassification.from_pretrained(tiny_vit).eval()
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        expected = model(**inputs).logits
        torch.testing.assert_close(classifier.eval()(images), expected, atol=1e-5, rtol=1e-5)


def test_transformers_classifier_by_hub_id_from_the_cache(tiny_vit, hub_cache):
    put_in_cache(hub_cache, "someone/tiny-vit-digits", tiny_vit)
    cfg = classifier_cfg(source="transformers", name="someone/tiny-vit-digits", num_classes=10)
    assert build_classifier(cfg).input_size == 16


def test_transformers_hub_id_offline_and_not_cached(tiny_vit):
    cfg = classifier_cfg(source="transformers", name="someone/not-cached", num_classes=10)
    with pytest.raises(UserError) as err:
        build_classifier(cfg)
    assert "someone/not-cached" in str(err.value) and "hf download someone/not-cached" in str(
        err.value)


def test_transformers_class_count_is_checked(tiny_vit):
    cfg = classifier_cfg(source="transformers", name=str(tiny_vit), num_classes=100)
    with pytest.raises(UserError, match="has 10 classes but classifier.num_classes is 100"):
        build_classifier(cfg)


def test_unsupported_resample_asks_for_an_explicit_interpolation(tiny_vit, tmp_path):
    copy = tmp_path / "vit"
    shutil.copytree(tiny_vit, copy)
    config = json.loads((copy / "preprocessor_config.json").read_text())
    config["resample"] = 1  # PIL LANCZOS
    (copy / "preprocessor_config.json").write_text(json.dumps(config))
    cfg = classifier_cfg(source="transformers", name=str(copy), num_classes=10)
    with pytest.raises(UserError, match="interpolation 'PIL resample 1'"):
        build_classifier(cfg)
    assert build_classifier({**cfg, "interpolation": "bicubic"}).interpolation == "bicubic"


def test_bicubic_upsampling_stays_in_the_pixel_range():
    images = torch.zeros(1, 3, 8, 8)
    images[..., ::2, :] = 1.0  # stripes: bicubic overshoots on them
    out = resize(images, 32, "bicubic")
    raw = torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic")
    assert raw.max() > 1 and out.max() <= 1 and out.min() >= 0


# ----------------------------------------------------------------------------------------
# Denoisers: hub ids, fit=pad
# ----------------------------------------------------------------------------------------


def test_denoiser_by_hub_id_from_the_cache(tmp_path, hub_cache):
    sections = make_tiny_models(tmp_path / "models")
    put_in_cache(hub_cache, "someone/tiny-ddpm", Path(sections["denoiser"]["path"]))
    denoiser = load_denoiser("someone/tiny-ddpm")
    local = load_denoiser(sections["denoiser"]["path"])
    x, t = torch.rand(2, 3, 16, 16), torch.tensor([5, 500])
    with torch.inference_mode():
        torch.testing.assert_close(denoiser(x, t), local(x, t))


def test_denoiser_with_the_scheduler_beside_the_unet(tmp_path, hub_cache):
    """The google/ddpm-* layout: config.json, weights and scheduler_config.json together."""
    sections = make_tiny_models(tmp_path / "models")
    flat = tmp_path / "flat"
    shutil.copytree(sections["denoiser"]["path"], flat)
    shutil.move(flat / "scheduler" / "scheduler_config.json", flat / "scheduler_config.json")
    (flat / "scheduler").rmdir()
    put_in_cache(hub_cache, "someone/flat-ddpm", flat)
    assert len(load_denoiser("someone/flat-ddpm").alphas_cumprod) == 1000


def test_missing_local_denoiser_is_named(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        load_denoiser(str(tmp_path / "nowhere"))


def test_fit_pad_reflects_the_noisy_image_and_crops_the_result(tmp_path):
    sections = make_tiny_models(tmp_path / "models", image_size=16)
    padded = load_denoiser(sections["denoiser"]["path"], fit="pad")
    plain = load_denoiser(sections["denoiser"]["path"])
    noisy, t = torch.rand(2, 3, 12, 12), torch.tensor([50, 300])
    reflected = torch.nn.functional.pad(noisy, (2, 2, 2, 2), mode="reflect")
    with torch.inference_mode():
        out = padded(noisy, t)
        torch.testing.assert_close(out, plain(reflected, t)[..., 2:14, 2:14])
    assert out.shape == noisy.shape
    with pytest.raises(UserError, match="denoiser.fit=pad"):
        padded(torch.rand(1, 3, 4, 4), t[:1])  # reflection needs more than half the size


def test_fit_pad_certifies_at_the_datas_resolution(tmp_path):
    """16 px digits, a 32 px UNet: the noise is drawn at 16 px, the UNet sees 32 px."""
    from msscale.data.shards import make_shards
    from msscale.models.loading import build_smoothed_model
    from msscale.smoothing.schedules import fit_to_denoiser

    sections = make_tiny_models(tmp_path / "models", image_size=32)
    make_shards("digits", tmp_path / "digits", split="test", image_size=16, shard_size=100)
    cfg = {
        **sections,
        "out": str(tmp_path / "run"),
        "denoiser": {**sections["denoiser"], "fit": "pad"},
        "data": {"shards": str(tmp_path / "digits" / "dataset.json"), "max_images": 2},
        "smoothing": {"n0": 4, "n": 8, "batch_size": 8, "noise_block": 4},
        "device": "cpu",
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    model = build_smoothed_model(load_certify_config(tmp_path / "c.yaml"), torch.device("cpu"))
    assert fit_to_denoiser(torch.rand(1, 3, 16, 16), model).shape[-1] == 16
    assert main(["certify", "--cfg", str(tmp_path / "c.yaml")]) == 0
    assert len((tmp_path / "run" / "certify.tsv").read_text().splitlines()) == 3


# ----------------------------------------------------------------------------------------
# Certification with a transformers classifier, and fingerprints
# ----------------------------------------------------------------------------------------


def test_certify_with_a_transformers_classifier_and_its_fingerprint(tmp_path, tiny_vit):
    from msscale.data.shards import make_shards

    sections = make_tiny_models(tmp_path / "models", image_size=16)
    make_shards("digits", tmp_path / "digits", split="test", image_size=16, shard_size=100)
    cfg = {
        "denoiser": sections["denoiser"],
        "classifier": {"source": "transformers", "name": str(tiny_vit), "num_classes": 10},
        "out": str(tmp_path / "run"),
        "data": {"shards": str(tmp_path / "digits" / "dataset.json"), "max_images": 2},
        "smoothing": {"n0": 4, "n": 8, "batch_size": 8, "noise_block": 4},
        "device": "cpu",
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["certify", "--cfg", str(path)]) == 0
    assert len((tmp_path / "run" / "certify.tsv").read_text().splitlines()) == 3
    before = model_fingerprint(load_certify_config(path))
    weights = tiny_vit / "model.safetensors"
    state = load_file(weights)
    save_file({k: v + 1 for k, v in state.items()}, str(weights))
    try:
        assert model_fingerprint(load_certify_config(path)) != before
    finally:
        save_file(state, str(weights))


def test_one_shot_denoiser_refuses_an_unknown_fit():
    with pytest.raises(UserError, match="denoiser.fit"):
        OneShotDenoiser(torch.nn.Identity(), torch.ones(3), "epsilon", fit="crop")
