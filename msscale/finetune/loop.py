"""Diffusion calibration: the training loop (docs/design.md §1.4, §3.6).

One process per device, started by torchrun, `accelerate launch`, submitit
(msscale/finetune/job.py) or plainly as one process. The UNet trains; the classifier is
frozen in eval mode (gradients flow through it into the UNet, its weights never change).
Plain DDP without a DeepSpeed config, DeepSpeed ZeRO (stage 2 or 3) with one; under ZeRO-3
the EMA lives on the partitions (msscale/finetune/ema.py, docs/design.md §3.7).

Resume is on by default: step count, optimizer, LR schedule and EMA come back from
`<out>/checkpoints/latest`, and the data stream is seeded from the step, so it moves forward
instead of repeating. A ZeRO checkpoint written by another number of processes is converted
to DeepSpeed's universal checkpoint first.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from msscale.data.stream import TrainStream, seed_for
from msscale.errors import UserError
from msscale.finetune.accelerator import TB, make_accelerator
from msscale.finetune.checkpoints import (
    FINAL,
    TRAINER_STATE,
    TrainerState,
    clean_partial,
    export_final,
    latest_checkpoint,
    param_digest,
    register_hooks,
    save_checkpoint,
    saved_world_size,
    universal_checkpoint,
)
from msscale.finetune.ema import PartitionedEMA, ReplicatedEMA
from msscale.finetune.evaluate import TrainingWindow, evaluate, log_eval
from msscale.finetune.objective import Scales, calibration_forward, null_loss
from msscale.finetune.schema import per_device_batch
from msscale.finetune.zero3 import partition_summary

log = logging.getLogger(__name__)


def train(cfg: dict) -> Path:
    """Fine-tune cfg's denoiser with the calibration loss; return the exported final/ dir.

    Call it in every process of the job (torchrun, accelerate launch, submitit tasks, or
    one plain process). A non-finite loss skips its optimizer step on every rank and is
    counted; more than train.max_nan_steps of them stop the run with a UserError, leaving
    the last good checkpoint as `latest`.
    """
    from tqdm.auto import tqdm

    out, train_cfg = Path(cfg["out"]), cfg["train"]
    check_data(cfg)
    latest = latest_checkpoint(out) if train_cfg["resume"] else None
    accelerator = make_accelerator(cfg, load_universal=other_world_size(cfg, latest))
    rank, world = accelerator.process_index, accelerator.num_processes
    micro_batch = per_device_batch(cfg, world)
    if not accelerator.is_main_process:
        logging.getLogger("msscale").setLevel(logging.WARNING)
    log_run_shape(cfg, accelerator, micro_batch)
    run = build_trainee(cfg, accelerator)
    state, last_saved = resume(accelerator, run, out, latest)
    stream = TrainStream(cfg, micro_batch, rank, world)
    writer = open_writer(accelerator, out, state.step)
    window = TrainingWindow(len(run.scales.sigmas), accelerator.device)
    progress = tqdm(total=train_cfg["max_steps"], initial=state.step,
                    disable=not accelerator.is_main_process, desc="finetune", dynamic_ncols=True)
    try:
        while state.step < train_cfg["max_steps"]:
            applied, grad_norm = training_step(accelerator, run, stream, window, state, cfg)
            if not applied:
                count_skipped_step(state, train_cfg["max_nan_steps"], last_saved)
                continue
            progress.update(1)
            if due(state.step, train_cfg["log_every"], train_cfg["max_steps"]):
                window.flush(accelerator, writer, state, run.lr_scheduler.get_last_lr()[0],
                             grad_norm, run.scales, micro_batch)
            paused = time.perf_counter()
            if cfg["data"]["val_shards"] and due(state.step, train_cfg["eval_every"],
                                                 train_cfg["max_steps"]):
                evaluate_now(accelerator, run, cfg, writer, state.step, micro_batch)
            if due(state.step, train_cfg["checkpoint_every"], train_cfg["max_steps"]):
                last_saved = save_checkpoint(accelerator, out, state,
                                             train_cfg["checkpoints_total_limit"])
            window.started += time.perf_counter() - paused  # throughput counts training only
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    return finish(accelerator, run, out)


@dataclass
class Trainee:
    """What the loop trains and with what: the prepared UNet and its companions."""

    unet: torch.nn.Module
    classifier: torch.nn.Module
    denoiser: torch.nn.Module  # the one-shot denoiser around `unet`, for evaluation
    ema: object  # msscale/finetune/ema.py: ReplicatedEMA, or PartitionedEMA under ZeRO-3
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    noise_scheduler: object
    alphas: torch.Tensor  # alphas_cumprod on the device
    scales: Scales
    prediction_type: str
    meta: dict  # the denoiser directory's msscale_denoiser.json (timestep_scale), for final/
    bf16: bool


def check_data(cfg: dict) -> None:
    """Bad shard URLs fail before any set-up."""
    from msscale.data.dataset import open_dataset

    open_dataset(cfg["data"]["train_shards"])
    if cfg["data"]["val_shards"] is None:
        log.warning("data.val_shards is null: no evaluation figures")
    else:
        open_dataset(cfg["data"]["val_shards"])


def build_trainee(cfg: dict, accelerator) -> Trainee:
    """Load the models, build EMA, optimizer and LR schedule, and hand them to Accelerate."""
    from diffusers.optimization import get_scheduler

    from msscale.models.loading import (
        alphas_cumprod_of,
        build_classifier,
        denoiser_meta,
        load_scheduler,
        load_unet,
    )
    from msscale.smoothing.denoise import OneShotDenoiser

    train_cfg, zero3 = cfg["train"], is_zero3(accelerator)
    unet = load_unet(cfg["denoiser"]["path"])
    noise_scheduler = load_scheduler(cfg["denoiser"]["path"])
    prediction_type = noise_scheduler.config.get("prediction_type", "epsilon")
    meta = denoiser_meta(cfg["denoiser"]["path"])
    classifier = build_classifier(cfg["classifier"]).requires_grad_(False).eval()
    if train_cfg["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
        if hasattr(classifier.model, "set_grad_checkpointing"):
            classifier.model.set_grad_checkpointing(True)
    unet.train()
    if not zero3:  # from the fp32 weights, before DeepSpeed may cast the module to bf16
        ema = ReplicatedEMA(unet, unet.config, train_cfg["ema_decay"], accelerator.device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=train_cfg["lr"],
                                  weight_decay=train_cfg["weight_decay"])
    lr_scheduler = get_scheduler(train_cfg["lr_schedule"], optimizer,
                                 num_warmup_steps=train_cfg["warmup_steps"],
                                 num_training_steps=train_cfg["max_steps"])
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    device = accelerator.device
    if zero3:  # after prepare: it lives on this rank's slices of the fp32 master weights
        module = accelerator.unwrap_model(unet)
        log.info("ZeRO-3 partitions on this rank: %s", partition_summary(module))
        ema = PartitionedEMA(module, module.config, train_cfg["ema_decay"],
                             offload=offloads_optimizer(accelerator))
    classifier.to(device)
    alphas = alphas_cumprod_of(noise_scheduler).float().to(device)
    register_hooks(accelerator, ema, zero3)
    return Trainee(
        unet=unet, classifier=classifier,
        denoiser=OneShotDenoiser(unet, alphas, prediction_type, meta["timestep_scale"]),
        ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler, noise_scheduler=noise_scheduler,
        alphas=alphas, scales=Scales.build(cfg["calibration"], alphas.cpu(), device),
        prediction_type=prediction_type, meta=meta, bf16=accelerator.mixed_precision == "bf16",
    )


def is_zero3(accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


def offloads_optimizer(accelerator) -> bool:
    """True when the DeepSpeed config keeps the optimizer state in host memory."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return False
    offload = plugin.deepspeed_config["zero_optimization"].get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def other_world_size(cfg: dict, latest: Path | None) -> bool:
    """Whether `latest` is a ZeRO checkpoint written by another number of processes than this
    run has: then it is loaded as DeepSpeed's universal checkpoint (see resume)."""
    if latest is None or cfg["deepspeed"]["config"] is None:
        return False
    saved = saved_world_size(latest)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if saved is not None and saved != world:
        log.info("%s was written by %d processes, this run has %d: loading it as a universal "
                 "checkpoint", latest, saved, world)
        return True
    return False


