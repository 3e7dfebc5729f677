#!/usr/bin/env python
"""Fine-tune the denoiser (diffusion calibration) as a submitit job of N nodes.

    python tools/submit.py --cfg configs/finetune_imagenet.yaml --nodes 8 --gpus-per-node 8
    python tools/submit.py --nodes 2          # the embedded digits config, Slurm if it answers

One task per GPU (one per node without GPUs). On preemption or timeout the job requeues
itself and resumes from <out>/checkpoints/latest; running the same command again after a
scancel resumes the same way. Without a Slurm controller the job's processes run on this
machine (`--cluster local`).
"""

import sys

from msscale.errors import run_command
from msscale.finetune.job import submit_finetune, submit_parser


def main(argv=None) -> int:
    args = submit_parser().parse_args(argv)
    return run_command("submit", lambda: submit_finetune(
        args.cfg, args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        cluster=args.cluster, partition=args.partition, wait=not args.no_wait))


if __name__ == "__main__":
    sys.exit(main())
