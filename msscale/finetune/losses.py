"""The calibration objective of docs/design.md §1.4.

For an image x with label y at a scale sigma, and M noise draws with class probabilities
p_m = softmax(F(D_sigma(x + sigma*delta_m))):

    recoverable      = [argmax_c mean_m p_m == y]           (no gradient; rule "mean")
                     = [mean_m [argmax_c p_m == y] >= p0]   (rule "votes")
    Brier            = mean_m || p_m - onehot(y) ||^2       (consistency, recoverable pairs)
    AntiConsistency  = || mean_m p_m ||^2                   (the other pairs)

    L = E[ recoverable * Brier + lambda_ac * (1 - recoverable) * AntiConsistency ]
        + lambda_dm * L_diffusion

where E is the mean over the images of the batch and L_diffusion the model's own
denoising loss (mean squared error to its prediction target at random timesteps).
Probabilities are laid out [M, B, C]: draw, image, class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from msscale.finetune.schema import RECOVERABLE_RULES
from msscale.smoothing.denoise import PREDICTION_TYPES


def recoverable(
    probs: torch.Tensor, labels: torch.Tensor, rule: str = "mean", p0: float = 0.5
) -> torch.Tensor:
    """[B] float 0/1: whether the image counts as recoverable at its scale.

    "mean": the mean of the M draws' probabilities ranks y first (the paper's test).
    "votes": y is the argmax of at least a share p0 of the M draws, i.e. the cascade's own
    stopping rule (a scale stops where its top class holds >= p0 of the votes) would stop
    on y; a pair whose correct votes fall short is pushed to diversity, so that it defers.
    """
    with torch.no_grad():
        if rule == "mean":
            return (probs.mean(0).argmax(-1) == labels).to(probs.dtype)
        if rule == "votes":
            share = (probs.argmax(-1) == labels).to(probs.dtype).mean(0)
            return (share >= p0).to(probs.dtype)
        raise ValueError(f"recoverable rule {rule!r} is not one of {RECOVERABLE_RULES}")


def brier(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: mean over draws of the squared distance between p_m and onehot(y)."""
    onehot = F.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(-1).mean(0)


def anti_consistency(probs: torch.Tensor) -> torch.Tensor:
    """[B]: squared norm of the mean probability vector; smallest when the draws disagree."""
    return (probs.mean(0) ** 2).sum(-1)


def diffusion_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the UNet's prediction; a learned-variance half is ignored."""
    channels = target.shape[1]
    return F.mse_loss(output[:, :channels].float(), target.float())


def diffusion_target(
    x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet predicts at x_t = sqrt(abar) x0 + sqrt(1 - abar) noise."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


@dataclass
class CalibrationLoss:
    """The loss and its parts, per image where it has one (for logging per scale)."""

    total: torch.Tensor  # scalar: what backward runs on
    brier: torch.Tensor  # scalar: E[recoverable * Brier]
    anti_consistency: torch.Tensor  # scalar: E[(1 - recoverable) * AntiConsistency]
    diffusion: torch.Tensor  # scalar: L_diffusion
    recoverable: torch.Tensor  # [B] 0/1


def calibration_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    diffusion: torch.Tensor,
    *,
    lambda_ac: float,
    lambda_dm: float,
    rule: str = "mean",
    p0: float = 0.5,
) -> CalibrationLoss:
    """L of docs/design.md §1.4 from classifier logits [M, B, C], labels [B] and L_diffusion;
    `rule` and `p0` choose the recoverable test (see `recoverable`).

    Softmax runs in float32 so that bf16 logits give the same probabilities.
    """
    probs = logits.float().softmax(-1)
    rec = recoverable(probs, labels, rule, p0)
    brier_term = (rec * brier(probs, labels)).mean()
    ac_term = ((1 - rec) * anti_consistency(probs)).mean()
    total = brier_term + lambda_ac * ac_term + lambda_dm * diffusion
    return CalibrationLoss(total, brier_term, ac_term, diffusion, rec)
