"""OpenAI's guided-diffusion / improved-diffusion UNets as diffusers UNet2DModels.

An architecture is described by guided-diffusion's own model flags (the keys of
`guided_diffusion.script_util.model_and_diffusion_defaults()`, mirrored in FLAG_DEFAULTS
so that msscale does not need guided-diffusion installed). `unet_config` turns the flags
into a UNet2DModel config that computes the same function, `key_pairs` lists which
guided-diffusion module becomes which diffusers module, and `convert_state_dict` maps a
checkpoint's tensors accordingly.

Details that change numbers (each checked against the reference in
tests/test_openai_import.py):
- GroupNorm: guided-diffusion uses 32 groups with torch's default eps 1e-5 everywhere,
  including the middle block's attention, which diffusers builds without a norm under
  scale-shift unless `attn_norm_num_groups` is set.
- Timestep embedding: [cos, sin] with max period 10000 (`flip_sin_to_cos`, shift 0),
  sized by the first level's channels, so channel_mult must start with 1.
- Attention: the fused 1x1 qkv convolution is split into to_q/to_k/to_v. The legacy
  order (guided's default and improved-diffusion's only one) lays its 3C outputs out per
  head as [q_h, k_h, v_h]; the new order as [q, k, v], each head-major.
- Up/down sampling: residual blocks (`resblock_updown`) or strided/nearest convolutions.
- Learned variance (`learn_sigma`): 6 output channels, the first 3 are epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msscale.errors import UserError

# guided_diffusion.script_util.model_and_diffusion_defaults(), key for key.
FLAG_DEFAULTS = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
}

# The published checkpoints' flags (their READMEs), on top of FLAG_DEFAULTS.
PRESETS = {
    # guided-diffusion, 256x256_diffusion_uncond.pt
    "adm-imagenet256-uncond": {
        "image_size": 256,
        "num_channels": 256,
        "num_res_blocks": 2,
        "channel_mult": "1,1,2,2,4,4",
        "attention_resolutions": "32,16,8",
        "num_head_channels": 64,
        "resblock_updown": True,
        "use_scale_shift_norm": True,
        "learn_sigma": True,
        "use_fp16": True,
        "diffusion_steps": 1000,
        "noise_schedule": "linear",
    },
    # improved-diffusion, cifar10_uncond_50M_500K.pt (trained with rescale_timesteps)
    "iddpm-cifar10-uncond": {
        "image_size": 32,
        "num_channels": 128,
        "num_res_blocks": 3,
        "channel_mult": "1,2,2,2",
        "attention_resolutions": "16,8",
        "num_heads": 4,
        "learn_sigma": True,
        "dropout": 0.3,
        "diffusion_steps": 4000,
        "noise_schedule": "cosine",
        "rescale_timesteps": True,
    },
}

# guided-diffusion's create_model picks these when channel_mult is "".
DEFAULT_CHANNEL_MULT = {
    512: "0.5,1,1,2,2,4,4",
    256: "1,1,2,2,4,4",
    128: "1,1,2,3,4",
    64: "1,2,3,4",
}

GROUPS = 32  # guided's normalization(): GroupNorm32(32, channels), eps 1e-5
NORM_EPS = 1e-5


def parse_flag(name: str, text: str):
    """A FLAG=VALUE override's value, typed like guided-diffusion's default for FLAG."""
    if name not in FLAG_DEFAULTS:
        raise UserError(
            f"--override {name}: not a guided-diffusion model flag; "
            f"valid flags: {', '.join(FLAG_DEFAULTS)}"
        )
    default = FLAG_DEFAULTS[name]
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise UserError(f"--override {name}={text}: expected true or false")
    try:
        return type(default)(text)
    except ValueError:
        raise UserError(
            f"--override {name}={text}: expected {type(default).__name__}"
        ) from None


def resolve_flags(arch: str, overrides: list[str]) -> dict:
    """FLAG_DEFAULTS, then the --arch preset, then FLAG=VALUE overrides."""
    if arch not in PRESETS:
        raise UserError(f"--arch {arch!r}: expected one of {', '.join(PRESETS)}")
    flags = {**FLAG_DEFAULTS, **PRESETS[arch]}
    for text in overrides:
        if "=" not in text:
            raise UserError(f"--override {text!r} is not of the form FLAG=VALUE")
        name, value = text.split("=", 1)
        flags[name.strip()] = parse_flag(name.strip(), value)
    return flags


@dataclass(frozen=True)
class Arch:
    """The structure guided-diffusion's UNetModel builds from the flags."""

    image_size: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: frozenset[int]
    head_dim: int
    resblock_updown: bool
    new_attention_order: bool

    def channels(self, level: int) -> int:
        return self.channel_mult[level] * self.model_channels

    @property
    def levels(self) -> int:
        return len(self.channel_mult)


