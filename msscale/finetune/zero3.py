"""ZeRO-3's partitions as the loop sees them (docs/design.md §3.7): a rank's share, whole
tensors gathered from slices and slices cut from whole tensors, and resuming a checkpoint on
another number of processes.

Under ZeRO-3 every parameter above `stage3_param_persistence_threshold` elements is cut into
one slice per rank (`param.ds_tensor`; `param.data` is empty between uses), and each rank
keeps only its slice of the fp32 master weights and of Adam's state. DeepSpeed's layout: the
flattened parameter, padded to `world * partition_numel()`, rank r holding elements
`[r * partition_numel(), (r + 1) * partition_numel())`; parameters under the threshold are
also kept whole on every rank (`ds_persist`), and still partitioned in the optimizer.
msscale/finetune/ema.py keeps its EMA in this layout.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def partitioned_parameters(module) -> bool:
    """True when `module`'s parameters are ZeRO-3 parameters (they carry DeepSpeed's ds_id)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def partition_summary(module) -> dict:
    """How much of `module` this rank holds: whole sizes (ds_numel) against local slices."""
    total = local = partitioned = persistent = 0
    for param in module.parameters():
        total += param.ds_numel
        local += param.ds_tensor.numel()
        if param.ds_persist:
            persistent += 1
        else:
            partitioned += 1
    return {"parameters": total, "local_elements": local, "partitioned_tensors": partitioned,
            "persistent_tensors": persistent}


def gather_partitions(param, local: torch.Tensor) -> torch.Tensor:
    """The whole tensor of `param`'s shape from every rank's slice `local` (a collective).

    `local` is laid out as `param.ds_tensor` (partition_numel() elements); the result is on
    `local`'s device on every rank.
    """
    from deepspeed import comm

    world = param.ds_zero_partition_world_size
    whole = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    comm.all_gather_into_tensor(whole, local.contiguous(), group=param.ds_process_group)
    return whole.narrow(0, 0, param.ds_numel).view(param.ds_shape)


def local_slice(param, whole: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a whole tensor of `param`'s shape, zero-padded like ds_tensor."""
    size = param.partition_numel()
    start = param.ds_zero_partition_rank * size
    flat = whole.reshape(-1)
    piece = torch.zeros(size, dtype=whole.dtype)
    if start < flat.numel():
        values = flat[start:start + size]
        piece[: values.numel()] = values
    return piece


def full_fp32_weights(module) -> dict[str, torch.Tensor]:
    """The whole fp32 master weights by name, on every rank (a collective; for digests)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().cpu()
            for name, p in module.named_parameters()}


def unet_from_state_dict(unet_config, state: dict):
    """A UNet2DModel of `unet_config` holding `state` (built on the meta device: no copy)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DModel

    with init_empty_weights():
        unet = UNet2DModel.from_config(unet_config)
    unet.load_state_dict(state, strict=True, assign=True)
    return unet
