"""sigma -> timestep and one-shot x0 recovery (docs/design.md §1.1)."""

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from msscale.errors import UserError
from msscale.models.loading import load_denoiser
from msscale.models.tiny import make_tiny_models
from msscale.smoothing.denoise import OneShotDenoiser, timestep_for_sigma, x0_from_model_output


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_timestep_is_the_closest_abar(schedule, sigma):
    abar = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule).alphas_cumprod
    t = timestep_for_sigma(abar, sigma)
    target = 1 / (1 + 4 * sigma**2)
    gaps = (abar.double() - target).abs()
    assert gaps[t] == gaps.min()
    # abar decreases with t, so the neighbours bracket the target or t is an end point
    assert t in (0, 999) or (abar[t - 1] >= target >= abar[t + 1])


def test_larger_sigma_means_later_timestep():
    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    ts = [timestep_for_sigma(abar, s) for s in (0.1, 0.25, 0.5, 1.0, 2.0)]
    assert ts == sorted(ts) and len(set(ts)) == 5


def _forward(x0, eps, abar):
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_recovery_from_an_oracle(prediction_type):
    torch.manual_seed(0)
    x0, eps = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    abar = torch.tensor([0.9, 0.5, 0.2, 0.05]).view(-1, 1, 1, 1)
    x_t = _forward(x0, eps, abar)
    oracle = {
        "epsilon": eps,
        "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0,
        "sample": x0,
    }[prediction_type]
    torch.testing.assert_close(x0_from_model_output(oracle, x_t, abar, prediction_type), x0)
    learned_variance = torch.cat([oracle, torch.randn_like(oracle)], dim=1)
    torch.testing.assert_close(
        x0_from_model_output(learned_variance, x_t, abar, prediction_type), x0
    )


def test_wrong_channel_count_is_an_error():
    with pytest.raises(UserError, match="channels"):
        x0_from_model_output(
            torch.zeros(1, 5, 4, 4), torch.zeros(1, 3, 4, 4), torch.ones(1, 1, 1, 1), "epsilon"
        )


class OracleUNet(torch.nn.Module):
    """Returns the true noise of x_t given the clean image it was made from."""

    def __init__(self, clean, abar):
        super().__init__()
        self.clean, self.abar = clean, abar

    def forward(self, x_t, t):
        a = self.abar[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * (2 * self.clean - 1)) / (1 - a).sqrt()
        return type("Out", (), {"sample": eps})()


def test_one_shot_denoiser_maps_pixel_noise_to_the_model_scale():
    """With an oracle the whole pipeline (scaling, t*, recovery, [0,1] mapping) is exact."""
    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    torch.manual_seed(1)
    clean = torch.rand(2, 3, 8, 8) * 0.8 + 0.1
    denoiser = OneShotDenoiser(OracleUNet(clean, abar), abar, "epsilon")
    sigma = 0.5
    t = torch.full((2,), denoiser.timestep(sigma))
    noisy = clean + sigma * torch.randn_like(clean)
    torch.testing.assert_close(denoiser(noisy, t), clean, atol=1e-4, rtol=0)
    a = abar[t[0]]
    assert math.isclose(float((1 - a) / a), (2 * sigma) ** 2, rel_tol=0.02)


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler])
def test_load_denoiser_reads_any_scheduler_with_alphas_cumprod(tmp_path, scheduler_class):
    sections = make_tiny_models(tmp_path, prediction_type="v_prediction", learned_variance=True)
    path = sections["denoiser"]["path"]
    scheduler_class(num_train_timesteps=500, prediction_type="v_prediction").save_pretrained(
        f"{path}/scheduler"
    )
    denoiser = load_denoiser(path)
    assert denoiser.prediction_type == "v_prediction"
    assert len(denoiser.alphas_cumprod) == 500
    out = denoiser(torch.rand(2, 3, 16, 16), torch.tensor([10, 100]))
    assert out.shape == (2, 3, 16, 16) and out.min() >= 0 and out.max() <= 1


def test_unknown_scheduler_class_is_named(tmp_path):
    path = make_tiny_models(tmp_path)["denoiser"]["path"]
    config = f"{path}/scheduler/scheduler_config.json"
    data = json.loads(open(config).read())
    data["_class_name"] = "NoSuchScheduler"
    open(config, "w").write(json.dumps(data))
    with pytest.raises(UserError, match="NoSuchScheduler"):
        load_denoiser(path)
