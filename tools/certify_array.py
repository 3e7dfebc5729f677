#!/usr/bin/env python
"""Certify as a submitit job array, one task per shard, then merge the per-scale votes.

    python tools/certify_array.py --shards 64                # the embedded digits config
    python tools/certify_array.py --cfg configs/certify_imagenet.yaml --shards 64

The cluster is Slurm when a controller answers, else this machine (`--cluster local`).
Run the same command again on the same run directory to resume: finished shards are kept,
shards still queued on Slurm are waited for, the others are submitted again.
"""

import sys

from msscale.certify.array import array_parser, run_array_command
from msscale.errors import run_command


def main(argv=None) -> int:
    args = array_parser().parse_args(argv)
    return run_command("certify_array", lambda: run_array_command(args))


if __name__ == "__main__":
    sys.exit(main())
