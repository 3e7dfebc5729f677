"""The Accelerate / DeepSpeed set-up of the fine-tuning run: one Accelerator per process.

DDP (NCCL on GPUs, gloo on CPUs) without a DeepSpeed config; DeepSpeed ZeRO with one, its
JSON filled from the YAML, which is the one source of truth for batch sizes and precision.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from msscale.errors import UserError
from msscale.finetune.schema import per_device_batch

TB = "tb"



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
    schedule are built in msscale/finetune/loop.py, so a JSON that defines its own is refused.
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
        # msscale's own export gathers the EMA (finetune/ema.py); this keeps Accelerate's
        # get_state_dict and save_model whole for users of the engine.
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


def make_accelerator(cfg: dict, load_universal: bool = False):
    """An Accelerator for this process: DDP (NCCL on GPUs, gloo on CPUs) or DeepSpeed.

    `load_universal`: the DeepSpeed engine loads universal checkpoints (a ZeRO checkpoint
    written by another number of processes, converted; msscale/finetune/checkpoints.py).
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
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    handlers = [] if cuda else [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds),
                       kwargs_handlers=handlers, **kwargs)
