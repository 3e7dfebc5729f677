"""Checkpoints of the fine-tuning run (docs/design.md §3.6): save, rotate, resume, export.

A checkpoint is written into a temporary directory by every process, renamed into place by
the main process, and only then named in `checkpoints/latest`, so `latest` always names a
whole checkpoint. `final/` (the EMA UNet + scheduler/) is a certify config's denoiser.path.
A ZeRO checkpoint resumed by another number of processes goes through DeepSpeed's universal
checkpoint conversion (`universal_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from msscale.atomic import atomic_write_text
from msscale.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"  # the one name the loop and the launcher agree on (see latest_checkpoint)
FINAL = "final"
TRAINER_STATE = "trainer_state.json"
UNET_EMA = "unet_ema"
DEEPSPEED_STATE = "pytorch_model"  # Accelerate's folder for the DeepSpeed engine's checkpoint
UNIVERSAL = "universal"



def step_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The checkpoint `<out>/checkpoints/latest` names, or None before the first one."""
    pointer = Path(out) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise UserError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


@dataclass
class TrainerState:
    """What the loop itself needs back on resume (Accelerate restores the rest)."""

    step: int = 0  # optimizer steps taken
    nan_skipped: int = 0  # steps skipped for a non-finite loss


def param_digest(model) -> str:
    """A short fingerprint of a model's parameters (sum and sum of squares, float64).

    Under ZeRO-3 it is taken over the gathered fp32 master weights: a collective.
    """
    from msscale.finetune.zero3 import full_fp32_weights, partitioned_parameters

    if partitioned_parameters(model):
        params = full_fp32_weights(model).values()
    else:
        params = model.parameters()
    total = squares = 0.0
    for param in params:
        values = param.detach().double()
        total += float(values.sum())
        squares += float((values**2).sum())
    return f"{total:.10e}/{squares:.10e}"


