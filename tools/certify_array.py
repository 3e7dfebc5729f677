#!/usr/bin/env python
"""Certify as a submitit job array, one task per shard, then merge the per-scale votes.

    python tools/certify_array.py --cfg configs/certify_digits.yaml --shards 8 --cluster slurm

Run the same command again on the same run directory to resume: finished shards are kept,
shards still queued on Slurm are waited for, the others are submitted again.
"""

import argparse
import sys

from msscale.certify.array import run_array
from msscale.certify.schema import load_certify_config
from msscale.cli import run_command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", required=True, help="certify YAML config")
    parser.add_argument("--shards", type=int, required=True,
                        help="image groups (the array has shards x sample-splits tasks)")
    parser.add_argument("--sample-splits", type=int, default=1,
                        help="also split each image group's estimation draws M ways")
    parser.add_argument("--cluster", default="slurm", choices=("slurm", "local", "debug"),
                        help="where shards run: Slurm (default), processes on this machine, "
                        "or one after another in this process (debug)")
    parser.add_argument("--out", help="run directory (overrides the config's `out`)")
    parser.add_argument("--array-parallelism", type=int, help="most tasks running at once")
    parser.add_argument("--no-wait", action="store_true",
                        help="(slurm) submit and return at once; run again to wait and merge")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. smoothing.n=1000 slurm.partition=gpu")
    args = parser.parse_args(argv)
    overrides = args.overrides + ([f"out={args.out}"] if args.out else [])

    def certify() -> None:
        cfg = load_certify_config(args.cfg, overrides)
        run_array(cfg, args.cluster, args.shards, args.sample_splits,
                  args.array_parallelism, wait=not args.no_wait)

    return run_command("certify_array", certify)

if __name__ == "__main__":
    sys.exit(main())
