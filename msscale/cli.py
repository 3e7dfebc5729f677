"""`msscale <subcommand>`: argument parsing and one call into the library per subcommand.

Bad input (msscale.errors.UserError) ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from msscale.errors import UserError, run_command

log = logging.getLogger("msscale")


def _add_cfg(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--cfg", required=required, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def cmd_make_shards(args) -> None:
    from msscale.data.shards import make_shards

    image_size = args.image_size or (16 if args.source == "digits" else None)
    info = make_shards(
        args.source,
        args.out,
        split=args.split,
        image_size=image_size,
        shard_size=args.shard_size,
        skip_bad=args.skip_bad,
    )
    log.info("wrote %d images in %d shards to %s", info["count"], len(info["shards"]), args.out)


def cmd_certify(args) -> None:
    from msscale.certify.array import prepare_run_dir
    from msscale.certify.merge import merge_run
    from msscale.certify.schema import load_certify_config
    from msscale.certify.shard import run_shard

    cfg = load_certify_config(args.cfg, args.overrides)
    prepare_run_dir(cfg)  # refuses a run directory made with another config
    run_shard(cfg)
    counts = merge_run(cfg["out"])
    log.info("certified %d images; results in %s", len(counts.index), cfg["out"])


def cmd_certify_shard(args) -> None:
    from msscale.certify.array import prepare_run_dir
    from msscale.certify.schema import load_certify_config
    from msscale.certify.shard import run_shard

    cfg = load_certify_config(args.cfg, args.overrides)
    total = args.shards * args.sample_splits
    if not 0 <= args.shard < total:
        raise UserError(f"--shard {args.shard} is outside 0..{total - 1}")
    prepare_run_dir(cfg)
    log.info("wrote %s", run_shard(cfg, args.shard, total, args.sample_splits))


def cmd_merge(args) -> None:
    from msscale.certify.merge import merge_run

    counts = merge_run(args.run_dir)
    log.info("merged %d images into %s", len(counts.index), Path(args.run_dir) / "counts.npz")


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def cmd_recertify(args) -> None:
    from msscale.certify.counts import load_counts
    from msscale.certify.report import certify_counts, write_tsv

    counts = load_counts(args.counts)
    alpha = args.alpha if args.alpha is not None else counts.meta["alpha"]
    p0 = args.p0 if args.p0 is not None else counts.meta["p0"]
    sigmas = [args.single] if args.single is not None else args.sigmas
    if args.single is not None and args.p0 is None:
        p0 = 0.5  # a single scale is Cohen's CERTIFY unless a p0 is asked for
    write_tsv(certify_counts(counts, alpha, p0, sigmas), args.out)
    log.info("wrote %s (alpha=%g, p0=%g, scales=%s)", args.out, alpha, p0, sigmas or "all")


def cmd_report(args) -> None:
    from msscale.certify.counts import load_counts
    from msscale.certify.report import write_results

    counts = load_counts(args.counts)
    alpha = args.alpha if args.alpha is not None else counts.meta["alpha"]
    p0 = args.p0 if args.p0 is not None else counts.meta["p0"]
    write_results(args.out, counts, alpha, p0)
    log.info("wrote the report to %s", args.out)


def cmd_bench(args) -> None:
    import json

    from msscale.bench.sampling import format_report, run_bench
    from msscale.certify.schema import load_certify_config
    from msscale.models.loading import resolve_device

    cfg = load_certify_config(args.cfg, args.overrides)
    result = run_bench(cfg, resolve_device(args.device or cfg["device"]))
    sys.stdout.write(json.dumps(result, indent=2) + "\n" if args.json else format_report(result))


def cmd_bench_train(args) -> None:
    import json

    from msscale.bench.train import format_report, load_bench_train_config, run_bench_train

    result = run_bench_train(load_bench_train_config(args.cfg, args.overrides))
    sys.stdout.write(json.dumps(result, indent=2) + "\n" if args.json else format_report(result))


def cmd_predict(args) -> None:
    from msscale.certify.predict import run_predict
    from msscale.certify.schema import load_certify_config

    cfg = load_certify_config(args.cfg, args.overrides)
    run_predict(cfg, args.n)
    log.info("wrote %s", Path(cfg["out"]) / "predict.tsv")


def cmd_demo(args) -> None:
    from msscale.demo.run import run_demo

    run_demo(args.out, quick=args.quick)


def cmd_train_demo_models(args) -> None:
    from msscale.demo.models import ASSETS, train_demo_models

    train_demo_models(Path(args.out) if args.out else ASSETS)


def cmd_finetune(args) -> None:
    from msscale.finetune.job import cmd_finetune as finetune

    finetune(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msscale", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-shards", help="write WebDataset shards + dataset.json")
    p.add_argument(
        "--source", required=True, help="'digits', an image-folder tree, or a CIFAR-10 batches dir"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="test", choices=("train", "test", "all"))
    p.add_argument("--image-size", type=int, default=None, help="digits: 16 (default) or 32")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images instead of failing"
    )
    p.set_defaults(func=cmd_make_shards)

    p = sub.add_parser("certify", help="certify a shard set in one process")
    _add_cfg(p)
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("certify-shard", help="one task of a job array (used by slurm/*.sbatch)")
    _add_cfg(p)
    p.add_argument("--shard", type=int, required=True, help="task id, 0 .. shards*splits-1")
    p.add_argument("--shards", type=int, required=True, help="image groups")
    p.add_argument("--sample-splits", type=int, default=1)
    p.set_defaults(func=cmd_certify_shard)

    p = sub.add_parser("merge", help="merge a run's shards into counts.npz and results")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("recertify", help="certificates from counts alone")
    p.add_argument("counts")
    p.add_argument("--alpha", type=float)
    p.add_argument("--p0", type=float)
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--sigmas", type=_float_list, help="cascade over these scales, e.g. 0.25,0.5"
    )
    group.add_argument("--single", type=float, help="Cohen's CERTIFY at this one scale")
    p.add_argument("--out", required=True, help="the certify.tsv to write")
    p.set_defaults(func=cmd_recertify)

    p = sub.add_parser("report", help="summary.json, report.md and the plot from counts.npz")
    p.add_argument("counts")
    p.add_argument("--out", required=True, help="directory to write into")
    p.add_argument("--alpha", type=float)
    p.add_argument("--p0", type=float)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="time certification sampling against the reference way")
    _add_cfg(p)
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: the config's device")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-train", help="fine-tuning memory and speed per engine (DDP, ZeRO)")
    _add_cfg(p)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_bench_train)

    p = sub.add_parser("predict", help="the cascade's prediction without a certificate")
    p.add_argument("--n", type=int, default=200, help="draws per image and scale")
    _add_cfg(p)
    p.set_defaults(func=cmd_predict)

    from msscale.finetune.job import finetune_arguments

    p = sub.add_parser("finetune", parents=[finetune_arguments()],
                       help="calibration fine-tuning in this process (or torchrun's)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("demo", help="the whole method on scikit-learn's digits, on this machine")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="fewer images, draws and steps (CI)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-demo-models", help="retrain the demo's UNet and classifier")
    p.add_argument("--out", default=None, help="default: the package's assets/demo")
    p.set_defaults(func=cmd_train_demo_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"msscale {args.command}", lambda: args.func(args), args.verbose)
