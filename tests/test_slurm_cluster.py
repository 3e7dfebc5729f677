"""Real jobs through the local Slurm cluster (see tests/slurm_cluster.py, tests/conftest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import submitit
from slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm

TESTS_DIR = Path(__file__).resolve().parent
#: Executor parameters that work on the test cluster (two nodes of 1 CPU, 4000 MB each).
#: The job unpickles functions of this module by name, so tests/ must be on its PYTHONPATH.
SLURM_PARAMS = {
    "slurm_partition": "debug",
    "timeout_min": 5,
    "mem_gb": 1,
    "cpus_per_task": 1,
    "slurm_setup": [f"export PYTHONPATH={TESTS_DIR}${{PYTHONPATH:+:$PYTHONPATH}}"],
}


def square_and_where(x: int) -> dict:
    """Job body: ``x**2`` plus where it ran (Slurm node, rank, array task)."""
    env = submitit.JobEnvironment()
    return {
        "square": x * x,
        "global_rank": env.global_rank,
        "node": os.environ["SLURMD_NODENAME"],
        "host": socket.gethostname(),
        "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
    }


def rank_and_node() -> tuple[int, int, str]:
    """Job body: (global rank, world size, Slurm node name) of this task."""
    env = submitit.JobEnvironment()
    return env.global_rank, env.num_tasks, os.environ["SLURMD_NODENAME"]


def sleep_long() -> str:
    """Job body that runs far longer than the tests wait, to be cancelled."""
    time.sleep(300)
    return "not cancelled"


def make_executor(folder: Path, **params: object) -> submitit.AutoExecutor:
    """An AutoExecutor bound to the Slurm cluster with SLURM_PARAMS (+ ``params``)."""
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    assert executor.cluster == "slurm"
    executor.update_parameters(**{**SLURM_PARAMS, **params})
    return executor


def wait_for_state(cluster: SlurmCluster, job_id: str, states: set[str], timeout: float) -> str:
    """Poll ``scontrol`` until the job's state is in ``states``; return it (or fail)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = cluster.job_state(job_id)
        if state in states:
            return state
        time.sleep(0.2)
    pytest.fail(f"job {job_id} still {state!r} after {timeout} s, wanted {states}")


def test_map_array_returns_results(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """A submitit job array of 4 tasks runs on the cluster and its results come back."""
    executor = make_executor(tmp_path / "logs", slurm_array_parallelism=4)
    jobs = executor.map_array(square_and_where, [1, 2, 3, 4])
    results = [job.result() for job in jobs]
    assert [r["square"] for r in results] == [1, 4, 9, 16]
    assert {r["global_rank"] for r in results} == {0}
    assert sorted(r["array_task"] for r in results) == ["0", "1", "2", "3"]
    assert {r["node"] for r in results} <= set(slurm_cluster.nodes)
    for job in jobs:  # the result file is written a moment before the job ends
        wait_for_state(slurm_cluster, job.job_id, {"COMPLETED"}, timeout=10)


def test_two_node_job_has_two_ranks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """A nodes=2, tasks_per_node=1 job gets ranks 0 and 1 on two distinct Slurm nodes."""
    executor = make_executor(tmp_path / "logs", nodes=2, tasks_per_node=1)
    job = executor.submit(rank_and_node)
    results = job.results()
    assert sorted(rank for rank, _, _ in results) == [0, 1]
    assert {size for _, size, _ in results} == {2}
    assert sorted(node for _, _, node in results) == sorted(slurm_cluster.nodes)


def test_sbatch_wait_writes_output(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """`sbatch --wait` of a tiny script returns once the job ran, and its output is there."""
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/bash\necho \"hello from $SLURMD_NODENAME job $SLURM_JOB_ID\"\n")
    out = tmp_path / "hello.out"
    cmd = ["sbatch", "--wait", "--parsable", "-p", "debug", "-o", str(out), str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    job_id = proc.stdout.strip().split(";")[0]
    assert out.read_text().startswith("hello from node")
    assert f"job {job_id}" in out.read_text()
    wait_for_state(slurm_cluster, job_id, {"COMPLETED"}, timeout=10)


def test_scancel_ends_running_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """scancel of a running submitit job: CANCELLED in Slurm and in submitit, no result."""
    executor = make_executor(tmp_path / "logs")
    job = executor.submit(sleep_long)
    wait_for_state(slurm_cluster, job.job_id, {"RUNNING"}, timeout=30)
    job.cancel()  # runs `scancel <id>`
    wait_for_state(slurm_cluster, job.job_id, {"CANCELLED"}, timeout=30)
    squeue = subprocess.run(["squeue", "-h", "-j", job.job_id], capture_output=True, text=True)
    assert squeue.stdout.strip() == ""
    assert not job.paths.result_pickle.exists()
    error = job.exception()  # needs sacct (the stand-in here) to learn the job ended
    assert isinstance(error, submitit.core.utils.UncompletedJobError)
    assert job.state == "CANCELLED"
