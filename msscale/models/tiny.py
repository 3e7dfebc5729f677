"""Small real models built from configs (no download): for tests, benchmarks and the demo."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_unet(image_size: int = 16, channels: tuple[int, ...] = (16, 32), **overrides):
    """A small diffusers UNet2DModel for `image_size` RGB images."""
    from diffusers import UNet2DModel

    config = dict(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=channels,
        norm_num_groups=8,
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
    )
    config.update(overrides)
    return UNet2DModel(**config)


def make_tiny_models(
    out: str | Path,
    *,
    image_size: int = 16,
    num_classes: int = 10,
    classifier: str = "test_resnet",
    prediction_type: str = "epsilon",
    learned_variance: bool = False,
    seed: int = 0,
) -> dict:
    """Write a random tiny denoiser directory and classifier weights; return config sections."""
    import timm
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    from msscale.models.loading import save_denoiser

    out = Path(out)
    torch.manual_seed(seed)
    unet = tiny_unet(image_size, out_channels=6 if learned_variance else 3)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    save_denoiser(unet, scheduler, out / "denoiser")
    model = timm.create_model(classifier, pretrained=False, num_classes=num_classes)
    save_file(model.state_dict(), str(out / "classifier.safetensors"))
    return {
        "denoiser": {"path": str(out / "denoiser")},
        "classifier": {
            "name": classifier,
            "checkpoint": str(out / "classifier.safetensors"),
            "num_classes": num_classes,
            "input_size": image_size,
        },
    }
