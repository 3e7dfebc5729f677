"""Helpers of scripts/gpu_check.sh: random-weight stand-ins and figures, nothing downloaded.

    checkpoint --arch ARCH --out FILE [--override FLAG=VALUE ...]
        an OpenAI-format checkpoint (torch.save of guided_diffusion's UNetModel state dict,
        seeded random weights) for `msscale import-denoiser`
    vit --out DIR [--image-size N] [--tiny]
        a random transformers ViT-B/16 image classifier (10 classes) with its image
        processor config, the shape of the CIFAR-10 classifier the configs name
    flops --cfg CFG [key.sub=value ...]
        FLOPs of one sample (denoiser + classifier, torch.utils.flop_counter) as JSON
    tb RUN_DIR
        a fine-tuning run's TensorBoard scalars (last value of each) as JSON
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def checkpoint(args) -> None:
    from guided_diffusion.script_util import (
        create_model_and_diffusion,
        model_and_diffusion_defaults,
    )

    from msscale.models.openai_unet import resolve_flags

    flags = resolve_flags(args.arch, args.override)
    kwargs = {key: flags[key] for key in model_and_diffusion_defaults()}
    kwargs["use_fp16"] = False
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**kwargs)
    torch.save(model.state_dict(), args.out)


def vit(args) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    size = args.image_size
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64) if args.tiny else {}  # else ViT-B/16's defaults
    config = ViTConfig(image_size=size, patch_size=16, num_labels=10, **shape)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(args.out)
    ViTImageProcessor(size={"height": size, "width": size}, resample=2,
                      image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(args.out)


def flops(args) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from msscale.certify.schema import load_certify_config
    from msscale.models.loading import build_smoothed_model

    cfg = load_certify_config(args.cfg, args.overrides)
    model = build_smoothed_model(cfg, torch.device("cpu"))
    size = model.denoiser.sample_size()
    noisy = torch.rand(1, 3, *size)
    step = torch.full((1,), model.denoiser.timestep(cfg["smoothing"]["sigmas"][0]))
    counts = {}
    # torch's counter has no formula for the CPU flash-attention kernel: count attention
    # through the math backend, whose matmuls it does count
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            denoised = model.denoiser(noisy, step)
        counts["denoiser"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.classifier(denoised)
        counts["classifier"] = counter.get_total_flops()
    params = {name: sum(p.numel() for p in part.parameters())
              for name, part in (("denoiser", model.denoiser), ("classifier", model.classifier))}
    json.dump({"flops_per_sample": sum(counts.values()), "flops": counts, "parameters": params,
               "denoiser_input": list(size), "classifier_input": model.classifier.input_size},
              sys.stdout, indent=2)
    sys.stdout.write("\n")


def tb(args) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(f"{args.run_dir}/tb")
    events.Reload()
    last = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    json.dump(last, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("checkpoint")
    p.add_argument("--arch", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--override", action="append", default=[])
    p.set_defaults(func=checkpoint)
    p = sub.add_parser("vit")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--tiny", action="store_true")
    p.set_defaults(func=vit)
    p = sub.add_parser("flops")
    p.add_argument("--cfg", required=True)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=flops)
    p = sub.add_parser("tb")
    p.add_argument("run_dir")
    p.set_defaults(func=tb)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
