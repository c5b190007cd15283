"""Import Stable Diffusion 1.x / 2.x weights (diffusers folder layout) into MONAI networks.

A local Stable Diffusion folder in diffusers layout (``vae/``, ``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``; each model folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` or ``.bin``)
is read without network access and mapped, tensor by tensor, onto MONAI's generative networks, so that MAM-E's
recipe (fine-tune Stable Diffusion) runs through MONAI/Ignite engines:

* the UNet becomes :class:`SDDiffusionModelUNet`, a MONAI ``DiffusionModelUNet`` whose only addition is the
  GroupNorm epsilon of the spatial transformers (diffusers hard-codes 1e-6 there, MONAI reuses ``norm_eps``,
  1e-5 in SD). The plain MONAI class loads the same state dict (identical keys and shapes) if that last bit
  of exactness does not matter.
* the VAE becomes :class:`SDAutoencoderKL`, a MONAI ``AutoencoderKL`` with Stable Diffusion's (CompVis LDM)
  layout, which plain MONAI cannot express: the encoder emits mean *and* log-variance channels (2 x latent)
  that ``quant_conv`` mixes; the decoder has one more residual block per level than the encoder; both end with
  GroupNorm -> SiLU -> conv (MONAI's ``AutoencoderKL`` has no SiLU there). Its methods (``encode``,
  ``decode``, ``encode_stage_2_inputs`` ...) are MONAI's, so MONAI inferers use it unchanged.

Every tensor is mapped by name; a missing, unmapped or mis-shaped tensor, a missing or unreadable file, or a
configuration outside SD 1.x/2.x (the setting is named) raises :class:`~breastgen.errors.BreastGenError`.
Nothing is approximated: converted networks reproduce diffusers' outputs to float32 rounding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.blocks.spatialattention import SpatialAttentionBlock
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.nets.autoencoderkl import AEKLDownsample, AEKLResBlock, Decoder
from monai.networks.nets.diffusion_model_unet import SpatialTransformer
from monai.utils import ensure_tuple_rep
from torch import nn

from ..errors import BreastGenError
from ..io import atomic_torch_save

__all__ = [
    "SDAutoencoderKL", "SDDiffusionModelUNet", "SD_SCALE_FACTOR",
    "read_diffusers_config", "load_diffusers_weights",
    "autoencoder_args_from_diffusers", "unet_args_from_diffusers",
    "autoencoder_state_from_diffusers", "unet_state_from_diffusers",
    "monai_autoencoder_from_diffusers", "monai_unet_from_diffusers",
    "convert_sd_dir", "read_scheduler_config", "bundle_component",
    "save_monai_checkpoint", "load_monai_checkpoint",
]

SD_SCALE_FACTOR = 0.18215  # diffusers' default ``scaling_factor`` (SD 1.x and 2.x VAEs)
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json",
    "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin",
)
_TARGETS = {"autoencoder": f"{__name__}.SDAutoencoderKL", "unet": f"{__name__}.SDDiffusionModelUNet"}


# ---------------------------------------------------------------------------------------------- MONAI networks

class _GroupNormSiLU(nn.GroupNorm):
    """GroupNorm followed by SiLU, with GroupNorm's parameter names (so state-dict keys stay MONAI's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


def _with_silu(norm: nn.GroupNorm) -> _GroupNormSiLU:
    return _GroupNormSiLU(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine,
                          device=norm.weight.device, dtype=norm.weight.dtype)


