"""The EMA of the UNet that final/ exports (docs/design.md §1.4, §3.7).

Two kinds behind one interface (step, save_pretrained, load_pretrained, unet), so the loop's
checkpoints and its export do not ask which engine runs:

- ReplicatedEMA (DDP, ZeRO-1/2: every rank holds whole weights): diffusers' EMAModel, a whole
  copy per rank, saved by the main process.
- PartitionedEMA (ZeRO-3): the EMA lives on the partitions. Each rank averages its own slice
  of the fp32 master weights (DeepSpeed's `safe_get_local_fp32_param`), so the EMA costs 4/N
  bytes per parameter and no communication per step, where a gathered copy costs 4 bytes
  per parameter on every rank plus an all-gather of every weight per step (what EMAModel
  does under ZeRO-3). It is gathered only when a checkpoint is written or the run ends.

Both write the same `unet_ema/` directory (EMAModel.save_pretrained's format: whole weights,
the decay counters in config.json), so a checkpoint's EMA does not depend on the number of
processes that wrote it, and either kind reads what the other wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from msscale.finetune.zero3 import gather_partitions, local_slice, unet_from_state_dict

EMA_WEIGHTS = "diffusion_pytorch_model.safetensors"


class ReplicatedEMA:
    """diffusers' EMAModel over whole weights, on `device`; the main process writes it.

    Build it from the fp32 UNet before accelerator.prepare (DeepSpeed with bf16 casts the
    module it wraps to bf16).
    """

    def __init__(self, module, unet_config, decay: float, device):
        from diffusers import UNet2DModel
        from diffusers.training_utils import EMAModel

        self.ema = EMAModel(module.parameters(), decay=decay, model_cls=UNet2DModel,
                            model_config=unet_config)
        self.ema.to(device)
        self.unet_config = unet_config

    @property
    def optimization_step(self) -> int:
        return self.ema.optimization_step

    def step(self, parameters) -> None:
        self.ema.step(parameters)

    def save_pretrained(self, path, main: bool) -> None:
        if main:
            self.ema.save_pretrained(path)

    def load_pretrained(self, path) -> None:
        from diffusers import UNet2DModel
        from diffusers.training_utils import EMAModel

        device = self.ema.shadow_params[0].device
        self.ema.load_state_dict(EMAModel.from_pretrained(path, UNet2DModel).state_dict())
        self.ema.to(device)

    def unet(self, main: bool):
        """The EMA weights as a UNet2DModel on the main process (None elsewhere)."""
        from diffusers import UNet2DModel

        if not main:
            return None
        unet = UNet2DModel.from_config(self.unet_config)
        self.ema.copy_to(unet.parameters())
        return unet


class PartitionedEMA:
    """An EMA of a ZeRO-3 model on each rank's slice of the fp32 master weights.

    The decay rule and counters are diffusers' EMAModel's (an EMAModel without weights holds
    them) and the update is its arithmetic, `ema -= (1 - decay) * (ema - weight)`, applied
    slice by slice: a gathered PartitionedEMA equals an EMAModel fed the same weights.
    Every rank calls every method; save_pretrained and unet are collectives.
    """

    def __init__(self, module, unet_config, decay: float, *, offload: bool):
        from deepspeed.utils import safe_get_local_fp32_param
        from diffusers.training_utils import EMAModel

        named = list(module.named_parameters())
        frozen = [name for name, p in named if not p.requires_grad]
        if frozen:
            raise ValueError(f"PartitionedEMA tracks trainable parameters only; frozen: {frozen}")
        self.rule = EMAModel([], decay=decay)
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.unet_config = unet_config
        # With the optimizer state offloaded, the EMA's slices stay in host memory beside it.
        self.shadow = [
            safe_get_local_fp32_param(p).detach().clone().to("cpu" if offload else p.device)
            for p in self.params
        ]

    @property
    def optimization_step(self) -> int:
        return self.rule.optimization_step

    @torch.no_grad()
    def step(self, parameters) -> None:
        from deepspeed.utils import safe_get_local_fp32_param

        self.rule.optimization_step += 1
        decay = self.rule.get_decay(self.rule.optimization_step)
        self.rule.cur_decay_value = decay
        one_minus_decay = 1 - decay
        for shadow, param in zip(self.shadow, parameters, strict=True):
            weight = safe_get_local_fp32_param(param).to(shadow.device)
            shadow.sub_(one_minus_decay * (shadow - weight))

    def state_dict(self, main: bool) -> dict[str, torch.Tensor] | None:
        """The whole EMA weights by name on the main process (None elsewhere); a collective."""
        state = {}
        for name, param, shadow in zip(self.names, self.params, self.shadow, strict=True):
            whole = gather_partitions(param, shadow.to(param.ds_tensor.device))
            if main:
                state[name] = whole.cpu()
        return state if main else None

    def counters(self) -> dict:
        """EMAModel's counters, as its save_pretrained writes them into config.json."""
        return {k: v for k, v in self.rule.state_dict().items() if k != "shadow_params"}

    def unet(self, main: bool):
        """The gathered EMA as a UNet2DModel on the main process (None elsewhere)."""
        state = self.state_dict(main)
        return unet_from_state_dict(self.unet_config, state) if main else None

    def save_pretrained(self, path, main: bool) -> None:
        unet = self.unet(main)
        if main:
            unet.register_to_config(**self.counters())
            unet.save_pretrained(path)

    def load_pretrained(self, path) -> None:
        """Take this rank's slices from a unet_ema/ directory written with any world size."""
        from safetensors import safe_open

        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        self.rule.load_state_dict({k: config[k] for k in self.counters() if k in config})
        with safe_open(str(path / EMA_WEIGHTS), framework="pt") as weights:
            for name, param, shadow in zip(self.names, self.params, self.shadow, strict=True):
                shadow.copy_(local_slice(param, weights.get_tensor(name).float()))
