"""`msscale bench` on tiny models: the figures are there and consistent (no timed assertions)."""

import json

import numpy as np
import pytest
import torch
import yaml

from msscale.bench.sampling import format_report, reference_votes, write_random_denoiser
from msscale.certify.schema import load_certify_config
from msscale.cli import main
from msscale.errors import UserError
from msscale.models.loading import build_smoothed_model, load_denoiser
from msscale.smoothing.sampling import count_votes, plan_blocks

SMOOTHING = {"sigmas": [0.25, 0.5, 1.0], "n0": 4, "n": 12, "batch_size": 8, "noise_block": 4}


def _bench_yaml(assets, tmp_path, **bench) -> str:
    cfg = {
        **assets,
        "device": "cpu",
        "smoothing": SMOOTHING,
        "bench": {"images": 2, "warmup": 1, "rounds": 2, **bench},
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_bench_json_has_both_ways_the_ratio_and_the_flops(assets, tmp_path, capsys):
    path = _bench_yaml(assets, tmp_path, schedule_images=4, schedule_n=48)
    overrides = ["smoothing.first_look=4", "smoothing.radius_tolerance=0.05", "smoothing.alpha=0.1"]
    assert main(["bench", "--cfg", path, *overrides, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    full = len(SMOOTHING["sigmas"]) * (SMOOTHING["n0"] + SMOOTHING["n"])
    for way in ("reference", "msscale", "cascade"):
        assert result[way]["samples_per_s"] > 0
        assert len(result[way]["seconds_per_round"]) == 2
    assert result["reference"]["evaluations_per_image"] == full
    assert result["msscale"]["evaluations_per_image"] == full
    assert 0 < result["cascade"]["evaluations_per_image"] <= full
    assert result["speedup"] > 0 and result["cascade_speedup_per_image"] > 0
    assert result["flops_per_sample"] > 0
    assert result["matmul_peak"]["fp32"]["flops_per_s"] > 0
    assert result["msscale"]["flops_per_s"] > 0 and result["msscale"]["peak_share"] > 0
    assert 0 <= result["top_class_agreement"] <= 1
    assert result["load_seconds_per_image"] > 0
    report = format_report(result)
    assert "msscale / reference:" in report and "model evaluations per image" in report
    assert "schedules on 4 images" in report
    # The schedules side by side, on the same 4 images at n = 48.
    schedules = result["schedules"]
    assert (schedules["images"], schedules["n"]) == (4, 48)
    assert schedules["sequential"]["looks"] == [4, 8, 16, 32, 48]
    assert (schedules["certificate"], schedules["sequential"]["stopping"]) == ("split", "radii")
    assert "deciding radii" in report
    rows = schedules["schedules"]
    full = len(SMOOTHING["sigmas"]) * (SMOOTHING["n0"] + 48)
    assert rows["full"]["evaluations_per_image"] == full
    assert SMOOTHING["n0"] + 48 <= rows["cascade"]["evaluations_per_image"] <= full
    assert SMOOTHING["n0"] + 4 <= rows["sequential"]["evaluations_per_image"] <= full
    for row in rows.values():
        assert row["seconds_per_image"] > 0
        accuracy = list(row["certified_accuracy"].values())
        assert all(0 <= b <= a <= 1 for a, b in zip(accuracy, accuracy[1:], strict=False))
    # The full and cascade schedules draw the same votes where both sample: same certificates.
    assert rows["full"]["certified_accuracy"] == rows["cascade"]["certified_accuracy"]


def test_reference_counts_sum_to_the_draws_per_image_and_scale(assets, tmp_path):
    cfg = load_certify_config(_bench_yaml(assets, tmp_path))
    model = build_smoothed_model(cfg, torch.device("cpu"))
    images = torch.rand(2, 3, 16, 16)
    timesteps = [model.denoiser.timestep(s) for s in SMOOTHING["sigmas"]]
    votes = reference_votes(model, images, SMOOTHING["sigmas"], timesteps, 5, 11, 4, 10)
    assert votes.shape == (2, 3, 2, 10)
    assert (votes[:, :, 0].sum(-1) == 5).all() and (votes[:, :, 1].sum(-1) == 11).all()


def test_padding_the_last_batch_and_channels_last_keep_the_votes(assets, tmp_path):
    cfg = load_certify_config(_bench_yaml(assets, tmp_path))
    model = build_smoothed_model(cfg, torch.device("cpu"))
    images = torch.rand(2, 3, 16, 16)
    sigmas = SMOOTHING["sigmas"]
    timesteps = [model.denoiser.timestep(s) for s in sigmas]
    blocks = plan_blocks([(0, 0), (1, 1)], [0, 2], {0: range(1), 1: range(3)}, {0: 4, 1: 11}, 4)

    def votes(**options):
        return count_votes(
            model, images, blocks, sigmas, timesteps, 10, seed=3, batch_size=7, **options
        )

    plain = votes()
    assert plain.sum() == 2 * 2 * (4 + 11)
    np.testing.assert_array_equal(votes(fixed_batch=True), plain)
    model.to(memory_format=torch.channels_last)
    np.testing.assert_array_equal(
        votes(channels_last=True, fixed_batch=True).sum(-1), plain.sum(-1)
    )


def test_random_denoiser_is_written_then_reused_and_checked(tmp_path):
    unet = {
        "sample_size": 8,
        "in_channels": 3,
        "out_channels": 6,
        "layers_per_block": 1,
        "block_out_channels": [8, 16],
        "norm_num_groups": 4,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    }
    write_random_denoiser(unet, tmp_path / "unet")
    denoiser = load_denoiser(tmp_path / "unet")
    assert list(denoiser.unet.config.block_out_channels) == [8, 16]
    write_random_denoiser(unet, tmp_path / "unet")  # same config: reused
    with pytest.raises(UserError, match="block_out_channels"):
        write_random_denoiser({**unet, "block_out_channels": [8, 32]}, tmp_path / "unet")


def test_random_inputs_need_no_data_set(assets, tmp_path, capsys):
    sections = {k: v for k, v in assets.items() if k != "data"}
    cfg = {
        **sections,
        "device": "cpu",
        "data": {"shards": "none"},
        "smoothing": {**SMOOTHING, "sigmas": [0.5]},
        "bench": {"images": 1, "warmup": 0, "rounds": 1, "inputs": "random"},
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["bench", "--cfg", str(path)]) == 0
    out = capsys.readouterr().out
    assert "msscale / reference:" in out and "reading and decoding" not in out


def test_one_look_sequential_is_the_cascade_schedule(assets, tmp_path):
    from msscale.bench.sampling import timed
    from msscale.bench.schedules import compare_schedules, format_schedules

    path = _bench_yaml(assets, tmp_path, schedule_images=3, schedule_n=20)
    cfg = load_certify_config(path, ["smoothing.first_look=20"])  # a single look, at n
    model = build_smoothed_model(cfg, torch.device("cpu"))
    result = compare_schedules(cfg, model, torch.device("cpu"), timed)
    rows = result["schedules"]
    assert result["sequential"]["looks"] == [20]
    for key in ("evaluations_per_image", "certified_accuracy"):
        assert rows["sequential"][key] == rows["cascade"][key]
    assert "sequential" in "\n".join(format_schedules(result))