class SDAutoencoderKL(AutoencoderKL):
    """MONAI ``AutoencoderKL`` with the Stable Diffusion VAE layout (same arguments as ``AutoencoderKL``).

    Differences from the parent, all required to reproduce SD's VAE: the encoder's last conv emits
    ``2 * latent_channels`` (mean and log-variance) and ``quant_conv_mu`` / ``quant_conv_log_sigma`` read all of
    them; the decoder has ``num_res_blocks[i] + 1`` residual blocks per level; encoder and decoder apply SiLU
    between their final GroupNorm and conv. State-dict keys are the parent's (some shapes differ).
    """

    def __init__(self, spatial_dims: int, in_channels: int = 3, out_channels: int = 3,
                 num_res_blocks: Sequence[int] | int = (2, 2, 2, 2), channels: Sequence[int] = (128, 256, 512, 512),
                 attention_levels: Sequence[bool] = (False, False, False, False), latent_channels: int = 4,
                 norm_num_groups: int = 32, norm_eps: float = 1e-6, with_encoder_nonlocal_attn: bool = True,
                 with_decoder_nonlocal_attn: bool = True, use_checkpoint: bool = False,
                 use_convtranspose: bool = False, include_fc: bool = True, use_combined_linear: bool = False,
                 use_flash_attention: bool = False) -> None:
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                         num_res_blocks=num_res_blocks, channels=channels, attention_levels=attention_levels,
                         latent_channels=latent_channels, norm_num_groups=norm_num_groups, norm_eps=norm_eps,
                         with_encoder_nonlocal_attn=with_encoder_nonlocal_attn,
                         with_decoder_nonlocal_attn=with_decoder_nonlocal_attn, use_checkpoint=use_checkpoint,
                         use_convtranspose=use_convtranspose, include_fc=include_fc,
                         use_combined_linear=use_combined_linear, use_flash_attention=use_flash_attention)
        if isinstance(num_res_blocks, int):
            num_res_blocks = ensure_tuple_rep(num_res_blocks, len(channels))
        self.decoder = Decoder(spatial_dims=spatial_dims, channels=channels, in_channels=latent_channels,
                               out_channels=out_channels, num_res_blocks=[n + 1 for n in num_res_blocks],
                               norm_num_groups=norm_num_groups, norm_eps=norm_eps, attention_levels=attention_levels,
                               with_nonlocal_attn=with_decoder_nonlocal_attn, use_convtranspose=use_convtranspose,
                               include_fc=include_fc, use_combined_linear=use_combined_linear,
                               use_flash_attention=use_flash_attention)
        for part in (self.encoder, self.decoder):
            part.blocks[-2] = _with_silu(part.blocks[-2])

        def conv(cin: int, cout: int, k: int) -> Convolution:
            return Convolution(spatial_dims=spatial_dims, in_channels=cin, out_channels=cout, strides=1,
                               kernel_size=k, padding=k // 2, conv_only=True)

        self.encoder.blocks[-1] = conv(channels[-1], 2 * latent_channels, 3)
        self.encoder.out_channels = 2 * latent_channels
        self.quant_conv_mu = conv(2 * latent_channels, latent_channels, 1)
        self.quant_conv_log_sigma = conv(2 * latent_channels, latent_channels, 1)


class SDDiffusionModelUNet(DiffusionModelUNet):
    """MONAI ``DiffusionModelUNet`` plus ``transformer_norm_eps``: the epsilon of the GroupNorm in front of each
    spatial transformer (diffusers: 1e-6; MONAI reuses ``norm_eps``). Same state dict as the parent."""

    def __init__(self, *args: Any, transformer_norm_eps: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transformer_norm_eps = transformer_norm_eps
        if transformer_norm_eps is not None:
            for module in self.modules():
                if isinstance(module, SpatialTransformer):
                    module.norm.eps = float(transformer_norm_eps)


# ------------------------------------------------------------------------------------------------- reading

def _model_dir(model_dir: str | Path, what: str) -> Path:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BreastGenError(f"{what} folder not found (expected a diffusers model folder with config.json and "
                             "diffusion_pytorch_model.safetensors or .bin)", model_dir)
    return model_dir


def read_diffusers_config(model_dir: str | Path) -> dict:
    """``<model_dir>/config.json`` as a dict (one-line error if missing or not JSON)."""
    path = _model_dir(model_dir, "model") / "config.json"
    if not path.is_file():
        raise BreastGenError("config.json not found (is this a diffusers model folder?)", path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BreastGenError(f"cannot read config ({type(e).__name__}: {e})", path) from None
    if not isinstance(cfg, dict):
        raise BreastGenError("config.json is not a JSON object", path)
    return cfg


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.name.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise BreastGenError("reading .safetensors needs the safetensors package (pip install "
                                     "safetensors), or provide diffusion_pytorch_model.bin", path) from None
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except BreastGenError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a corrupt/foreign file for the user
        raise BreastGenError(f"cannot read weights ({_first_line(e)})", path) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BreastGenError("weights file is not a flat dict of tensors (a diffusers state dict)", path)
    return dict(state)


def load_diffusers_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a diffusers model folder, as float32 CPU tensors.

    Looks for, in order: ``diffusion_pytorch_model.safetensors``, ``.bin``, their sharded ``.index.json``
    forms, then the ``fp16`` variants. ``.bin`` files load with ``torch.load(weights_only=True)``.
    """
    model_dir = _model_dir(model_dir, "model")
    path = next((model_dir / n for n in WEIGHT_FILES if (model_dir / n).is_file()), None)
    if path is None:
        raise BreastGenError(f"no weights file found (expected one of: {', '.join(WEIGHT_FILES[:2])})", model_dir)
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
        except Exception as e:  # noqa: BLE001
            raise BreastGenError(f"cannot read shard index ({_first_line(e)})", path) from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (model_dir / shard).is_file():
                raise BreastGenError("weights shard listed in the index is missing", model_dir / shard)
            state.update(_read_tensor_file(model_dir / shard))
    else:
        state = _read_tensor_file(path)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


# --------------------------------------------------------------------------------------- config -> MONAI args

def _check_settings(cfg: Mapping, expected: Mapping[str, Any], what: str, path: Path) -> None:
    for key, want in expected.items():
        if key not in cfg:  # absent: diffusers' default, which is Stable Diffusion's
            continue
        have = cfg[key]
        ok = have in want if isinstance(want, tuple) else have == want
        if not ok:
            shown = " or ".join(map(repr, want)) if isinstance(want, tuple) else repr(want)
            raise BreastGenError(f"unsupported {what} setting {key}={have!r} (only Stable Diffusion 1.x/2.x "
                                 f"{what}s convert to MONAI; expected {shown})", path)


def _per_level(value: Any, n: int, key: str, what: str, path: Path) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise BreastGenError(f"unsupported {what} setting {key}={value!r}: needs one value per level ({n})", path)
    return values


def _int_list(values: Sequence, key: str, what: str, path: Path) -> list[int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise BreastGenError(f"unsupported {what} setting {key}={list(values)!r}: positive integers expected", path)
    return [int(v) for v in values]


_VAE_FIXED = {"_class_name": "AutoencoderKL", "act_fn": "silu", "mid_block_add_attention": True,
              "shift_factor": None, "latents_mean": None, "latents_std": None,
              "use_quant_conv": (True, False), "use_post_quant_conv": (True, False)}


def autoencoder_args_from_diffusers(cfg: Mapping, path: str | Path = "vae/config.json") -> dict:
    """``SDAutoencoderKL`` constructor arguments for a diffusers ``AutoencoderKL`` config (SD 1.x / 2.x)."""
    path = Path(path)
    _check_settings(cfg, _VAE_FIXED, "VAE", path)
    channels = _int_list(cfg.get("block_out_channels", (64,)), "block_out_channels", "VAE", path)
    n = len(channels)
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(cfg.get(key, [block] * n))
        if types != [block] * n:
            raise BreastGenError(f"unsupported VAE setting {key}={types!r} (expected {n} x {block!r})", path)
    layers = cfg.get("layers_per_block", 1)
    groups = cfg.get("norm_num_groups", 32)
    if not isinstance(layers, int) or layers < 1:
        raise BreastGenError(f"unsupported VAE setting layers_per_block={layers!r} (a positive integer)", path)
    if not isinstance(groups, int) or groups < 1 or any(c % groups for c in channels):
        raise BreastGenError(f"unsupported VAE setting norm_num_groups={groups!r}: must divide every "
                             f"block_out_channels {channels}", path)
    return {
        "spatial_dims": 2,
        "in_channels": int(cfg.get("in_channels", 3)),
        "out_channels": int(cfg.get("out_channels", 3)),
        "num_res_blocks": [layers] * n,
        "channels": channels,
        "attention_levels": [False] * n,
        "latent_channels": int(cfg.get("latent_channels", 4)),
        "norm_num_groups": groups,
        "norm_eps": 1e-6,  # diffusers' VAE hard-codes it
        "with_encoder_nonlocal_attn": True,
        "with_decoder_nonlocal_attn": True,
        "include_fc": True,
        "use_combined_linear": False,
    }


_UNET_FIXED = {
    "_class_name": "UNet2DConditionModel", "mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu",
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "dropout": 0.0, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "class_embed_type": None,
    "addition_embed_type": None, "addition_time_embed_dim": None, "num_class_embeds": None,
    "projection_class_embeddings_input_dim": None, "class_embeddings_concat": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "only_cross_attention": False,
    "mid_block_only_cross_attention": (None, False), "cross_attention_norm": None, "attention_type": "default",
    "num_attention_heads": None, "reverse_transformer_layers_per_block": None,
    "use_linear_projection": (False, True), "upcast_attention": (False, True),
}


def unet_args_from_diffusers(cfg: Mapping, path: str | Path = "unet/config.json") -> dict:
    """``SDDiffusionModelUNet`` constructor arguments for a diffusers ``UNet2DConditionModel`` config.

    diffusers' SD configs call the number of heads ``attention_head_dim`` (8 in SD 1.x; [5, 10, 20, 20] in
    SD 2.x); MONAI wants channels per head, so ``num_head_channels[i] = block_out_channels[i] // heads[i]``.
    ``use_linear_projection`` (SD 2.x) needs no argument: its linear projections become MONAI's 1x1 convs.
    """
    path = Path(path)
    _check_settings(cfg, _UNET_FIXED, "UNet", path)
    channels = _int_list(cfg.get("block_out_channels", (320, 640, 1280, 1280)), "block_out_channels", "UNet", path)
    n = len(channels)
    down = list(cfg.get("down_block_types", ()))
    up = list(cfg.get("up_block_types", ()))
    if len(down) != n or any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        raise BreastGenError(f"unsupported UNet setting down_block_types={down!r} (expected {n} of "
                             "CrossAttnDownBlock2D / DownBlock2D)", path)
    attention_levels = [t == "CrossAttnDownBlock2D" for t in down]
    mirrored = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)]
    if up != mirrored:
        raise BreastGenError(f"unsupported UNet setting up_block_types={up!r} (MONAI mirrors the down blocks: "
                             f"expected {mirrored!r})", path)
    layers = _int_list(_per_level(cfg.get("layers_per_block", 2), n, "layers_per_block", "UNet", path),
                       "layers_per_block", "UNet", path)
    heads = _int_list(_per_level(cfg.get("attention_head_dim", 8), n, "attention_head_dim", "UNet", path),
                      "attention_head_dim", "UNet", path)
    if any(c % h for c, h in zip(channels, heads)):
        raise BreastGenError(f"unsupported UNet setting attention_head_dim={heads!r}: the number of heads must "
                             f"divide block_out_channels {channels}", path)
    tlayers = _per_level(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block", "UNet", path)
    if len(set(map(str, tlayers))) != 1 or not isinstance(tlayers[0], int) or tlayers[0] < 1:
        raise BreastGenError(f"unsupported UNet setting transformer_layers_per_block={tlayers!r} (MONAI needs one "
                             "integer for all levels)", path)
    cross = _per_level(cfg.get("cross_attention_dim", 1280), n, "cross_attention_dim", "UNet", path)
    if len(set(cross)) != 1 or not isinstance(cross[0], int) or cross[0] < 1:
        raise BreastGenError(f"unsupported UNet setting cross_attention_dim={cross!r} (MONAI needs one integer)",
                             path)
    groups = cfg.get("norm_num_groups", 32)
    if not isinstance(groups, int) or groups < 1 or any(c % groups for c in channels):
        raise BreastGenError(f"unsupported UNet setting norm_num_groups={groups!r}: must divide every "
                             f"block_out_channels {channels}", path)
    return {
        "spatial_dims": 2,
        "in_channels": int(cfg.get("in_channels", 4)),
        "out_channels": int(cfg.get("out_channels", 4)),
        "num_res_blocks": layers,
        "channels": channels,
        "attention_levels": attention_levels,
        "norm_num_groups": groups,
        "norm_eps": float(cfg.get("norm_eps", 1e-5)),
        "resblock_updown": False,
        "num_head_channels": [c // h for c, h in zip(channels, heads)],
        "with_conditioning": True,
        "transformer_num_layers": int(tlayers[0]),
        "cross_attention_dim": int(cross[0]),
        "upcast_attention": bool(cfg.get("upcast_attention", False)),
        "include_fc": True,
        "use_combined_linear": False,
        "transformer_norm_eps": 1e-6,  # diffusers' Transformer2DModel hard-codes it
    }


# ---------------------------------------------------------------------------------------------- weight mapping

def _is_1x1_variant(a: torch.Size, b: torch.Size) -> bool:
    """Linear (O, I) vs 1x1 conv (O, I, 1, ...) weights of the same projection."""
    return a[:2] == b[:2] and all(s == 1 for s in a[2:]) and all(s == 1 for s in b[2:])


def _assemble(net: nn.Module, src: Mapping[str, torch.Tensor], translate: Callable[[str], Sequence[str]],
              path: Path, what: str, preset: Mapping[str, torch.Tensor] = (), used: set[str] | None = None,
              ) -> dict[str, torch.Tensor]:
    """Map every key of ``net.state_dict()`` to one source tensor (candidates from ``translate``); refuse
    missing, unmapped and mis-shaped tensors. ``preset`` holds entries built by hand (quant-conv splits)."""
    used = set() if used is None else set(used)
    out: dict[str, torch.Tensor] = dict(preset)
    for key, ref in net.state_dict().items():
        if key in out:
            tensor = out[key]
        else:
            candidates = list(translate(key))
            found = next((c for c in candidates if c in src), None)
            if found is None:
                raise BreastGenError(f"{what} weights lack {candidates[0] if candidates else key!r} (needed for "
                                     f"MONAI {key!r}); the weights do not match config.json", path)
            used.add(found)
            tensor = src[found]
            if tensor.shape != ref.shape and _is_1x1_variant(tensor.shape, ref.shape):
                tensor = tensor.reshape(ref.shape)
        if tensor.shape != ref.shape:
            raise BreastGenError(f"{what} weight for MONAI {key!r} has shape {tuple(tensor.shape)}, the network "
                                 f"built from config.json needs {tuple(ref.shape)}", path)
        out[key] = tensor.contiguous()
    unmapped = sorted(set(src) - used)
    if unmapped:
        more = f" and {len(unmapped) - 3} more" if len(unmapped) > 3 else ""
        raise BreastGenError(f"{what} weights hold tensors with no place in the MONAI network: "
                             f"{', '.join(unmapped[:3])}{more} (config.json does not describe these weights)", path)
    return out


def _build(cls: type[nn.Module], args: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None = None
           ) -> nn.Module:
    """Build on the meta device and adopt ``state`` (no second copy of the weights in memory)."""
    if state is None:
        return cls(**args)
    with torch.device("meta"):
        net = cls(**args)
    net.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*net.parameters(), *net.buffers()]):  # pragma: no cover - guards future MONAI
        raise RuntimeError(f"{cls.__name__}: some tensors were not loaded")
    return net.eval()


_RES_RULES = ((r"conv1\.conv\.", "conv1."), (r"conv2\.conv\.", "conv2."),
              (r"nin_shortcut\.conv\.", "conv_shortcut."), (r"skip_connection\.conv\.", "conv_shortcut."))


def _sub_all(key: str, rules: Sequence[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _vae_block_prefixes(part: str, blocks: nn.ModuleList, args: Mapping[str, Any]) -> list[str]:
    """diffusers prefix of each entry of MONAI ``encoder.blocks`` / ``decoder.blocks`` (forward order)."""
    n, layers = len(args["channels"]), args["num_res_blocks"]
    seq: list[tuple[type, str]] = [(Convolution, f"{part}.conv_in")]
    mid = [(AEKLResBlock, f"{part}.mid_block.resnets.0"), (SpatialAttentionBlock, f"{part}.mid_block.attentions.0"),
           (AEKLResBlock, f"{part}.mid_block.resnets.1")]
    if part == "encoder":
        for i in range(n):
            seq += [(AEKLResBlock, f"encoder.down_blocks.{i}.resnets.{j}") for j in range(layers[i])]
            if i < n - 1:
                seq.append((AEKLDownsample, f"encoder.down_blocks.{i}.downsamplers.0"))
        seq += mid
    else:
        seq += mid
        for i in range(n):
            seq += [(AEKLResBlock, f"decoder.up_blocks.{i}.resnets.{j}") for j in range(layers[n - 1 - i] + 1)]
            if i < n - 1:
                seq.append((nn.Module, f"decoder.up_blocks.{i}.upsamplers.0"))
    seq += [(nn.GroupNorm, f"{part}.conv_norm_out"), (Convolution, f"{part}.conv_out")]
    if len(seq) != len(blocks) or not all(isinstance(b, t) for b, (t, _) in zip(blocks, seq)):
        raise RuntimeError(f"MONAI {part} layout changed; sd_import needs updating")  # pragma: no cover
    return [p for _, p in seq]


def _vae_translator(net: SDAutoencoderKL, args: Mapping[str, Any]) -> Callable[[str], list[str]]:
    prefixes = {part: _vae_block_prefixes(part, getattr(net, part).blocks, args) for part in ("encoder", "decoder")}
    attn = {"to_q": ("to_q", "query"), "to_k": ("to_k", "key"), "to_v": ("to_v", "value"),
            "out_proj": ("to_out.0", "proj_attn")}

    def translate(key: str) -> list[str]:
        m = re.fullmatch(r"(encoder|decoder)\.blocks\.(\d+)\.(.+)", key)
        if m is None:  # post_quant_conv.conv.weight -> post_quant_conv.weight
            return [key.replace(".conv.", ".")]
        prefix, rest = prefixes[m.group(1)][int(m.group(2))], m.group(3)
        a = re.fullmatch(r"attn\.(to_q|to_k|to_v|out_proj)\.(weight|bias)", rest)
        if a:  # current diffusers names first, then the pre-0.14 ones some SD 1.x files still carry
            return [f"{prefix}.{name}.{a.group(2)}" for name in attn[a.group(1)]]
        if rest.startswith("norm.") and "attentions" in prefix:
            return [f"{prefix}.group_norm.{rest[5:]}"]
        if "samplers" in prefix:  # AEKLDownsample .conv.conv.* / MONAI Upsample .postconv.conv.*
            return [f"{prefix}.conv.{rest.rsplit('.', 1)[-1]}"]
        rest = _sub_all(rest, _RES_RULES)
        if rest.startswith("conv."):
            rest = rest[5:]  # Convolution wraps its nn.Conv as ".conv"
        return [f"{prefix}.{rest}"]

    return translate


_UNET_RULES = (
    (r"^conv_in\.conv\.", "conv_in."), (r"^time_embed\.0\.", "time_embedding.linear_1."),
    (r"^time_embed\.2\.", "time_embedding.linear_2."), (r"^class_embedding\.", "class_embedding."),
    (r"^down_blocks\.(\d+)\.downsampler\.op\.conv\.", r"down_blocks.\1.downsamplers.0.conv."),
    (r"^up_blocks\.(\d+)\.upsampler\.postconv\.conv\.", r"up_blocks.\1.upsamplers.0.conv."),
    (r"^middle_block\.resnet_1\.", "mid_block.resnets.0."), (r"^middle_block\.resnet_2\.", "mid_block.resnets.1."),
    (r"^middle_block\.attention\.", "mid_block.attentions.0."),
    (r"^out\.0\.", "conv_norm_out."), (r"^out\.2\.conv\.", "conv_out."),
    *_RES_RULES,
    (r"\.proj_in\.conv\.", ".proj_in."), (r"\.proj_out\.conv\.", ".proj_out."),
    (r"\.(attn[12])\.out_proj\.", r".\1.to_out.0."),
    (r"\.ff\.linear1\.", ".ff.net.0.proj."), (r"\.ff\.linear2\.", ".ff.net.2."),
)


# ------------------------------------------------------------------------------------------------ converters

def autoencoder_state_from_diffusers(src: Mapping[str, torch.Tensor], cfg: Mapping,
                                     path: str | Path = "vae") -> tuple[dict[str, torch.Tensor], dict]:
    """Map a diffusers ``AutoencoderKL`` state dict (with its config) to ``(SDAutoencoderKL state, args)``."""
    path = Path(path)
    args = autoencoder_args_from_diffusers(cfg, path / "config.json")
    with torch.device("meta"):
        skeleton = SDAutoencoderKL(**args)
    latent = args["latent_channels"]
    preset: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    if cfg.get("use_quant_conv", True):
        for name in ("quant_conv.weight", "quant_conv.bias"):
            if name not in src:
                raise BreastGenError(f"VAE weights lack {name!r}; the weights do not match config.json", path)
        qw, qb, used = src["quant_conv.weight"], src["quant_conv.bias"], {"quant_conv.weight", "quant_conv.bias"}
    else:  # no quant_conv: identity
        qw, qb = torch.eye(2 * latent)[:, :, None, None], torch.zeros(2 * latent)
    if tuple(qw.shape[:2]) != (2 * latent, 2 * latent) or tuple(qb.shape) != (2 * latent,):
        raise BreastGenError(f"VAE weight 'quant_conv.weight' has shape {tuple(qw.shape)}, latent_channels="
                             f"{latent} needs ({2 * latent}, {2 * latent}, 1, 1)", path)
    # diffusers: moments = quant_conv(h); mean, logvar = moments.chunk(2): split the rows between the two convs
    preset["quant_conv_mu.conv.weight"], preset["quant_conv_mu.conv.bias"] = qw[:latent].clone(), qb[:latent].clone()
    preset["quant_conv_log_sigma.conv.weight"] = qw[latent:].clone()
    preset["quant_conv_log_sigma.conv.bias"] = qb[latent:].clone()
    if not cfg.get("use_post_quant_conv", True):
        preset["post_quant_conv.conv.weight"] = torch.eye(latent)[:, :, None, None]
        preset["post_quant_conv.conv.bias"] = torch.zeros(latent)
    return _assemble(skeleton, src, _vae_translator(skeleton, args), path, "VAE", preset, used), args


def unet_state_from_diffusers(src: Mapping[str, torch.Tensor], cfg: Mapping,
                              path: str | Path = "unet") -> tuple[dict[str, torch.Tensor], dict]:
    """Map a diffusers ``UNet2DConditionModel`` state dict (with its config) to
    ``(SDDiffusionModelUNet state, args)``."""
    path = Path(path)
    args = unet_args_from_diffusers(cfg, path / "config.json")
    with torch.device("meta"):
        skeleton = SDDiffusionModelUNet(**args)
    return _assemble(skeleton, src, lambda k: [_sub_all(k, _UNET_RULES)], path, "UNet"), args


def monai_autoencoder_from_diffusers(vae_dir: str | Path) -> tuple[SDAutoencoderKL, dict]:
    """Convert a diffusers ``AutoencoderKL`` folder (SD 1.x/2.x ``vae/``) into :class:`SDAutoencoderKL`.

    Returns ``(network, config)``; ``config`` holds ``target`` (the class path), ``args`` (constructor
    arguments), ``scale_factor`` (the VAE's ``scaling_factor``: latents are multiplied by it before diffusion,
    as MONAI's ``LatentDiffusionInferer(scale_factor=...)`` does), ``source`` and ``sample_size`` (image size).
    """
    vae_dir = _model_dir(vae_dir, "VAE")
    cfg = read_diffusers_config(vae_dir)
    autoencoder_args_from_diffusers(cfg, vae_dir / "config.json")  # refuse a bad config before reading weights
    scale = cfg.get("scaling_factor", SD_SCALE_FACTOR)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise BreastGenError(f"unsupported VAE setting scaling_factor={scale!r} (a positive number)",
                             vae_dir / "config.json")
    state, args = autoencoder_state_from_diffusers(load_diffusers_weights(vae_dir), cfg, vae_dir)
    net = _build(SDAutoencoderKL, args, state)
    return net, {"target": _TARGETS["autoencoder"], "args": args, "scale_factor": float(scale),
                 "source": str(vae_dir), "sample_size": cfg.get("sample_size")}


def monai_unet_from_diffusers(unet_dir: str | Path) -> tuple[SDDiffusionModelUNet, dict]:
    """Convert a diffusers ``UNet2DConditionModel`` folder (SD 1.x/2.x ``unet/``) into
    :class:`SDDiffusionModelUNet`. Returns ``(network, config)`` with ``target``, ``args``, ``source`` and
    ``sample_size`` (the latent size SD was trained at: 64 for 512-px SD 1.x, 96 for 768-px SD 2.x)."""
    unet_dir = _model_dir(unet_dir, "UNet")
    cfg = read_diffusers_config(unet_dir)
    unet_args_from_diffusers(cfg, unet_dir / "config.json")  # refuse a bad config before reading weights
    state, args = unet_state_from_diffusers(load_diffusers_weights(unet_dir), cfg, unet_dir)
    net = _build(SDDiffusionModelUNet, args, state)
    return net, {"target": _TARGETS["unet"], "args": args, "source": str(unet_dir),
                 "sample_size": cfg.get("sample_size")}


_SCHEDULES = {"scaled_linear": "scaled_linear_beta", "linear": "linear_beta"}


def read_scheduler_config(sd_dir: str | Path) -> dict | None:
    """The training noise schedule of an SD folder (``scheduler/scheduler_config.json``), or None if absent.

    Returns diffusers' values plus ``monai_schedule`` (MONAI's name for ``beta_schedule``) and
    ``prediction_type`` ("epsilon" for SD 1.x and SD 2.x-base, "v_prediction" for 768-px SD 2.x).
    """
    path = Path(sd_dir) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BreastGenError(f"cannot read scheduler config ({type(e).__name__}: {e})", path) from None
    keys = ("_class_name", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
            "clip_sample", "set_alpha_to_one", "steps_offset", "timestep_spacing")
    out = {k: cfg[k] for k in keys if k in cfg}
    out.setdefault("prediction_type", "epsilon")
    out["monai_schedule"] = _SCHEDULES.get(cfg.get("beta_schedule", "linear"))
    return out


def convert_sd_dir(sd_dir: str | Path) -> tuple[SDAutoencoderKL, dict, SDDiffusionModelUNet, dict]:
    """Convert ``<sd_dir>/vae`` and ``<sd_dir>/unet``; see the two converters for the returned configs."""
    sd_dir = Path(sd_dir)
    if not sd_dir.is_dir():
        raise BreastGenError("Stable Diffusion folder not found (expected diffusers layout: vae/, unet/, "
                             "text_encoder/, tokenizer/)", sd_dir)
    for sub in ("vae", "unet"):
        if not (sd_dir / sub).is_dir():
            raise BreastGenError(f"no {sub}/ folder: not a Stable Diffusion folder in diffusers layout", sd_dir)
    autoencoder, ae_cfg = monai_autoencoder_from_diffusers(sd_dir / "vae")
    unet, unet_cfg = monai_unet_from_diffusers(sd_dir / "unet")
    if unet_cfg["args"]["in_channels"] != ae_cfg["args"]["latent_channels"]:
        raise BreastGenError(f"UNet in_channels={unet_cfg['args']['in_channels']} does not match the VAE's "
                             f"latent_channels={ae_cfg['args']['latent_channels']}", sd_dir)
    return autoencoder, ae_cfg, unet, unet_cfg


# ----------------------------------------------------------------------------------------------- checkpoints

def _plain(obj: Any) -> Any:
    """JSON-like copy (tuples -> lists) so that meta loads with weights_only and dumps as JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def bundle_component(config: Mapping) -> dict:
    """``{"_target_": ..., **args}``: a converter's config as a MONAI bundle config component."""
    return {"_target_": config["target"], **_plain(config["args"])}


def save_monai_checkpoint(target: str | Path, autoencoder: nn.Module, unet: nn.Module, autoencoder_config: Mapping,
                          unet_config: Mapping, extra_meta: Mapping | None = None) -> Path:
    """Write ``{"autoencoder": state_dict, "unet": state_dict, "meta": {...}}`` atomically.

    ``meta`` holds ``autoencoder`` / ``unet`` (bundle components: ``_target_`` + constructor arguments),
    ``scale_factor`` and anything in ``extra_meta`` (e.g. the scheduler settings). The file loads with
    ``breastgen.engines.load_checkpoint(path, {"autoencoder": ae, "unet": unet})`` or
    :func:`load_monai_checkpoint`.
    """
    meta = {"autoencoder": bundle_component(autoencoder_config), "unet": bundle_component(unet_config),
            "scale_factor": float(autoencoder_config["scale_factor"]),
            "source": _plain({"autoencoder": autoencoder_config.get("source"), "unet": unet_config.get("source")}),
            **_plain(dict(extra_meta or {}))}
    state = {"autoencoder": {k: v.detach().cpu().contiguous() for k, v in autoencoder.state_dict().items()},
             "unet": {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()},
             "meta": meta}
    return atomic_torch_save(state, target)


def load_monai_checkpoint(path: str | Path) -> tuple[nn.Module, nn.Module, dict]:
    """Rebuild ``(autoencoder, unet, meta)`` from a :func:`save_monai_checkpoint` file (one-line errors)."""
    from ..engines.checkpoints import load_state

    state = load_state(path)
    meta = state.get("meta") if isinstance(state, Mapping) else None
    if not isinstance(meta, Mapping) or "autoencoder" not in meta or "unet" not in meta:
        raise BreastGenError("not an imported Stable Diffusion checkpoint (no meta.autoencoder / meta.unet)", path)
    classes = {v: k for k, v in _TARGETS.items()}
    nets = []
    for key, cls in (("autoencoder", SDAutoencoderKL), ("unet", SDDiffusionModelUNet)):
        args = dict(meta[key])
        if classes.get(args.pop("_target_", None)) != key:
            raise BreastGenError(f"checkpoint meta.{key} names an unknown network class", path)
        try:
            nets.append(_build(cls, args, state[key]))
        except (RuntimeError, TypeError, KeyError) as e:
            raise BreastGenError(f"checkpoint {key!r} does not fit its own meta ({_first_line(e)})", path) from None
    return nets[0], nets[1], dict(meta)
