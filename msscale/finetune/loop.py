"""Diffusion calibration: the Accelerate training loop (DESIGN.md §1, issue 4).

One process per device, started by torchrun, `accelerate launch`, submitit
(msscale/finetune_job.py) or plainly as one process. The UNet trains; the timm classifier is
frozen in eval mode (gradients flow through it into the UNet, its weights never change).
Plain DDP without a DeepSpeed config, DeepSpeed ZeRO (stage 2 or 3) with one.

Run directory `<out>`:

    config.yaml                     the resolved config (written by the launcher)
    checkpoints/step-00000100/      Accelerate state + unet/ + unet_ema/ + trainer_state.json
    checkpoints/latest              the name of the newest complete checkpoint
    tb/                             TensorBoard events
    final/                          the EMA UNet + scheduler/: a certify config's denoiser.path

A checkpoint is written into a temporary directory by every process, renamed into place by
the main process, and only then named in `latest`, so `latest` always names a whole
checkpoint. Resume is on by default: step count, optimizer, LR schedule and EMA come back,
and the data stream is seeded from the step, so it moves forward instead of repeating.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from msscale.atomic import atomic_write_text
from msscale.errors import UserError
from msscale.finetune.schema import per_device_batch

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"  # the one name the loop and the launcher agree on (see latest_checkpoint)
FINAL = "final"
TB = "tb"
TRAINER_STATE = "trainer_state.json"
GRID_IMAGES = 8


# --------------------------------------------------------------------------------------
# Checkpoint names
# --------------------------------------------------------------------------------------


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
    """A short fingerprint of a model's parameters (sum and sum of squares, float64)."""
    total = squares = 0.0
    for param in model.parameters():
        values = param.detach().double()
        total += float(values.sum())
        squares += float((values**2).sum())
    return f"{total:.10e}/{squares:.10e}"