def resume(accelerator, run: Trainee, out: Path, latest: Path | None):
    """(TrainerState, last checkpoint or None): from `latest` when there is one, else fresh."""
    clean_partial(accelerator, out)
    if latest is None:
        return TrainerState(), None
    source = latest
    if accelerator.state.deepspeed_plugin is not None and (
            accelerator.state.deepspeed_plugin.deepspeed_config.get("checkpoint", {})
            .get("load_universal")):
        source = universal_checkpoint(accelerator, latest)
    accelerator.load_state(str(source))
    state = TrainerState(**json.loads((latest / TRAINER_STATE).read_text()))
    digest = param_digest(accelerator.unwrap_model(run.unet))  # a collective under ZeRO-3
    log.info("resumed from %s at step %d (parameter digest %s)", latest, state.step, digest)
    return state, latest


def log_run_shape(cfg: dict, accelerator, micro_batch: int) -> None:
    """The batch arithmetic and the schedule's unit, once at start (docs/design.md §3.7)."""
    train_cfg, world = cfg["train"], accelerator.num_processes
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = max(world // max(per_node, 1), 1)
    draws = cfg["calibration"]["draws"]
    log.info("global batch %d = %d node(s) x %d process(es) per node x %d image(s) per device x "
             "%d accumulation step(s); each image makes %d UNet samples (M=%d draws + 1 for the "
             "diffusion loss), %d per device per micro-batch", train_cfg["batch_size"], nodes,
             per_node, micro_batch, train_cfg["grad_accum"], draws + 1, draws,
             micro_batch * (draws + 1))
    log.info("LR schedule %s in optimizer steps: %d warm-up of %d; one optimizer step = %d "
             "images", train_cfg["lr_schedule"], train_cfg["warmup_steps"],
             train_cfg["max_steps"], train_cfg["batch_size"])


def open_writer(accelerator, out: Path, step: int):
    """TensorBoard on the main process (None elsewhere)."""
    if not accelerator.is_main_process:
        return None
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events a killed run logged after its last checkpoint.
    return SummaryWriter(str(out / TB), purge_step=step or None)


def training_step(accelerator, run: Trainee, stream, window, state, cfg: dict):
    """One optimizer step and what follows an applied one: EMA, LR schedule, step count.

    Returns (applied, grad norm), as optimizer_step.
    """
    applied, grad_norm = optimizer_step(accelerator, run, stream, window, state, cfg)
    if applied:
        run.ema.step(run.unet.parameters())
        run.lr_scheduler.step()
        state.step += 1
        window.steps += 1
    return applied, grad_norm


def optimizer_step(accelerator, run: Trainee, stream, window, state, cfg: dict):
    """grad_accum micro-batches and one optimizer step; (applied, grad norm).

    A non-finite loss on any rank drops the whole accumulation window on every rank: each
    rank still runs one backward per micro-batch (DDP and DeepSpeed need that), with the
    learning rate at zero, so nothing is learned from the bad batch.
    """
    train_cfg, cal, device = cfg["train"], cfg["calibration"], accelerator.device
    bad_window, grad_norm = False, None
    for micro in range(train_cfg["grad_accum"]):
        images, labels = stream.next(state.step)
        images, labels = images.to(device), labels.to(device)
        generator = torch.Generator(device).manual_seed(
            seed_for(cfg["seed"], state.step, micro, accelerator.process_index, 1))
        with accelerator.accumulate(run.unet):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.bf16):
                parts, scale = calibration_forward(
                    run.unet, run.classifier, images, labels, scales=run.scales,
                    alphas_cumprod=run.alphas, prediction_type=run.prediction_type,
                    draws=cal["draws"], lambda_ac=cal["lambda_ac"], lambda_dm=cal["lambda_dm"],
                    generator=generator, timestep_scale=run.meta["timestep_scale"],
                    rule=cal["recoverable"], p0=cal["p0"])
            finite = torch.isfinite(parts.total.detach()).float().view(1)
            bad = bool(accelerator.reduce(1 - finite, reduction="sum") > 0)
            bad_window |= bad
            if accelerator.sync_gradients and bad_window:
                _set_lr(run.optimizer, 0.0)
            loss = parts.total
            if bad:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.bf16):
                    loss = null_loss(run.unet, images)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(
                    run.unet.parameters(), train_cfg["max_grad_norm"] or math.inf)
                if grad_norm is not None and not math.isfinite(float(grad_norm)):
                    bad_window = True
                    _set_lr(run.optimizer, 0.0)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        if not bad:
            window.add(parts, scale, len(labels))
    if bad_window:
        _set_lr(run.optimizer, run.lr_scheduler.get_last_lr()[0])
    return not bad_window, grad_norm


