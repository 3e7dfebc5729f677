"""The calibration forward pass (docs/design.md §1.4): scale sampling, M noisy draws through
the one-shot denoiser and the frozen classifier, and the diffusion regulariser."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Scales:
    """The cascade's scales as the loop uses them, on the training device."""

    sigmas: torch.Tensor  # [K]
    timesteps: torch.Tensor  # [K] long: t* of each sigma
    weights: torch.Tensor  # [K] sampling weights

    @classmethod
    def build(cls, cal: dict, alphas_cumprod: torch.Tensor, device) -> Scales:
        from msscale.smoothing.denoise import timestep_for_sigma

        sigmas = cal["sigmas"]
        weights = cal["sigma_weights"] or [1.0] * len(sigmas)
        return cls(
            torch.tensor(sigmas, device=device),
            torch.tensor([timestep_for_sigma(alphas_cumprod, s) for s in sigmas], device=device),
            torch.tensor(weights, dtype=torch.float32, device=device),
        )


def calibration_forward(
    unet, classifier, images, labels, *, scales: Scales, alphas_cumprod, prediction_type: str,
    draws: int, lambda_ac: float, lambda_dm: float, generator: torch.Generator,
    timestep_scale: float = 1.0, rule: str = "mean", p0: float = 0.5,
):
    """One micro-batch of the calibration loss (docs/design.md §1.4): (loss parts, scale [B]).

    Each image draws a scale, then M noisy copies go through the one-shot denoiser
    (msscale/smoothing/denoise.py's maths, with gradients) and the classifier. The diffusion
    regulariser's inputs, at uniform random timesteps, share the same UNet call, so every
    parameter is used exactly once per backward (what DDP expects).
    """
    from msscale.finetune.losses import calibration_loss, diffusion_loss, diffusion_target
    from msscale.smoothing.denoise import denoised_image, model_input

    batch, device = images.shape[0], images.device
    scale = torch.multinomial(scales.weights, batch, replacement=True, generator=generator)
    # M draws per image, draw-major: row m*B + b is draw m of image b, so .view(M, B, ...).
    sigma = scales.sigmas[scale].repeat(draws).view(-1, 1, 1, 1)
    t_cal = scales.timesteps[scale].repeat(draws)
    clean = images.repeat(draws, 1, 1, 1)
    noisy = clean + sigma * torch.randn(clean.shape, generator=generator, device=device)
    abar_cal = alphas_cumprod[t_cal].view(-1, 1, 1, 1)
    x_cal = model_input(noisy, abar_cal)

    x0 = 2 * images - 1
    noise = torch.randn(x0.shape, generator=generator, device=device)
    t_dm = torch.randint(0, len(alphas_cumprod), (batch,), generator=generator, device=device)
    abar_dm = alphas_cumprod[t_dm].view(-1, 1, 1, 1)
    x_dm = abar_dm.sqrt() * x0 + (1 - abar_dm).sqrt() * noise

    t_model = torch.cat([t_cal, t_dm])  # the UNet's timestep input (msscale/models/loading.py)
    if timestep_scale != 1.0:
        t_model = t_model.float() * timestep_scale
    output = unet(torch.cat([x_cal, x_dm]), t_model).sample
    out_cal, out_dm = output[: draws * batch], output[draws * batch:]
    denoised = denoised_image(out_cal, x_cal, abar_cal.to(out_cal.dtype), prediction_type)
    logits = classifier(denoised).view(draws, batch, -1)
    dm = diffusion_loss(out_dm, diffusion_target(x0, noise, abar_dm, prediction_type))
    parts = calibration_loss(logits, labels, dm, lambda_ac=lambda_ac, lambda_dm=lambda_dm,
                             rule=rule, p0=p0)
    return parts, scale


def null_loss(unet, images: torch.Tensor) -> torch.Tensor:
    """A zero loss whose gradient is zero for every parameter and that contains no NaN.

    It replaces a non-finite loss, so every rank still runs one backward per micro-batch
    (DDP and DeepSpeed need that) while nothing is learned from the bad batch. Under ZeRO-3
    a parameter is an empty tensor between uses (its slices live on the ranks), so there the
    zero comes from a UNet call on one blank image, which gathers the parameters as usual.
    """
    from msscale.finetune.zero3 import partitioned_parameters

    if partitioned_parameters(unet):
        blank = torch.zeros_like(images[:1])
        timestep = torch.zeros(1, dtype=torch.long, device=images.device)
        return unet(blank, timestep).sample.float().sum() * 0.0
    return sum(p.sum() for p in unet.parameters() if p.requires_grad) * 0.0
