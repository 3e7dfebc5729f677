"""tools/submit.py on the local two-node Slurm cluster: a 2-node fine-tuning job is
cancelled after a checkpoint, the same command resumes it, and it exports a denoiser."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from test_train import TRAINER_STATE, assets, write_cfg  # noqa: F401  (assets: a fixture)

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 80


def _submit(cfg: Path, *extra: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/submit.py", "--cfg", str(cfg), "--nodes", "2",
         "--cluster", "slurm", "--partition", "debug", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def test_two_node_job_survives_scancel_and_resubmit(slurm_cluster, assets, tmp_path):  # noqa: F811
    from msscale.models.loading import load_denoiser

    cfg = write_cfg(assets, tmp_path, "slurm",
                    # long enough that scancel (plus submitit's grace period) lands mid-way
                    train={"max_steps": MAX_STEPS, "checkpoint_every": 4, "log_every": 4},
                    slurm={"cpus_per_task": 1, "mem_gb": 1, "time_min": 15})
    out = tmp_path / "slurm"
    latest = out / "checkpoints" / "latest"

    first = _submit(cfg, "--no-wait", timeout=120)
    assert first.returncode == 0, first.stderr
    job_id = re.search(r"submitted job (\d+)", first.stderr).group(1)
    deadline = time.monotonic() + 240
    while not latest.exists() and time.monotonic() < deadline:
        assert slurm_cluster.job_state(job_id) in ("PENDING", "RUNNING", "CONFIGURING"), \
            _logs(out) + slurm_cluster.logs_tail()
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    while slurm_cluster.job_state(job_id) not in ("CANCELLED", "COMPLETED", "FAILED"):
        time.sleep(0.5)
    saved = latest.read_text().strip()
    saved_step = int(saved.split("-")[1])
    assert saved_step < MAX_STEPS, f"the job finished ({saved}) before it could be cancelled"

    second = _submit(cfg, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:] + _logs(out)
    logs = _logs(out)
    assert f"resumed from {out / 'checkpoints' / saved} at step {saved_step}" in logs
    assert "task 0 of 2" in logs and "task 1 of 2" in logs
    assert latest.read_text().strip() == f"step-{MAX_STEPS:08d}"
    assert (out / "config.yaml").is_file()
    denoiser = load_denoiser(out / "final")  # what a certify config's denoiser.path loads
    assert denoiser.unet.config.sample_size == 16


def _logs(out: Path) -> str:
    files = sorted((out / "submitit").rglob("*.err"))
    return "\n".join(p.read_text(errors="replace") for p in files)