def _channel_mult(flags: dict) -> tuple[int, ...]:
    text = flags["channel_mult"] or DEFAULT_CHANNEL_MULT.get(flags["image_size"])
    if text is None:
        raise UserError(
            f"image_size {flags['image_size']} has no default channel_mult in guided-diffusion; "
            "give one with --override channel_mult=1,2,2,2"
        )
    try:
        mult = tuple(float(m) for m in text.split(","))
    except ValueError:
        raise UserError(f"channel_mult {text!r}: expected comma-separated numbers") from None
    if mult[0] != 1 or any(m != int(m) for m in mult):
        # UNet2DModel sizes its timestep embedding by the first level's channels, where
        # guided-diffusion uses num_channels: the two agree only for a first multiplier of 1.
        raise UserError(
            f"channel_mult {text}: msscale converts only integer multipliers starting with 1"
        )
    return tuple(int(m) for m in mult)


def _heads(flags: dict, channels: int, upsample: bool) -> int:
    if flags["num_head_channels"] != -1:
        if channels % flags["num_head_channels"]:
            raise UserError(
                f"num_head_channels {flags['num_head_channels']} does not divide "
                f"{channels} channels"
            )
        return channels // flags["num_head_channels"]
    if upsample and flags["num_heads_upsample"] != -1:
        return flags["num_heads_upsample"]
    return flags["num_heads"]


def _refuse_unsupported(flags: dict) -> None:
    if flags["class_cond"]:
        raise UserError("class_cond=true: msscale denoises without labels; use an uncond model")
    if flags["timestep_respacing"]:
        raise UserError("timestep_respacing is a sampling option; import with the full schedule")
    for name in ("num_channels", "num_res_blocks", "image_size", "diffusion_steps"):
        if flags[name] < 1:
            raise UserError(f"{name} must be positive, got {flags[name]}")
    if flags["num_channels"] % GROUPS:
        raise UserError(f"num_channels {flags['num_channels']} is not a multiple of {GROUPS}")


def build_arch(flags: dict) -> Arch:
    """The UNet structure of `flags`; refuses what UNet2DModel cannot compute the same way."""
    _refuse_unsupported(flags)
    mult = _channel_mult(flags)
    ds = {flags["image_size"] // int(r) for r in str(flags["attention_resolutions"]).split(",")
          if r.strip()}
    levels = frozenset(level for level in range(len(mult)) if 2**level in ds)
    mc = flags["num_channels"]
    # every attention layer: the down and up blocks at `levels`, and the middle block
    layers = [(mult[lv] * mc, False) for lv in levels] + [(mult[lv] * mc, True) for lv in levels]
    layers.append((mult[-1] * mc, False))
    head_dims = {ch // _heads(flags, ch, up) for ch, up in layers}
    if len(head_dims) != 1:
        raise UserError(
            f"attention layers with {sorted(head_dims)} channels per head: UNet2DModel "
            "has one attention_head_dim for all of them"
        )
    return Arch(
        image_size=flags["image_size"],
        model_channels=mc,
        channel_mult=mult,
        num_res_blocks=flags["num_res_blocks"],
        attention_levels=levels,
        head_dim=head_dims.pop(),
        resblock_updown=flags["resblock_updown"],
        new_attention_order=flags["use_new_attention_order"],
    )


def unet_config(flags: dict) -> dict:
    """The UNet2DModel config that computes what guided-diffusion's UNetModel computes."""
    arch = build_arch(flags)
    resample = "resnet" if arch.resblock_updown else "conv"
    plain_down = "ResnetDownsampleBlock2D" if arch.resblock_updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if arch.resblock_updown else "UpBlock2D"
    down = [
        "AttnDownBlock2D" if lv in arch.attention_levels else plain_down
        for lv in range(arch.levels)
    ]
    up = [
        "AttnUpBlock2D" if lv in arch.attention_levels else plain_up
        for lv in reversed(range(arch.levels))
    ]
    return {
        "sample_size": arch.image_size,
        "in_channels": 3,
        "out_channels": 6 if flags["learn_sigma"] else 3,
        "layers_per_block": arch.num_res_blocks,
        "block_out_channels": [arch.channels(lv) for lv in range(arch.levels)],
        "down_block_types": down,
        "up_block_types": up,
        "downsample_type": resample,
        "upsample_type": resample,
        "downsample_padding": 1,
        "attention_head_dim": arch.head_dim,
        "norm_num_groups": GROUPS,
        "attn_norm_num_groups": GROUPS,  # trap: the mid-block attention needs its norm
        "norm_eps": NORM_EPS,
        "resnet_time_scale_shift": "scale_shift" if flags["use_scale_shift_norm"] else "default",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "time_embedding_type": "positional",
        "act_fn": "silu",
        "dropout": float(flags["dropout"]),
    }


# ----------------------------------------------------------------------------------------
# Key mapping
# ----------------------------------------------------------------------------------------

RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
}
SKIP = {"skip_connection": "conv_shortcut"}
ATTENTION = {"norm": "group_norm", "qkv": "qkv", "proj_out": "to_out.0"}
MODULE_KINDS = {
    "plain": {"": ""},
    "down_conv": {"op": "conv"},
    "up_conv": {"conv": "conv"},
    "resblock": RESBLOCK,
    "resblock_skip": {**RESBLOCK, **SKIP},
    "attention": ATTENTION,
}


