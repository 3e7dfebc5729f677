"""submitit executors: Slurm or this machine (`local`, `debug`), and the choice between them."""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import sys
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

from msscale.config import Key
from msscale.errors import UserError

log = logging.getLogger(__name__)

CLUSTERS = ("auto", "slurm", "local", "debug")

# The `slurm` section of every job config.
SLURM = {
    "partition": Key(str, None, nullable=True),
    "account": Key(str, None, nullable=True),
    "qos": Key(str, None, nullable=True),
    "gpus_per_node": Key(int, 0, min=0),
    "cpus_per_task": Key(int, 1, min=1),
    "mem_gb": Key(int, 4, min=1),
    "time_min": Key(int, 60, min=1),
    "array_parallelism": Key(int, 256, min=1),
}


def resolve_cluster(choice: str) -> str:
    """`auto` -> `slurm` when a Slurm controller answers, else `local`; says which in the log."""
    if choice not in CLUSTERS:
        raise UserError(f"--cluster {choice!r} is not one of {list(CLUSTERS)}")
    if choice != "auto":
        return choice
    if slurm_answers():
        log.info("--cluster auto: a Slurm controller answers (scontrol ping): using Slurm")
        return "slurm"
    log.info("--cluster auto: no Slurm controller answers: running on this machine (local)")
    return "local"


def slurm_answers(timeout_s: float = 15.0) -> bool:
    """True when sbatch is installed and `scontrol ping` reports a controller UP."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return ping.returncode == 0 and " is UP" in ping.stdout


@contextmanager
def submission_errors(cluster: str):
    """submitit's answer when a cluster takes no jobs (no srun here: RuntimeError; sbatch
    failing: FailedJobError, a RuntimeError; a command missing: OSError) as one UserError.

    submitit also prints a failing sbatch's stderr itself; that text is held back (the
    error repeats it) and passed on only when the submission succeeds.
    """
    held = io.StringIO()
    try:
        with redirect_stderr(held):
            yield
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"cannot submit to {cluster}: {reason}") from None
    sys.stderr.write(held.getvalue())


def make_executor(
    cluster: str,
    folder: str | Path,
    slurm: dict,
    *,
    nodes: int = 1,
    tasks_per_node: int = 1,
    name: str = "msscale",
    array_parallelism: int | None = None,
):
    """A submitit AutoExecutor for `cluster` with resources from a config's `slurm` section.

    On Slurm, jobs are requeued on preemption and timeout by submitit's checkpointing
    (the submitted callable's `checkpoint` method decides what to resubmit).
    """
    import submitit

    cluster = resolve_cluster(cluster)
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {
        "name": name,
        "nodes": nodes,
        "tasks_per_node": tasks_per_node,
        "cpus_per_task": slurm["cpus_per_task"],
        "timeout_min": slurm["time_min"],
    }
    if cluster == "slurm":
        params.update(mem_gb=slurm["mem_gb"], slurm_signal_delay_s=60)
        if slurm["gpus_per_node"]:
            params["gpus_per_node"] = slurm["gpus_per_node"]
        for key in ("partition", "account", "qos"):
            if slurm[key]:
                params[f"slurm_{key}"] = slurm[key]
        params["slurm_array_parallelism"] = array_parallelism or slurm["array_parallelism"]
    executor.update_parameters(**params)
    return executor
