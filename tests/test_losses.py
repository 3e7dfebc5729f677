"""The calibration objective (docs/design.md §1.4) on hand-made numbers; where gradients go."""

from __future__ import annotations

import math

import pytest
import torch

from msscale.finetune.losses import anti_consistency, brier, calibration_loss, recoverable

# Two draws (M=2) of three-class probabilities for two images (B=2).
# Image 0, label 0: mean of the draws [0.6, 0.25, 0.15] -> class 0, recoverable.
# Image 1, label 2: mean of the draws [0.15, 0.7, 0.15] -> class 1, not recoverable.
PROBS = torch.tensor([
    [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]],  # draw 1
    [[0.5, 0.3, 0.2], [0.2, 0.6, 0.2]],  # draw 2
], dtype=torch.float64)
LABELS = torch.tensor([0, 2])
# Worked by hand:
#   Brier(image 0) = mean(|(.7,.2,.1)-(1,0,0)|^2, |(.5,.3,.2)-(1,0,0)|^2) = (0.14 + 0.38) / 2
#   AntiConsistency(image 1) = .15^2 + .7^2 + .15^2
BRIER_0 = 0.26
AC_1 = 0.535


def test_terms_on_hand_made_probabilities():
    assert recoverable(PROBS, LABELS).tolist() == [1.0, 0.0]
    assert brier(PROBS, LABELS)[0].item() == pytest.approx(BRIER_0)
    assert anti_consistency(PROBS)[1].item() == pytest.approx(AC_1)
    # Image 1's Brier and image 0's anti-consistency exist but must not enter the loss.
    expected = ((.01 + .64 + .81) + (.04 + .36 + .64)) / 2
    assert brier(PROBS, LABELS)[1].item() == pytest.approx(expected)


def test_votes_rule_follows_the_cascade_threshold_not_the_mean():
    # Label 0; two draws vote 0 confidently, two vote 1 weakly: the mean ranks 0 first.
    probs = torch.tensor([[[0.9, 0.1, 0.0]], [[0.9, 0.1, 0.0]],
                          [[0.4, 0.6, 0.0]], [[0.4, 0.6, 0.0]]])
    label = torch.tensor([0])
    assert recoverable(probs, label, "mean").tolist() == [1.0]
    assert recoverable(probs, label, "votes", p0=0.5).tolist() == [1.0]  # 2 of 4 votes
    assert recoverable(probs, label, "votes", p0=0.75).tolist() == [0.0]
    with pytest.raises(ValueError, match="not one of"):
        recoverable(probs, label, "median")


def test_total_loss_weights_each_term_as_designed():
    logits = PROBS.log()  # softmax(log p) = p
    parts = calibration_loss(logits, LABELS, torch.tensor(0.1, dtype=torch.float64),
                             lambda_ac=0.5, lambda_dm=2.0)
    # L = mean_b[rec*Brier + lambda_ac*(1-rec)*AC] + lambda_dm * L_diffusion
    assert parts.brier.item() == pytest.approx(BRIER_0 / 2)
    assert parts.anti_consistency.item() == pytest.approx(AC_1 / 2)
    assert parts.total.item() == pytest.approx((BRIER_0 + 0.5 * AC_1) / 2 + 2.0 * 0.1)
    assert parts.recoverable.tolist() == [1.0, 0.0]


def test_anti_consistency_is_smallest_when_draws_disagree():
    agree = torch.tensor([[[0.9, 0.05, 0.05]], [[0.9, 0.05, 0.05]]])
    disagree = torch.tensor([[[0.9, 0.05, 0.05]], [[0.05, 0.9, 0.05]]])
    assert anti_consistency(disagree).item() < anti_consistency(agree).item()
    assert anti_consistency(torch.full((4, 1, 10), 0.1)).item() == pytest.approx(0.1)


def _tiny_models(seed: int = 0):
    from msscale.models.loading import build_classifier
    from msscale.models.tiny import tiny_unet

    torch.manual_seed(seed)
    unet = tiny_unet(16)
    classifier = build_classifier({
        "name": "test_resnet", "checkpoint": None, "num_classes": 10, "input_size": 16,
        "mean": None, "std": None, "kwargs": {},
    }).requires_grad_(False).eval()
    return unet, classifier


def _forward(unet, classifier, lambda_dm: float, seed: int = 3):
    from diffusers import DDPMScheduler

    from msscale.finetune.objective import Scales, calibration_forward

    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.float()
    cal = {"sigmas": [0.25, 0.5, 1.0], "sigma_weights": None}
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(4, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 10, (4,), generator=generator)
    parts, scale = calibration_forward(
        unet, classifier, images, labels, scales=Scales.build(cal, alphas, "cpu"),
        alphas_cumprod=alphas, prediction_type="epsilon", draws=2, lambda_ac=1.0,
        lambda_dm=lambda_dm, generator=generator)
    return parts, scale


def test_gradients_reach_the_unet_through_the_frozen_classifier():
    unet, classifier = _tiny_models()
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    # lambda_dm = 0: any UNet gradient has come back through the classifier.
    parts, scale = _forward(unet, classifier, lambda_dm=0.0)
    assert math.isfinite(parts.total.item()) and scale.shape == (4,)
    parts.total.backward()
    grads = [p.grad for p in unet.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in classifier.parameters())
    optimizer.step()
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_gradient_checkpointing_gives_the_same_gradients():
    plain_unet, classifier = _tiny_models()
    ckpt_unet, _ = _tiny_models()
    ckpt_unet.enable_gradient_checkpointing()
    classifier_ckpt = _tiny_models()[1]
    classifier_ckpt.model.set_grad_checkpointing(True)
    for unet, clf in ((plain_unet, classifier), (ckpt_unet, classifier_ckpt)):
        unet.train()
        _forward(unet, clf, lambda_dm=1.0)[0].total.backward()
    for (name, a), b in zip(plain_unet.named_parameters(), ckpt_unet.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