def count_skipped_step(state: TrainerState, limit: int, last_saved: Path | None) -> None:
    """Count a step dropped for a non-finite loss; past `limit` of them, stop the run."""
    state.nan_skipped += 1
    log.warning("non-finite loss at step %d: step skipped (%d so far, limit %d)",
                state.step, state.nan_skipped, limit)
    if state.nan_skipped > limit:
        raise UserError(
            f"stopped at step {state.step}: {state.nan_skipped} steps had a non-finite loss "
            f"(train.max_nan_steps={limit}); the last good checkpoint is "
            f"{last_saved or 'none (no checkpoint yet)'}"
        )


def due(step: int, every: int, last: int) -> bool:
    """Whether periodic work (logging, evaluation, a checkpoint) falls on this step."""
    return step % every == 0 or step == last


def evaluate_now(accelerator, run: Trainee, cfg: dict, writer, step: int, batch: int) -> None:
    run.unet.eval()
    with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=run.bf16):
        metrics, grids, shares = evaluate(accelerator, run.denoiser, run.classifier, cfg,
                                          run.scales, batch)
    run.unet.train()
    log_eval(writer, metrics, grids, shares, step)


def finish(accelerator, run: Trainee, out: Path) -> Path:
    """Export the EMA UNet (gathered under ZeRO-3) from the main process, end the run."""
    unet = run.ema.unet(accelerator.is_main_process)  # a collective under ZeRO-3
    if accelerator.is_main_process:
        export_final(unet, run.noise_scheduler, out, run.meta)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / FINAL


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