def _resblock(ch_in: int, ch_out: int) -> str:
    return "resblock" if ch_in == ch_out else "resblock_skip"


def _down_pairs(arch: Arch) -> tuple[list[tuple[str, str, str]], list[int]]:
    """input_blocks.* -> down_blocks.*, and the channels of each skip connection."""
    pairs, skips = [("input_blocks.0.0", "conv_in", "plain")], [arch.model_channels]
    ch, k = arch.model_channels, 1
    for level in range(arch.levels):
        out = arch.channels(level)
        for i in range(arch.num_res_blocks):
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{i}",
                          _resblock(ch, out)))
            if level in arch.attention_levels:
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{i}",
                              "attention"))
            ch, k = out, k + 1
            skips.append(ch)
        if level != arch.levels - 1:
            kind = "resblock" if arch.resblock_updown else "down_conv"
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0", kind))
            k += 1
            skips.append(ch)
    return pairs, skips


def _up_pairs(arch: Arch, skips: list[int]) -> list[tuple[str, str, str]]:
    """output_blocks.* -> up_blocks.*, consuming the skip connections last-in first-out."""
    pairs, ch, k = [], arch.channels(arch.levels - 1), 0
    for j, level in enumerate(reversed(range(arch.levels))):
        out = arch.channels(level)
        for i in range(arch.num_res_blocks + 1):
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{j}.resnets.{i}",
                          _resblock(ch + skips.pop(), out)))
            ch, position = out, 1
            if level in arch.attention_levels:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{j}.attentions.{i}",
                              "attention"))
                position = 2
            if level and i == arch.num_res_blocks:
                kind = "resblock" if arch.resblock_updown else "up_conv"
                pairs.append((f"output_blocks.{k}.{position}", f"up_blocks.{j}.upsamplers.0",
                              kind))
            k += 1
    return pairs


def key_pairs(arch: Arch) -> list[tuple[str, str, str]]:
    """(guided module, diffusers module, kind) for every module that holds parameters."""
    pairs = [
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
    ]
    down, skips = _down_pairs(arch)
    mid = arch.channels(arch.levels - 1)
    pairs += down + [
        ("middle_block.0", "mid_block.resnets.0", _resblock(mid, mid)),
        ("middle_block.1", "mid_block.attentions.0", "attention"),
        ("middle_block.2", "mid_block.resnets.1", _resblock(mid, mid)),
    ]
    pairs += _up_pairs(arch, skips)
    pairs += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return pairs


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if name else prefix


def expected_keys(arch: Arch) -> dict[str, str]:
    """{guided parameter name: diffusers name} (qkv keeps its fused name here)."""
    names = {}
    for guided, diffusers, kind in key_pairs(arch):
        for g_sub, d_sub in MODULE_KINDS[kind].items():
            for param in ("weight", "bias"):
                names[_join(_join(guided, g_sub), param)] = _join(_join(diffusers, d_sub), param)
    return names


def _split_qkv(tensor: torch.Tensor, head_dim: int, new_order: bool) -> list[torch.Tensor]:
    """A fused qkv conv1d weight [3C, C, 1] or bias [3C] -> q, k, v ([C, C] or [C])."""
    rows = tensor.shape[0] // 3
    heads = rows // head_dim
    flat = tensor.reshape(3 * rows, -1)
    if new_order:  # [q, k, v], each head-major
        parts = flat.view(3, heads, head_dim, -1).unbind(0)
    else:  # legacy: per head [q_h, k_h, v_h]
        parts = flat.view(heads, 3, head_dim, -1).unbind(1)
    shape = (rows, *tensor.shape[1:2])
    return [part.reshape(shape).contiguous() for part in parts]


def convert_state_dict(state: dict, arch: Arch) -> tuple[dict, dict[str, str]]:
    """(diffusers state dict in fp32, {diffusers name: guided name}) from a checkpoint.

    `state` must hold exactly `expected_keys(arch)` (checked by the caller).
    """
    out, origin = {}, {}
    for guided, diffusers in expected_keys(arch).items():
        tensor = state[guided].float()
        if diffusers.endswith(("qkv.weight", "qkv.bias")):
            base, param = diffusers.rsplit(".qkv.", 1)
            q, k, v = _split_qkv(tensor, arch.head_dim, arch.new_attention_order)
            for name, part in zip(("to_q", "to_k", "to_v"), (q, k, v), strict=True):
                out[f"{base}.{name}.{param}"] = part
                origin[f"{base}.{name}.{param}"] = guided
            continue
        if ".to_out.0." in diffusers and tensor.dim() == 3:
            tensor = tensor.squeeze(-1)  # conv1d 1x1 -> linear
        out[diffusers] = tensor
        origin[diffusers] = guided
    return out, origin
