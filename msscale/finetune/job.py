"""Fine-tuning as a job: one process here, or N nodes x G tasks through submitit.

- `run_finetune(cfg_path, overrides)`: the loop in this process (also under torchrun or
  `accelerate launch`, which set the distributed environment themselves);
  `msscale finetune --cfg ...` and `python -m msscale.finetune.job --cfg ...` call it.
- `submit_finetune(...)`: a submitit job of `nodes` nodes with one task per GPU (one per
  node on CPUs). Each task copies rank, world size and master address from submitit's
  JobEnvironment into the torch.distributed variables and runs the same loop. On
  preemption or timeout `FinetuneJob.checkpoint` requeues the job; the loop resumes from
  `<out>/checkpoints/latest` (msscale/finetune/checkpoints.py, the one name both use).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import zlib
from pathlib import Path

from msscale.cluster import CLUSTERS
from msscale.errors import UserError, run_command
from msscale.logs import setup_logging

log = logging.getLogger(__name__)

MIN_PORT, PORT_RANGE = 20000, 20000


def master_port(job_id: str) -> int:
    """A port from the job id: the same for every task, and again after a requeue."""
    return MIN_PORT + zlib.crc32(str(job_id).encode()) % PORT_RANGE


def master_addr(node: str) -> str:
    """An address for Slurm node `node`: its name when it resolves, else its NodeAddr.

    Slurm node names are usually host names; where they are not (several slurmd on one
    host, as in the tests), `scontrol show node` knows the address.
    """
    try:
        socket.getaddrinfo(node, None)
        return node
    except socket.gaierror:
        pass
    try:
        text = subprocess.run(["scontrol", "show", "node", node], capture_output=True,
                              text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"cannot resolve the master node {node!r}: {err}") from None
    for field in text.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    raise RuntimeError(f"cannot resolve the master node {node!r}: no NodeAddr in scontrol")


def distributed_env(job_env) -> dict[str, str]:
    """torch.distributed's env:// variables for this submitit task (MAE's recipe)."""
    per_node = max(job_env.num_tasks // job_env.num_nodes, 1)
    hostnames = list(job_env.hostnames)
    return {
        "MASTER_ADDR": master_addr(hostnames[0]) if job_env.num_tasks > 1 else "127.0.0.1",
        "MASTER_PORT": str(master_port(job_env.job_id)),
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(per_node),
    }


class FinetuneJob:
    """The submitted callable: every task of the job runs the training loop.

    It holds only the resolved config; imports happen in __call__, so the submitting
    process stays light and the pickle small.
    """

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def __call__(self) -> str:
        import submitit

        from msscale.finetune.loop import train

        setup_logging()
        env = distributed_env(submitit.JobEnvironment())
        os.environ.update(env)
        log.info("task %s of %s, master %s:%s", env["RANK"], env["WORLD_SIZE"],
                 env["MASTER_ADDR"], env["MASTER_PORT"])
        return str(train(self.cfg))

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption or timeout: requeue the same job."""
        import submitit

        from msscale.finetune.checkpoints import latest_checkpoint

        log.info("requeueing; the job resumes from %s", latest_checkpoint(self.cfg["out"]))
        return submitit.helpers.DelayedSubmission(FinetuneJob(self.cfg))


def _resolved_config(cfg_path, overrides) -> dict:
    from msscale.config import save_config
    from msscale.finetune.schema import load_finetune_config

    cfg = load_finetune_config(*config_or_default(cfg_path, overrides))
    if os.environ.get("RANK", "0") == "0":
        save_config(cfg, Path(cfg["out"]) / "config.yaml")
    return cfg


def run_finetune(cfg_path, overrides=()) -> Path:
    """Fine-tune in this process (one of several under torchrun); returns <out>/final."""
    from msscale.finetune.loop import train

    return train(_resolved_config(cfg_path, overrides))


