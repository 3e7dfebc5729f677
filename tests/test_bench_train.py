"""`msscale bench-train` on a tiny topology: real torchrun processes per configuration, the
JSON it prints, a configuration that does not fit its memory budget reported as such
(measured, the bench carries on) rather than crashing the bench, and no rank outliving a
configuration the bench stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = {"sample_size": 16, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
             "block_out_channels": [16, 32], "norm_num_groups": 8,
             "down_block_types": ["DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D"]}


def _bench(tmp_path: Path, **bench) -> tuple[subprocess.CompletedProcess, dict | None]:
    cfg = {"out": str(tmp_path / "out"), "arch": "tiny", "unet": TINY_UNET,
           "classifier": {"name": "test_resnet", "num_classes": 10, "input_size": 16},
           "bench": {"procs": 2, "warmup_steps": 1, "steps": 1, **bench}}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "msscale", "bench-train", "--cfg", str(path),
                           "--json"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return done, json.loads(done.stdout) if done.returncode == 0 else None


def test_zero3_run_reports_memory_time_and_its_partition(tmp_path):
    done, result = _bench(tmp_path, engines=["zero3"])
    assert done.returncode == 0, done.stderr[-4000:]
    (run,) = result["runs"]
    assert {"arch": "tiny", "zero_stage": 3, "offload": False, "procs": 2,
            "fits": True}.items() <= run.items()
    assert run["parameters"] == 164563  # the whole UNet, counted from its partitions
    assert run["local_parameters"] < 0.6 * run["parameters"]  # this rank's share
    assert 0.2 < run["peak_rss_gb_per_rank"] < run["mem_budget_gb"]
    assert run["step_seconds"] > 0
    assert run["images_per_s"] == pytest.approx(run["images_per_s_per_device"] * 2, abs=1e-3)
    assert run["images_per_s"] == pytest.approx(2 / run["step_seconds"], rel=0.05)
    assert run["images_per_step"] == 2  # one image per device, two devices


def test_configuration_over_its_memory_budget_did_not_fit(tmp_path):
    done, result = _bench(tmp_path, engines=["ddp", "zero2"], mem_budget_gb=0.3,
                          mem_reserve_gb=0.0)
    assert done.returncode == 0, done.stderr[-4000:]
    assert [run["engine"] for run in result["runs"]] == ["ddp", "zero2"]  # it went on
    for run in result["runs"]:
        assert run["fits"] is False, run
        assert "memory" in run["reason"], run
        assert run["step_seconds"] is None


def test_configuration_stopped_mid_training_leaves_no_rank_behind(tmp_path):
    done, result = _bench(tmp_path, engines=["zero2"], warmup_steps=0, steps=10**6,
                          timeout_min=1.0)
    assert done.returncode == 0, done.stderr[-4000:]
    (run,) = result["runs"]
    assert run["fits"] is None and run["reason"].startswith("timed out"), run
    assert any(phase.startswith("step ") for phase in run["reached"]), run
    # torchrun starts each rank in a session of its own: none may outlive the bench.
    left = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not left, f"ranks left behind: {left}"