def seed_for(*numbers: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (seed, step, rank, ...)."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


# --------------------------------------------------------------------------------------
# Accelerate and DeepSpeed set-up
# --------------------------------------------------------------------------------------


def resolve_mixed_precision(value: str) -> str:
    """auto -> bf16 on CUDA, fp32 ("no") on CPU; bf16 without CUDA is refused."""
    cuda = torch.cuda.is_available()
    if value == "auto":
        return "bf16" if cuda else "no"
    if value == "bf16" and not cuda:
        raise UserError("train.mixed_precision=bf16 needs a CUDA device; use auto or no on CPUs")
    return value


def _fill(ds: dict, dotted: str, expected, yaml_key: str) -> None:
    """Set a DeepSpeed key that is absent or "auto"; refuse one that contradicts the YAML."""
    *parents, leaf = dotted.split(".")
    node = ds
    for part in parents:
        node = node.setdefault(part, {})
    value = node.get(leaf, "auto")
    if value == "auto":
        node[leaf] = expected
    elif value != expected:
        raise UserError(
            f"DeepSpeed config sets {dotted}={value!r} but the YAML asks for {expected!r} "
            f"({yaml_key}); set it to \"auto\" or remove it to follow the YAML"
        )


def resolve_deepspeed_config(
    path: str | os.PathLike,
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    max_grad_norm: float | None,
    mixed_precision: str,
) -> dict:
    """Load a DeepSpeed JSON and fill it from the YAML, which is the one source of truth.

    Batch sizes, accumulation, clipping and precision come from the YAML: "auto" or absent
    values are filled in; explicit values that differ are a UserError. The optimizer and LR
    schedule are built in msscale/train.py, so a JSON that defines its own is refused.
    Filling every value ourselves is also what makes Accelerate + DeepSpeed run on CPUs
    (its own "auto" filling sized the batch for one process there).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"deepspeed.config {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"deepspeed.config {path} is not valid JSON: {err}") from None
    if not isinstance(ds, dict) or not isinstance(ds.get("zero_optimization"), dict):
        raise UserError(f"deepspeed.config {path} has no zero_optimization section")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise UserError(
                f"deepspeed.config {path} defines an {section}; remove it: the optimizer and "
                f"LR schedule come from the YAML's train.* keys"
            )
    if ds.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise UserError(f"deepspeed.config {path} enables fp16; msscale trains in bf16 or fp32")
    stage = ds["zero_optimization"].get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"deepspeed.config {path}: zero_optimization.stage {stage!r} is not 0-3")
    _fill(ds, "train_micro_batch_size_per_gpu", micro_batch, "train.batch_size / processes")
    _fill(ds, "gradient_accumulation_steps", grad_accum, "train.grad_accum")
    _fill(ds, "train_batch_size", micro_batch * grad_accum * world_size, "train.batch_size")
    _fill(ds, "gradient_clipping", float(max_grad_norm or 0.0), "train.max_grad_norm")
    _fill(ds, "bf16.enabled", mixed_precision == "bf16", "train.mixed_precision")
    ds.setdefault("fp16", {})["enabled"] = False
    if stage == 3:
        # The final export and checkpoints gather the full weights.
        _fill(ds, "zero_optimization.stage3_gather_16bit_weights_on_model_save", True,
              "a whole model at export")
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                "stage3_param_persistence_threshold"):
        # Accelerate sizes these from model.config.hidden_size, which a UNet has not:
        # "auto" falls back to DeepSpeed's own defaults.
        if ds["zero_optimization"].get(key) == "auto":
            del ds["zero_optimization"][key]
    return ds


def _ensure_single_process_env() -> None:
    """DeepSpeed always runs torch.distributed; give a lone process a world of one."""
    if "LOCAL_RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])


def make_accelerator(cfg: dict):
    """An Accelerator for this process: DDP (NCCL on GPUs, gloo on CPUs) or DeepSpeed.

    On CPUs Accelerate needs `cpu=True` to start gloo DDP, but `cpu=True` drops the
    DeepSpeed plugin; for DeepSpeed on CPUs we keep cpu=False and name the gloo backend, so
    DeepSpeed's init_distributed runs over gloo and Accelerate counts every process.
    """
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration

    train = cfg["train"]
    cuda = torch.cuda.is_available()
    mixed_precision = resolve_mixed_precision(train["mixed_precision"])
    kwargs = dict(
        gradient_accumulation_steps=train["grad_accum"],
        mixed_precision=mixed_precision,
        project_config=ProjectConfiguration(project_dir=cfg["out"], logging_dir=str(
            Path(cfg["out"]) / TB), automatic_checkpoint_naming=False),
        # The loop steps the LR schedule itself, once per applied optimizer step.
        step_scheduler_with_optimizer=False,
    )
    if cfg["deepspeed"]["config"] is None:
        return Accelerator(cpu=not cuda, **kwargs)
    _ensure_single_process_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ds = resolve_deepspeed_config(
        cfg["deepspeed"]["config"],
        micro_batch=per_device_batch(cfg, world_size),
        grad_accum=train["grad_accum"],
        world_size=world_size,
        max_grad_norm=train["max_grad_norm"],
        mixed_precision=mixed_precision,
    )
    handlers = [] if cuda else [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds),
                       kwargs_handlers=handlers, **kwargs)


# --------------------------------------------------------------------------------------
# The calibration forward pass
# --------------------------------------------------------------------------------------


@dataclass
class Scales:
    """The cascade's scales as the loop uses them, on the training device."""

    sigmas: torch.Tensor  # [K]
    timesteps: torch.Tensor  # [K] long: t* of each sigma
    weights: torch.Tensor  # [K] sampling weights

    @classmethod
    def build(cls, cal: dict, alphas_cumprod: torch.Tensor, device) -> Scales:
        from msscale.smoothing.denoise import timestep_for_sigma

        sigmas = cal["sigmas"]
        weights = cal["sigma_weights"] or [1.0] * len(sigmas)
        return cls(
            torch.tensor(sigmas, device=device),
            torch.tensor([timestep_for_sigma(alphas_cumprod, s) for s in sigmas], device=device),
            torch.tensor(weights, dtype=torch.float32, device=device),
        )


def calibration_forward(
    unet, classifier, images, labels, *, scales: Scales, alphas_cumprod, prediction_type: str,
    draws: int, lambda_ac: float, lambda_dm: float, generator: torch.Generator,
    timestep_scale: float = 1.0,
):
    """One micro-batch of DESIGN.md §1's loss; returns (CalibrationLoss, scale index [B]).

    Each image draws a scale, then M noisy copies go through the one-shot denoiser
    (msscale/denoise.py's maths, with gradients) and the classifier. The diffusion
    regulariser's inputs, at uniform random timesteps, share the same UNet call, so every
    parameter is used exactly once per backward (what DDP expects).
    """
    from msscale.finetune.losses import calibration_loss, diffusion_loss, diffusion_target
    from msscale.smoothing.denoise import x0_from_model_output

    batch, device = images.shape[0], images.device
    scale = torch.multinomial(scales.weights, batch, replacement=True, generator=generator)
    # M draws per image, draw-major: row m*B + b is draw m of image b, so .view(M, B, ...).
    sigma = scales.sigmas[scale].repeat(draws).view(-1, 1, 1, 1)
    t_cal = scales.timesteps[scale].repeat(draws)
    clean = images.repeat(draws, 1, 1, 1)
    noisy = clean + sigma * torch.randn(clean.shape, generator=generator, device=device)
    abar_cal = alphas_cumprod[t_cal].view(-1, 1, 1, 1)
    x_cal = abar_cal.sqrt() * (2 * noisy - 1)

    x0 = 2 * images - 1
    noise = torch.randn(x0.shape, generator=generator, device=device)
    t_dm = torch.randint(0, len(alphas_cumprod), (batch,), generator=generator, device=device)
    abar_dm = alphas_cumprod[t_dm].view(-1, 1, 1, 1)
    x_dm = abar_dm.sqrt() * x0 + (1 - abar_dm).sqrt() * noise

    t_model = torch.cat([t_cal, t_dm])  # the UNet's timestep input (msscale/models/loading.py)
    if timestep_scale != 1.0:
        t_model = t_model.float() * timestep_scale
    output = unet(torch.cat([x_cal, x_dm]), t_model).sample
    out_cal, out_dm = output[: draws * batch], output[draws * batch:]
    x0_hat = x0_from_model_output(out_cal, x_cal, abar_cal.to(out_cal.dtype), prediction_type)
    denoised = (x0_hat.clamp(-1, 1) + 1) / 2
    logits = classifier(denoised).view(draws, batch, -1)
    dm = diffusion_loss(out_dm, diffusion_target(x0, noise, abar_dm, prediction_type))
    return calibration_loss(logits, labels, dm, lambda_ac=lambda_ac, lambda_dm=lambda_dm), scale


def null_loss(model) -> torch.Tensor:
    """A zero loss whose gradient is zero for every parameter and that contains no NaN.

    It replaces a non-finite loss, so every rank still runs one backward per micro-batch
    (DDP and DeepSpeed need that) while nothing is learned from the bad batch.
    """
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


class TrainStream:
    """Micro-batches from the resampled shard stream, re-seeded from the step at each pass.

    A resumed run therefore continues with a fresh, reproducible stream rather than
    replaying the batches it already trained on.
    """

    def __init__(self, cfg: dict, batch_size: int, rank: int, world_size: int):
        from msscale.data.dataset import open_dataset

        self.cfg, self.batch_size, self.rank, self.world_size = cfg, batch_size, rank, world_size
        self.urls = [str(p) for p in open_dataset(cfg["data"]["train_shards"]).shards]
        self.iterator = None

    def next(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(2):
            if self.iterator is None:
                self.iterator = iter(self._loader(step))
            try:
                return next(self.iterator)
            except StopIteration:
                self.iterator = None
        raise UserError(f"data.train_shards {self.cfg['data']['train_shards']} yields no batch "
                        f"of {self.batch_size} images")

    def _loader(self, step: int):
        from msscale.data.dataset import make_training_pipeline

        data = self.cfg["data"]
        pipeline = make_training_pipeline(
            self.urls, batch_size=self.batch_size, image_size=data["image_size"],
            seed=seed_for(self.cfg["seed"], step), world_rank=self.rank,
            world_size=self.world_size, epoch_length=data["epoch_length"],
            random_crop=data["random_crop"], flip=data["flip"],
            shuffle_buffer=data["shuffle_buffer"],
        )
        if data["num_workers"] == 0:
            return pipeline
        return torch.utils.data.DataLoader(pipeline, batch_size=None,
                                           num_workers=data["num_workers"])


# --------------------------------------------------------------------------------------
# Evaluation on the held-out shards
# --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(accelerator, denoiser, classifier, cfg: dict, scales: Scales, batch_size: int):
    """Per scale over the validation images (each read once, in order, split over ranks):
    denoise-and-classify accuracy of single draws, smoothed (majority of M draws) accuracy,
    and the fraction the cascade would defer (top class share of the M draws below p0).

    Returns ({tag: value}, {sigma: grid tensor}) on every rank; the grid is rank 0's.
    """
    from msscale.data.dataset import open_dataset

    cal, device = cfg["calibration"], accelerator.device
    dataset = open_dataset(cfg["data"]["val_shards"])
    count = min(dataset.count, cfg["data"]["val_images"])
    indices = range(accelerator.process_index, count, accelerator.num_processes)
    # Fixed noise, so evaluations at different steps compare like with like.
    generator = torch.Generator(device).manual_seed(
        seed_for(cfg["seed"], accelerator.process_index, 7))
    tally = torch.zeros(len(scales.sigmas), 4, device=device)  # base, smoothed, defer, images
    grids, batch, draws = {}, [], cal["draws"]

    def run(batch):
        images = torch.stack([image for _, image, _ in batch]).to(device)
        labels = torch.tensor([label for _, _, label in batch], device=device)
        size = cfg["data"]["image_size"]
        if images.shape[-1] != size:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                     antialias=True, align_corners=False)
        for k, sigma in enumerate(scales.sigmas.tolist()):
            clean = images.repeat(draws, 1, 1, 1)
            noisy = clean + sigma * torch.randn(clean.shape, generator=generator, device=device)
            timesteps = scales.timesteps[k].repeat(len(clean))
            denoised = denoiser(noisy, timesteps)
            preds = classifier(denoised).argmax(-1).view(draws, -1)
            votes = torch.nn.functional.one_hot(preds, cfg["classifier"]["num_classes"]).sum(0)
            top_count, top = votes.max(-1)  # ties: lowest class index
            tally[k, 0] += (preds == labels).float().mean(0).sum()
            tally[k, 1] += (top == labels).float().sum()
            tally[k, 2] += (top_count < cal["p0"] * draws).float().sum()
            tally[k, 3] += len(labels)
            if sigma not in grids and accelerator.is_main_process:
                n = min(GRID_IMAGES, len(labels))
                grids[sigma] = torch.cat([noisy[:n].clamp(0, 1), denoised[:n], images[:n]]).float()

    for item in dataset.iter_images(indices):
        batch.append(item)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    tally = accelerator.reduce(tally, reduction="sum")
    metrics = {}
    for k, sigma in enumerate(scales.sigmas.tolist()):
        n = max(float(tally[k, 3]), 1.0)
        metrics[f"eval/sigma_{sigma:g}/denoise_classify_acc"] = float(tally[k, 0]) / n
        metrics[f"eval/sigma_{sigma:g}/smoothed_acc"] = float(tally[k, 1]) / n
        metrics[f"eval/sigma_{sigma:g}/defer_fraction"] = float(tally[k, 2]) / n
    return metrics, grids


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def register_hooks(accelerator, ema, zero3: bool) -> None:
    """save_state writes unet/ and unet_ema/ with save_pretrained; load_state reads them.

    Every rank runs the hooks (save_state must be called on every rank: under DeepSpeed it
    is a collective); only the main process writes files. Under DeepSpeed the engine saves
    and loads its own weights and passes no models to the load hook.
    """
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
            if not zero3:  # ZeRO-3 weights are partitioned; its engine checkpoint holds them
                for model in models:
                    accelerator.unwrap_model(model).save_pretrained(
                        os.path.join(output_dir, "unet"))
        while weights:  # saved above: keep Accelerate from writing them a second time
            weights.pop()

    def load_hook(models, input_dir):
        loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), UNet2DModel)
        ema.load_state_dict(loaded.state_dict())
        ema.to(accelerator.device)
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


