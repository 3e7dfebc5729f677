#!/usr/bin/env python
"""Fine-tune the denoiser (diffusion calibration) as a submitit job of N nodes.

    python tools/submit.py --cfg configs/finetune_imagenet.yaml --nodes 8 --gpus-per-node 8
    python tools/submit.py --cfg configs/finetune_digits.yaml --nodes 2 --cluster slurm

One task per GPU (one per node without GPUs). On preemption or timeout the job requeues
itself and resumes from <out>/checkpoints/latest; running the same command again after a
scancel resumes the same way. `--cluster local` runs the job's processes on this machine.
"""

import argparse
import sys

from msscale.cli import run_command
from msscale.finetune.job import submit_finetune


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", required=True, help="finetune YAML config")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int,
                        help="GPUs (= tasks) per node; default: the config's slurm.gpus_per_node")
    parser.add_argument("--cluster", default="slurm", choices=("slurm", "local", "debug"))
    parser.add_argument("--partition", help="Slurm partition (overrides slurm.partition)")
    parser.add_argument("--no-wait", action="store_true", help="submit and return at once")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    return run_command("submit", lambda: submit_finetune(
        args.cfg, args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        cluster=args.cluster, partition=args.partition, wait=not args.no_wait))

if __name__ == "__main__":
    sys.exit(main())
