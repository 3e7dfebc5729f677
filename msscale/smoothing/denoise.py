"""One-shot diffusion denoising (docs/design.md §1.1): sigma -> timestep, x_t, one UNet pass, x0.

Images live in [0,1]; the diffusion model works in [-1,1], where pixel noise of std sigma
becomes noise of std 2*sigma. A noisy image y = 2(x + sigma*delta) - 1 scaled by
sqrt(abar_t) is distributed like the forward process at the t whose abar_t is closest to
1 / (1 + (2 sigma)^2), so one model pass at that t estimates the clean image.
"""

from __future__ import annotations

import torch
from torch import nn

from msscale.errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# denoiser.fit: how images of another size than the UNet's meet it (docs/design.md §1.1):
# resized to it before the noise, or reflect-padded to it after the noise and cropped back.
FITS = ("resize", "pad")


def timestep_for_sigma(alphas_cumprod: torch.Tensor, sigma: float) -> int:
    """The timestep whose alphas_cumprod is closest to 1 / (1 + (2 sigma)^2)."""
    target = 1.0 / (1.0 + (2.0 * sigma) ** 2)
    return int(torch.argmin((alphas_cumprod.double() - target).abs()))


def x0_from_model_output(
    output: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Recover x0 in [-1,1] (unclamped) from the output at x_t = sqrt(abar) x0 + sqrt(1-abar) eps.

    A model with learned variance returns twice the image channels; the first half is the
    prediction. `abar` broadcasts against x_t (e.g. shape [B,1,1,1]).
    """
    channels = x_t.shape[1]
    if output.shape[1] == 2 * channels:
        output = output[:, :channels]
    elif output.shape[1] != channels:
        raise UserError(
            f"denoiser returns {output.shape[1]} channels for {channels}-channel input "
            f"(expected {channels}, or {2 * channels} with learned variance)"
        )
    sqrt_abar, sqrt_one_minus = abar.sqrt(), (1 - abar).sqrt()
    if prediction_type == "epsilon":
        return (x_t - sqrt_one_minus * output) / sqrt_abar
    if prediction_type == "v_prediction":
        return sqrt_abar * x_t - sqrt_one_minus * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


def model_input(noisy: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar) (2 noisy - 1): a pixel-scale noisy image as the UNet's input at t*."""
    return abar.sqrt() * (2 * noisy - 1)


def denoised_image(
    output: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The one-shot estimate of the clean image in [0,1] from the UNet's output at x_t."""
    x0 = x0_from_model_output(output, x_t, abar, prediction_type)
    return (x0.clamp(-1, 1) + 1) / 2


class OneShotDenoiser(nn.Module):
    """D_sigma: noisy image in pixel scale -> denoised image in [0,1], one UNet pass.

    The timestep is passed per sample, so one batch may mix noise scales. The UNet sees it
    multiplied by `timestep_scale`: models trained with rescaled timesteps (improved-DDPM's
    t * 1000 / 4000) record that factor beside their weights (msscale/models/loading.py).
    """

    def __init__(
        self,
        unet: nn.Module,
        alphas_cumprod: torch.Tensor,
        prediction_type: str,
        timestep_scale: float = 1.0,
        fit: str = "resize",
    ):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"scheduler prediction_type {prediction_type!r} is not supported")
        if fit not in FITS:
            raise UserError(f"denoiser.fit {fit!r} is not one of {list(FITS)}")
        self.unet = unet
        self.prediction_type = prediction_type
        self.timestep_scale = float(timestep_scale)
        self.fit = fit
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone(), persistent=False)

    def timestep(self, sigma: float) -> int:
        return timestep_for_sigma(self.alphas_cumprod, sigma)

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet is given for scheduler timesteps (integers unless rescaled)."""
        if self.timestep_scale == 1.0:
            return timesteps
        return timesteps.float() * self.timestep_scale

    def sample_size(self) -> tuple[int, int] | None:
        size = getattr(getattr(self.unet, "config", None), "sample_size", None)
        return (size, size) if isinstance(size, int) else (tuple(size) if size else None)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """noisy = x + sigma*delta (pixel scale), timesteps [B] from `timestep(sigma)`."""
        noisy, box = self._pad(noisy)
        abar = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1).to(noisy.dtype)
        x_t = model_input(noisy, abar)
        output = self.unet(x_t, self.model_timesteps(timesteps)).sample
        top, left, height, width = box
        denoised = denoised_image(output, x_t, abar, self.prediction_type)
        return denoised[..., top : top + height, left : left + width]

    def _pad(self, noisy: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """fit=pad: the noisy image reflected out to the UNet's size, and where it sits.

        Padding after the noise keeps the certified input the image at its own resolution:
        the denoiser, padding and crop included, is just part of the base classifier.
        """
        height, width = noisy.shape[-2:]
        size = self.sample_size() if self.fit == "pad" else None
        if size is None or size == (height, width):
            return noisy, (0, 0, height, width)
        rows, cols = size[0] - height, size[1] - width
        if min(rows, cols) < 0 or rows - rows // 2 >= height or cols - cols // 2 >= width:
            raise UserError(
                f"denoiser.fit=pad: cannot reflect {height}x{width} images out to the UNet's "
                f"{size[0]}x{size[1]} (they must be smaller, and larger than half of it); "
                "use denoiser.fit=resize"
            )
        top, left = rows // 2, cols // 2
        padded = nn.functional.pad(
            noisy, (left, cols - left, top, rows - top), mode="reflect"
        )
        return padded, (top, left, height, width)


# The classifier's resampling, by the names timm and PIL use; torch's "nearest-exact" samples
# pixel centres as PIL's NEAREST does.
INTERPOLATIONS = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}


def resize(images: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """Resize [B,C,H,W] images in [0,1] to size x size, antialiased when shrinking (as PIL)."""
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"interpolation {interpolation!r} is not one of {list(INTERPOLATIONS)}")
    mode = INTERPOLATIONS[interpolation]
    smooth = mode in ("bilinear", "bicubic")
    out = nn.functional.interpolate(
        images,
        size=(size, size),
        mode=mode,
        align_corners=False if smooth else None,
        antialias=smooth and max(images.shape[-2:]) > size,
    )
    # bicubic overshoots; PIL's resize of 8-bit images saturates at the pixel range
    return out.clamp(0, 1) if mode == "bicubic" else out


class Classifier(nn.Module):
    """A classifier behind its own preprocessing: [0,1] images of any size -> logits.

    Images are resized to `input_size` (None: left as they are) with `interpolation`, then
    normalised with `mean` and `std`; `model` maps the result to logits.
    """

    def __init__(self, model: nn.Module, input_size: int | None, mean, std,
                 interpolation: str = "bilinear"):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation {interpolation!r} is not one of {list(INTERPOLATIONS)}")
        self.model = model
        self.input_size = input_size
        self.interpolation = interpolation
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.input_size
        if size is not None and tuple(images.shape[-2:]) != (size, size):
            images = resize(images, size, self.interpolation)
        return self.model((images - self.mean.to(images.dtype)) / self.std.to(images.dtype))


class DenoiseAndClassify(nn.Module):
    """F(D_sigma(.)): the base classifier of denoised smoothing."""

    def __init__(self, denoiser: OneShotDenoiser, classifier: Classifier):
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoiser(noisy, timesteps))
