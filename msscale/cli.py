"""`msscale <subcommand>`: argument parsing and one call into the library per subcommand.

Bad input (msscale.errors.UserError) ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from msscale.errors import UserError, run_command
from msscale.smoothing.certificate import CERTIFICATES, Certificate

log = logging.getLogger("msscale")


def _add_cfg(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--cfg", required=required, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def cmd_make_shards(args) -> None:
    from msscale.data.shards import make_shards

    image_size = args.image_size
    if image_size is None and args.source == "digits":
        image_size = 16  # --image-size 0 stays 0, and is refused
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
    from msscale.certify.array import check_run_dir, record_config
    from msscale.certify.merge import merge_run
    from msscale.certify.schema import load_certify_config
    from msscale.certify.shard import run_shard
    from msscale.paths import run_lock

    cfg = load_certify_config(args.cfg, args.overrides)
    with run_lock(cfg["out"], "msscale certify"):  # one command writes a run directory
        check_run_dir(cfg)  # refuses a run directory holding work of another config
        run_shard(cfg, started=lambda: record_config(cfg))  # recorded once models load
        counts = merge_run(cfg["out"])
    log.info("certified %d images; results in %s", len(counts.index), cfg["out"])


def cmd_certify_shard(args) -> None:
    from msscale.certify.array import check_run_dir, record_config
    from msscale.certify.schema import load_certify_config
    from msscale.certify.shard import run_shard
    from msscale.paths import run_lock

    cfg = load_certify_config(args.cfg, args.overrides)
    if args.shards < 1 or args.sample_splits < 1:
        raise UserError("--shards and --sample-splits must be at least 1")
    total = args.shards * args.sample_splits
    if not 0 <= args.shard < total:
        raise UserError(f"--shard {args.shard} is outside 0..{total - 1}")
    check_run_dir(cfg)

    def started() -> None:
        # A task writes only its shard files; recording the config is the one shared write,
        # so it takes the lock briefly (the array's other tasks may be doing the same).
        with run_lock(cfg["out"], f"msscale certify-shard --shard {args.shard}", wait_s=60):
            check_run_dir(cfg)
            record_config(cfg)

    log.info("wrote %s", run_shard(cfg, args.shard, total, args.sample_splits, started))


def cmd_merge(args) -> None:
    from msscale.certify.merge import merge_run
    from msscale.paths import run_lock

    if not Path(args.run_dir).is_dir():
        raise UserError(f"run directory {args.run_dir} does not exist")
    with run_lock(args.run_dir, "msscale merge"):  # not while a command writes the run
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
    from msscale.certify.report import certify_counts, level, write_tsv
    from msscale.paths import output_file

    output_file(args.out, "--out", inputs=[args.counts])
    counts = load_counts(args.counts)
    alpha, p0 = level(counts, "alpha", args.alpha), level(counts, "p0", args.p0)
    sigmas = [args.single] if args.single is not None else args.sigmas
    if args.single is not None and args.p0 is None:
        p0 = 0.5  # a single scale is Cohen's CERTIFY unless a p0 is asked for
    certificate = _certificate(counts, args)
    write_tsv(certify_counts(counts, alpha, p0, sigmas, certificate), args.out)
    log.info("wrote %s (alpha=%g, p0=%g, scales=%s, %s certificate)", args.out, alpha, p0,
             sigmas or "all", (certificate or Certificate.from_meta(counts.meta)).rule)


def _certificate(counts, args):
    """The certificate --certificate/--stage-shares name; None: the one the counts record."""
    if args.certificate is None and args.stage_shares is None:
        return None
    return _certificate_option(args.certificate or Certificate.from_meta(counts.meta).rule,
                               args.stage_shares)


def _certificate_option(rule: str, shares) -> Certificate:
    """--certificate and --stage-shares as a Certificate, or one line naming what is wrong."""
    try:
        return Certificate(rule, shares)
    except ValueError as err:
        raise UserError(f"--certificate/--stage-shares: {err}") from None


def cmd_report(args) -> None:
    from msscale.certify.counts import load_counts
    from msscale.certify.report import REPORT_FILES, level, write_results
    from msscale.paths import output_dir, output_file

    out = output_dir(args.out, "--out")
    for name in REPORT_FILES:
        output_file(out / name, "--out", inputs=[args.counts])
    counts = load_counts(args.counts)
    alpha, p0 = level(counts, "alpha", args.alpha), level(counts, "p0", args.p0)
    write_results(args.out, counts, alpha, p0)
    log.info("wrote the report to %s", args.out)


def cmd_verify_data(args) -> None:
    from msscale.data.dataset import open_dataset

    dataset = open_dataset(args.dataset)
    if dataset.shard_sha256 is None:
        raise UserError(f"{args.dataset}: no dataset.json lists these shards, so there are no "
                        "checksums to verify")
    dataset.verify()
    log.info("%s: all %d shards match their recorded sha256", args.dataset, len(dataset.shards))


def cmd_bench(args) -> None:
    import json

    from msscale.bench.sampling import format_report, run_bench
    from msscale.certify.schema import load_certify_config
    from msscale.models.loading import resolve_device

    cfg = load_certify_config(args.cfg, args.overrides)
    result = run_bench(cfg, resolve_device(args.device or cfg["device"]))
    sys.stdout.write(json.dumps(result, indent=2) + "\n" if args.json else format_report(result))


def cmd_bench_sequential(args) -> None:
    import json

    from msscale.bench.sequential import format_simulation, run_simulation

    certificate = _certificate_option(args.certificate, args.stage_shares)
    results = run_simulation(
        args.counts, ns=args.n, tolerances=args.tolerance, n0=args.n0, alpha=args.alpha,
        p0=args.p0, noise_block=args.noise_block, first_look=args.first_look,
        look_growth=args.look_growth, prior=args.prior, replicates=args.replicates,
        seed=args.seed, radii=tuple(args.radii), certificate=certificate,
    )
    sys.stdout.write(json.dumps(results, indent=2) + "\n" if args.json
                     else format_simulation(results))


def cmd_bench_train(args) -> None:
    import json

    from msscale.bench.train import format_report, load_bench_train_config, run_bench_train

    result = run_bench_train(load_bench_train_config(args.cfg, args.overrides))
    sys.stdout.write(json.dumps(result, indent=2) + "\n" if args.json else format_report(result))


def cmd_ablate_calibration(args) -> None:
    from msscale.bench.calibration import format_ablation, load_ablation_config, run_ablation

    cfg = load_ablation_config(args.cfg, args.overrides)
    sys.stdout.write(format_ablation(run_ablation(cfg), cfg))


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


def cmd_import_denoiser(args) -> None:
    from msscale.models.openai_import import import_denoiser

    import_denoiser(args.checkpoint, args.arch, args.override, args.out)


def _add_import_denoiser(sub) -> None:
    from msscale.models.openai_unet import PRESETS

    p = sub.add_parser("import-denoiser", help="an OpenAI guided/improved-diffusion checkpoint "
                       "-> a denoiser directory for denoiser.path")
    p.add_argument("checkpoint", help="the .pt state dict, e.g. 256x256_diffusion_uncond.pt")
    p.add_argument("--arch", required=True, choices=sorted(PRESETS), help="the published model")
    p.add_argument("--override", action="append", default=[], metavar="FLAG=VALUE",
                   help="a guided-diffusion model flag, e.g. num_channels=128 (repeatable)")
    p.add_argument("--out", required=True, help="the directory to write (must not exist)")
    p.set_defaults(func=cmd_import_denoiser)


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

    p = sub.add_parser("verify-data", help="check the shards against dataset.json's sha256")
    p.add_argument("dataset", help="a dataset.json, its directory, or a shard URL beside one")
    p.set_defaults(func=cmd_verify_data)

    p = sub.add_parser("recertify", help="certificates from counts alone")
    p.add_argument("counts")
    p.add_argument("--alpha", type=float)
    p.add_argument("--p0", type=float)
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--sigmas", type=_float_list, help="cascade over these scales, e.g. 0.25,0.5"
    )
    group.add_argument("--single", type=float, help="Cohen's CERTIFY at this one scale")
    p.add_argument("--certificate", choices=CERTIFICATES,
                   help="split or paper (docs/design.md §1.2); default: the counts' own")
    p.add_argument("--stage-shares", type=_float_list,
                   help="split: each stage's share of alpha, largest sigma first, e.g. "
                   "0.8,0.1,0.1 (default: the counts' own, else 4/5 to the largest)")
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

    p = sub.add_parser(
        "bench-sequential",
        help="simulate full / cascade / sequential from a full run's counts (no model)",
    )
    p.add_argument("counts", help="counts.npz of a run with smoothing.schedule=full")
    p.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000],
                   help="estimation draws to simulate (default: 10000 100000)")
    p.add_argument("--radii", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5],
                   help="the radii the radii-deciding rule decides and every row reports")
    p.add_argument("--tolerance", type=float, nargs="*", default=[0.02],
                   help="radius tolerances of the tolerance rule, one row each (none: no row)")
    p.add_argument("--certificate", choices=CERTIFICATES, default="split")
    p.add_argument("--stage-shares", type=_float_list,
                   help="split: each stage's share of alpha, largest sigma first")
    p.add_argument("--n0", type=int, default=100, help="selection draws per scale")
    p.add_argument("--alpha", type=float, help="default: the run's")
    p.add_argument("--p0", type=float, help="default: the run's")
    p.add_argument("--noise-block", type=int, default=100, help="looks fall on its multiples")
    p.add_argument("--first-look", type=int, help="default: n/100")
    p.add_argument("--look-growth", type=float, default=2.0)
    p.add_argument("--prior", type=float, default=0.01,
                   help="added to every class's votes before they become probabilities")
    p.add_argument("--replicates", type=int, default=10, help="simulated runs over the images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_bench_sequential)

    p = sub.add_parser("bench-train", help="fine-tuning memory and speed per engine (DDP, ZeRO)")
    _add_cfg(p)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_bench_train)

    p = sub.add_parser("ablate-calibration",
                       help="fine-tune and certify the digits per calibration setting")
    _add_cfg(p)
    p.set_defaults(func=cmd_ablate_calibration)

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

    _add_import_denoiser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"msscale {args.command}", lambda: args.func(args), args.verbose)