def register_hooks(accelerator, ema, zero3: bool) -> None:
    """save_state writes unet/ and unet_ema/ with save_pretrained; load_state reads them.

    Every rank runs the hooks (save_state must be called on every rank: under DeepSpeed it
    is a collective, and under ZeRO-3 so is gathering the EMA); only the main process writes
    files. Under DeepSpeed the engine saves and loads its own weights and passes no models
    to the load hook.
    """
    from diffusers import UNet2DModel

    def save_hook(models, weights, output_dir):
        ema.save_pretrained(os.path.join(output_dir, UNET_EMA), accelerator.is_main_process)
        if accelerator.is_main_process and not zero3:
            # ZeRO-3 weights are partitioned; its engine checkpoint holds them.
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, "unet"))
        while weights:  # saved above: keep Accelerate from writing them a second time
            weights.pop()

    def load_hook(models, input_dir):
        ema.load_pretrained(os.path.join(input_dir, UNET_EMA))
        while models:  # DDP / one process: the weights come from unet/
            model = models.pop()
            weights = UNet2DModel.from_pretrained(os.path.join(input_dir, "unet"))
            accelerator.unwrap_model(model).load_state_dict(weights.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, out: Path, state: TrainerState, total_limit: int) -> Path:
    """Save into a temporary directory on every rank, then rename, point latest, rotate."""
    root = out / CHECKPOINTS
    final = root / step_name(state.step)
    tmp = root / f".tmp-{step_name(state.step)}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank has written its part
    if accelerator.is_main_process:
        atomic_write_text(tmp / TRAINER_STATE, json.dumps(asdict(state)) + "\n")
        if final.exists():  # left by a run that died before updating latest
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        _rotate(root, keep=total_limit, current=final.name)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _rotate(root: Path, keep: int, current: str) -> None:
    """Delete the oldest step-* checkpoints beyond `keep` (never the current one)."""
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != current)
    for old in done[: max(len(done) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def clean_partial(accelerator, out: Path) -> None:
    """Remove checkpoints a killed run left half-written."""
    if accelerator.is_main_process:
        for tmp in (out / CHECKPOINTS).glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()


def check_finite(unet, noise_scheduler, final: Path) -> None:
    """UserError unless every weight of `unet` is finite and so is its output on a fixed input.

    A UNet with a NaN weight, or one whose output overflows, would make every certification
    draw non-finite; it is refused here rather than exported as `final/`.
    """
    import torch

    for name, tensor in [*unet.named_parameters(), *unet.named_buffers()]:
        if not torch.isfinite(tensor).all():
            raise UserError(f"refusing to export {final}: the EMA UNet's {name} holds "
                            "non-finite values (the training diverged)")
    size = unet.config.sample_size or 32
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((1, unet.config.in_channels, height, width), generator=generator)
    timestep = torch.tensor([noise_scheduler.config.num_train_timesteps // 2])
    with torch.no_grad():
        output = unet.eval()(sample, timestep).sample
    if not torch.isfinite(output).all():
        raise UserError(f"refusing to export {final}: the EMA UNet's output on a test input "
                        "is not finite (the training diverged)")


def export_final(model, noise_scheduler, out: Path, meta: dict | None = None) -> Path:
    """The EMA UNet `model` + scheduler/ under <out>/final (via a temporary directory), after
    check_finite."""
    from msscale.models.loading import save_denoiser

    model = model.float()
    check_finite(model, noise_scheduler, out / FINAL)
    final, tmp = out / FINAL, out / f".{FINAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_denoiser(model, noise_scheduler, tmp, meta)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    log.info("exported the EMA UNet to %s", final)
    return final


def saved_world_size(checkpoint: Path) -> int | None:
    """How many processes wrote a checkpoint's DeepSpeed ZeRO state (one optimizer file each,
    as DeepSpeed's zero_to_fp32 counts them); None for a checkpoint without one (DDP)."""
    files = list((checkpoint / DEEPSPEED_STATE).glob("*optim_states.pt"))
    return len(files) or None


def universal_checkpoint(accelerator, checkpoint: Path) -> Path:
    """`checkpoint` with its ZeRO state as a DeepSpeed universal checkpoint, which any number of
    processes can load (with "checkpoint": {"load_universal": true} in the DeepSpeed config).

    The main process runs DeepSpeed's own converter (deepspeed.checkpoint.ds_to_universal)
    into `<checkpoint>/universal/pytorch_model`, beside links to the checkpoint's other files
    (unet_ema/, the LR schedule, trainer_state.json), once; every rank waits for it.
    """
    from accelerate.utils import broadcast_object_list

    target = checkpoint / UNIVERSAL
    error = None
    if accelerator.is_main_process and not (target / DEEPSPEED_STATE).is_dir():
        error = _convert_to_universal(checkpoint, target, accelerator.num_processes)
    error = broadcast_object_list([error])[0]  # every rank stops, not only the main one
    if error is not None:
        raise UserError(error)
    return target


def _convert_to_universal(checkpoint: Path, target: Path, processes: int) -> str | None:
    """Run ds_to_universal into a temporary folder, link the other files, rename; or an error."""
    tmp = checkpoint / f".tmp-{UNIVERSAL}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", str(checkpoint / DEEPSPEED_STATE),
               "--output_folder", str(tmp / DEEPSPEED_STATE),
               "--num_extract_workers", "1", "--num_merge_workers", "1"]
    log.info("converting %s to a universal checkpoint: %s", checkpoint, " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return (f"cannot load {checkpoint} (written by {saved_world_size(checkpoint)} processes) "
                f"with {processes}: DeepSpeed's ds_to_universal failed ({last}); resume with "
                f"{saved_world_size(checkpoint)} processes, or see docs/design.md §3.7 for "
                f"the conversion by hand")
    for entry in checkpoint.iterdir():
        if entry.name not in (DEEPSPEED_STATE, UNIVERSAL, tmp.name):
            (tmp / entry.name).symlink_to(Path("..") / entry.name)
    os.replace(tmp, target)
    log.info("universal checkpoint in %s", target)
    return None