def _clean_partial(accelerator, out: Path) -> None:
    """Remove checkpoints a killed run left half-written."""
    if accelerator.is_main_process:
        for tmp in (out / CHECKPOINTS).glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()


def export_final(unet_config, ema, noise_scheduler, out: Path, meta: dict | None = None) -> Path:
    """The EMA UNet + scheduler/ under <out>/final (via a temporary directory and rename)."""
    from diffusers import UNet2DModel

    from msscale.models.loading import save_denoiser

    model = UNet2DModel.from_config(unet_config)
    ema.copy_to(model.parameters())
    final, tmp = out / FINAL, out / f".{FINAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_denoiser(model.float(), noise_scheduler, tmp, meta)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    log.info("exported the EMA UNet to %s", final)
    return final


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def train(cfg: dict) -> Path:
    """Fine-tune cfg's denoiser with the calibration loss; return the exported final/ dir.

    Call it in every process of the job (torchrun, accelerate launch, submitit tasks, or
    one plain process). A non-finite loss skips its optimizer step on every rank and is
    counted; more than train.max_nan_steps of them stop the run with a UserError, leaving
    the last good checkpoint as `latest`.
    """
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from msscale.data.dataset import open_dataset
    from msscale.models.loading import (
        alphas_cumprod_of,
        build_classifier,
        denoiser_meta,
        load_scheduler,
        load_unet,
    )
    from msscale.smoothing.denoise import OneShotDenoiser

    out, train_cfg, cal = Path(cfg["out"]), cfg["train"], cfg["calibration"]
    open_dataset(cfg["data"]["train_shards"])  # bad shard URLs fail before any set-up
    if cfg["data"]["val_shards"] is None:
        log.warning("data.val_shards is null: no evaluation figures")
    else:
        open_dataset(cfg["data"]["val_shards"])
    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    micro_batch = per_device_batch(cfg, world)
    main = accelerator.is_main_process
    if not main:
        logging.getLogger("msscale").setLevel(logging.WARNING)
    zero3 = (accelerator.state.deepspeed_plugin is not None
             and accelerator.state.deepspeed_plugin.zero_stage == 3)
    if zero3:
        # diffusers' EMAModel gathers ZeRO-3 parameters with a module-level `deepspeed` that
        # it imports only if ZeRO-3 was on when diffusers.training_utils was first imported
        # (before our Accelerator existed): give it the module.
        import deepspeed
        import diffusers.training_utils

        diffusers.training_utils.deepspeed = deepspeed

    unet = load_unet(cfg["denoiser"]["path"])
    noise_scheduler = load_scheduler(cfg["denoiser"]["path"])
    prediction_type = noise_scheduler.config.get("prediction_type", "epsilon")
    meta = denoiser_meta(cfg["denoiser"]["path"])  # timestep_scale; exported with final/
    classifier = build_classifier(cfg["classifier"]).requires_grad_(False).eval()
    if train_cfg["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
        if hasattr(classifier.model, "set_grad_checkpointing"):
            classifier.model.set_grad_checkpointing(True)
    unet.train()
    ema = EMAModel(unet.parameters(), decay=train_cfg["ema_decay"], model_cls=UNet2DModel,
                   model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=train_cfg["lr"],
                                  weight_decay=train_cfg["weight_decay"])
    lr_scheduler = get_scheduler(train_cfg["lr_schedule"], optimizer,
                                 num_warmup_steps=train_cfg["warmup_steps"],
                                 num_training_steps=train_cfg["max_steps"])
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    device = accelerator.device
    classifier.to(device)
    ema.to(device)
    alphas = alphas_cumprod_of(noise_scheduler).float().to(device)
    scales = Scales.build(cal, alphas.cpu(), device)
    register_hooks(accelerator, ema, zero3)

    state = TrainerState()
    _clean_partial(accelerator, out)
    latest = latest_checkpoint(out) if train_cfg["resume"] else None
    if latest is not None:
        accelerator.load_state(str(latest))
        state = TrainerState(**json.loads((latest / TRAINER_STATE).read_text()))
        log.info("resumed from %s at step %d (parameter digest %s)", latest, state.step,
                 param_digest(accelerator.unwrap_model(unet)))
    last_saved = latest

    stream = TrainStream(cfg, micro_batch, rank, world)
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after its last checkpoint.
        writer = SummaryWriter(str(out / TB), purge_step=state.step or None)
    bf16 = accelerator.mixed_precision == "bf16"
    denoiser = OneShotDenoiser(unet, alphas, prediction_type, meta["timestep_scale"])
    window = _Window(len(scales.sigmas), device)
    progress = tqdm(total=train_cfg["max_steps"], initial=state.step, disable=not main,
                    desc="finetune", dynamic_ncols=True)
    try:
        while state.step < train_cfg["max_steps"]:
            bad_window, grad_norm = False, None
            for micro in range(train_cfg["grad_accum"]):
                images, labels = stream.next(state.step)
                images, labels = images.to(device), labels.to(device)
                generator = torch.Generator(device).manual_seed(
                    seed_for(cfg["seed"], state.step, micro, rank, 1))
                with accelerator.accumulate(unet):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        parts, scale = calibration_forward(
                            unet, classifier, images, labels, scales=scales,
                            alphas_cumprod=alphas, prediction_type=prediction_type,
                            draws=cal["draws"], lambda_ac=cal["lambda_ac"],
                            lambda_dm=cal["lambda_dm"], generator=generator,
                            timestep_scale=meta["timestep_scale"])
                    finite = torch.isfinite(parts.total.detach()).float().view(1)
                    bad = bool(accelerator.reduce(1 - finite, reduction="sum") > 0)
                    bad_window |= bad
                    if accelerator.sync_gradients and bad_window:
                        _set_lr(optimizer, 0.0)  # the whole window is dropped: no update
                    accelerator.backward(null_loss(unet) if bad else parts.total)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(
                            unet.parameters(), train_cfg["max_grad_norm"] or math.inf)
                        if grad_norm is not None and not math.isfinite(float(grad_norm)):
                            bad_window = True
                            _set_lr(optimizer, 0.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if not bad:
                    window.add(parts, scale, len(labels))
            if bad_window:
                _set_lr(optimizer, lr_scheduler.get_last_lr()[0])
                state.nan_skipped += 1
                log.warning("non-finite loss at step %d: step skipped (%d so far, limit %d)",
                            state.step, state.nan_skipped, train_cfg["max_nan_steps"])
                if state.nan_skipped > train_cfg["max_nan_steps"]:
                    raise UserError(
                        f"stopped at step {state.step}: {state.nan_skipped} steps had a "
                        f"non-finite loss (train.max_nan_steps={train_cfg['max_nan_steps']}); "
                        f"the last good checkpoint is {last_saved or 'none (no checkpoint yet)'}"
                    )
                continue
            ema.step(unet.parameters())
            lr_scheduler.step()
            state.step += 1
            window.steps += 1
            progress.update(1)
            if state.step % train_cfg["log_every"] == 0 or state.step == train_cfg["max_steps"]:
                window.flush(accelerator, writer, state, lr_scheduler.get_last_lr()[0],
                             grad_norm, scales, micro_batch)
            paused = time.perf_counter()
            if cfg["data"]["val_shards"] and (state.step % train_cfg["eval_every"] == 0
                                              or state.step == train_cfg["max_steps"]):
                unet.eval()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    metrics, grids = evaluate(accelerator, denoiser, classifier, cfg, scales,
                                              micro_batch)
                unet.train()
                _log_eval(writer, metrics, grids, state.step)
            if state.step % train_cfg["checkpoint_every"] == 0 or \
                    state.step == train_cfg["max_steps"]:
                last_saved = save_checkpoint(accelerator, out, state,
                                             train_cfg["checkpoints_total_limit"])
            window.started += time.perf_counter() - paused  # throughput counts training only
    finally:
        progress.close()
        if writer is not None:
            writer.close()

    return finish(accelerator, unet, ema, noise_scheduler, out, meta)


def finish(accelerator, unet, ema, noise_scheduler, out: Path, meta: dict | None = None) -> Path:
    """Export the EMA UNet on the main process, wait for every rank, end the run."""
    if accelerator.is_main_process:
        export_final(accelerator.unwrap_model(unet).config, ema, noise_scheduler, out, meta)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / FINAL


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class _Window:
    """Loss terms, recoverable counts per scale and throughput since the last log line.

    Summed on the device and reduced over ranks only when logged, after which the time is
    taken: the steps/s and images/s figures are honest.
    """

    def __init__(self, num_scales: int, device):
        self.num_scales, self.device = num_scales, device
        self.reset()

    def reset(self):
        self.sums = torch.zeros(5, device=self.device)  # total, brier, ac, diffusion, batches
        self.rec = torch.zeros(2, self.num_scales, device=self.device)  # recoverable, images
        self.images, self.steps, self.started = 0, 0, time.perf_counter()

    def add(self, parts, scale, images: int) -> None:
        self.sums += torch.stack([parts.total.detach().float(), parts.brier.detach().float(),
                                  parts.anti_consistency.detach().float(),
                                  parts.diffusion.detach().float(),
                                  torch.ones((), device=self.device)])
        self.rec[0] += torch.bincount(scale, weights=parts.recoverable.float(),
                                      minlength=self.num_scales)
        self.rec[1] += torch.bincount(scale, minlength=self.num_scales).float()
        self.images += images

    def flush(self, accelerator, writer, state, lr, grad_norm, scales, micro_batch) -> None:
        sums = accelerator.reduce(self.sums, reduction="sum")
        rec = accelerator.reduce(self.rec, reduction="sum")
        seconds = time.perf_counter() - self.started  # after the reduce: work is done
        steps = max(self.steps, 1)
        if writer is not None:
            n = max(float(sums[4]), 1.0)
            step = state.step
            for i, name in enumerate(("total", "brier", "anti_consistency", "diffusion")):
                writer.add_scalar(f"loss/{name}", float(sums[i]) / n, step)
            for k, sigma in enumerate(scales.sigmas.tolist()):
                if rec[1, k] > 0:
                    writer.add_scalar(f"recoverable/sigma_{sigma:g}",
                                      float(rec[0, k] / rec[1, k]), step)
            writer.add_scalar("train/lr", lr, step)
            if grad_norm is not None:
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
            writer.add_scalar("train/nan_skipped", state.nan_skipped, step)
            writer.add_scalar("perf/images_per_s_per_device", self.images / seconds, step)
            writer.add_scalar("perf/steps_per_s", steps / seconds, step)
            writer.flush()
            log.info("step %d loss %.4f recoverable %s lr %.3g %.2f steps/s %.1f img/s/device",
                     step, float(sums[0]) / n,
                     [round(float(rec[0, k] / max(rec[1, k], 1)), 3) for k in range(len(rec[0]))],
                     lr, steps / seconds, self.images / seconds)
        self.reset()


def _log_eval(writer, metrics: dict, grids: dict, step: int) -> None:
    if writer is None:
        return
    from torchvision.utils import make_grid

    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)
    for sigma, images in grids.items():
        rows = len(images) // 3
        writer.add_image(f"eval/sigma_{sigma:g}/noisy_denoised_clean",
                         make_grid(images.cpu(), nrow=rows, padding=1), step)
    writer.flush()
    log.info("eval at step %d: %s", step, {k: round(v, 3) for k, v in metrics.items()})
