"""scripts/gpu_check.sh runs end to end: its CPU path with tiny sizes (MSSCALE_GPU_CHECK_TINY).

The GPU run itself needs a GPU; this checks that every step of the script works (import,
bench of both pipelines, fine-tuning steps of both) and that it writes its JSON figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_script_runs_tiny_on_the_cpu(tmp_path):
    env = {
        **os.environ,
        "MSSCALE_GPU_CHECK_TINY": "1",
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    out = tmp_path / "out"
    status = json.loads((out / "status.json").read_text())
    failed = {k: v for k, v in status["steps"].items() if v["exit_code"]}
    assert run.returncode == 0 and not failed, f"{failed}\n{run.stderr[-3000:]}"
    assert len(status["steps"]) == 12
    for name in ("imagenet", "cifar10"):
        bench = json.loads((out / f"bench_{name}.json").read_text())
        assert bench["flops_per_sample"] > 0 and bench["msscale"]["samples_per_s"] > 0
        finetune = json.loads((out / f"finetune_{name}.json").read_text())
        assert finetune["perf/steps_per_s"] > 0 and "loss/total" in finetune
    assert (out / "models" / "iddpm_cifar10_uncond" / "msscale_denoiser.json").is_file()