def submit_finetune(
    cfg_path,
    overrides=(),
    *,
    nodes: int = 1,
    gpus_per_node: int | None = None,
    cluster: str = "auto",
    partition: str | None = None,
    wait: bool = True,
):
    """Submit the fine-tuning job; with `wait`, block until it ends and return <out>/final.

    One task per GPU (gpus_per_node from the flag, else the config's slurm section); one
    task per node without GPUs. `local` runs the nodes x tasks as processes on this
    machine; `debug` runs one process in this one.
    """
    from msscale.cluster import make_executor, resolve_cluster, submission_errors
    from msscale.config import save_config
    from msscale.finetune.schema import load_finetune_config

    cluster = resolve_cluster(cluster)
    cfg_path, overrides = config_or_default(cfg_path, overrides)
    if nodes < 1:
        raise UserError(f"--nodes must be at least 1, got {nodes}")
    cfg = load_finetune_config(cfg_path, overrides)
    slurm = dict(cfg["slurm"])
    if gpus_per_node is not None:
        slurm["gpus_per_node"] = gpus_per_node
    if partition is not None:
        slurm["partition"] = partition
    cfg["slurm"] = slurm
    tasks = max(slurm["gpus_per_node"], 1)
    if cluster == "debug" and nodes * tasks > 1:
        raise UserError("--cluster debug runs one process; use --cluster local for several")
    if cluster == "local":  # one machine: the nodes' tasks become local processes
        nodes, tasks = 1, nodes * tasks
    out = Path(cfg["out"])
    save_config(cfg, out / "config.yaml")
    with submission_errors(cluster):  # no Slurm here, or sbatch refusing: one line
        executor = make_executor(cluster, out / "submitit" / "%j", slurm, nodes=nodes,
                                 tasks_per_node=tasks, name="msscale-finetune")
        job = executor.submit(FinetuneJob(cfg))
    log.info("submitted job %s (%d node(s) x %d task(s)); logs in %s", job.job_id, nodes,
             tasks, out / "submitit")
    if not wait:
        return job
    results = job.results()
    log.info("job %s finished: %s", job.job_id, results[0])
    return Path(results[0])


# ---------------------------------------------------------------------------------------
# Command line: `msscale finetune` (msscale/cli.py) and `python -m msscale.finetune.job`
# ---------------------------------------------------------------------------------------


def finetune_arguments() -> argparse.ArgumentParser:
    """The trainer's arguments, as a parent parser: `msscale finetune`, `python -m
    msscale.finetune.job` and tools/submit.py (which adds only the launcher's) share them."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--cfg", help="finetune YAML config (default: the embedded digits one)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def submit_parser() -> argparse.ArgumentParser:
    """tools/submit.py: the trainer's arguments plus nodes, GPUs, cluster and partition."""
    parser = argparse.ArgumentParser(prog="tools/submit.py", parents=[finetune_arguments()],
                                     description=submit_finetune.__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int,
                        help="GPUs (= tasks) per node; default: the config's slurm.gpus_per_node")
    parser.add_argument("--cluster", default="auto", choices=CLUSTERS,
                        help="auto (default): Slurm when a controller answers, else local")
    parser.add_argument("--partition", help="Slurm partition (overrides slurm.partition)")
    parser.add_argument("--no-wait", action="store_true", help="submit and return at once")
    return parser


def config_or_default(cfg_path, overrides) -> tuple:
    """(cfg_path, overrides), or the embedded digits config when no path is given."""
    if cfg_path is not None:
        return cfg_path, list(overrides)
    from msscale.demo.embedded import finetune_default

    default_path, defaults = finetune_default()
    log.info("no --cfg: the embedded default, %s", default_path)
    return default_path, [*defaults, *overrides]


def cmd_finetune(args) -> None:
    """`msscale finetune --cfg C [key=value ...]`: train in this process (or torchrun's)."""
    final = run_finetune(args.cfg, args.overrides)
    log.info("fine-tuned denoiser in %s", final)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msscale.finetune.job",
                                     parents=[finetune_arguments()],
                                     description=cmd_finetune.__doc__)
    args = parser.parse_args(argv)
    return run_command("msscale finetune", lambda: cmd_finetune(args))


if __name__ == "__main__":
    raise SystemExit(main())
