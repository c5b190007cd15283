"""Image-to-image (pix2pix family) generators and discriminator for paired stain / modality translation.

* :class:`ResnetGenerator` -- the pix2pix / CycleGAN ``resnet_9blocks`` generator (7x7 stem, two stride-2
  downsamplings, ``n_blocks`` residual blocks with dropout, two transposed-conv upsamplings, tanh output).
  With ``attention=True`` a :class:`SelfAttention2d` follows every downsampling and every upsampling block.
* :class:`UNetGenerator` -- MONAI's ``UNet`` with a tanh head (output in [-1, 1] like the other generators).
* :func:`patch_discriminator` -- the 70x70 PatchGAN (MONAI ``PatchDiscriminator``; ``n_layers=3``).

All generators map images scaled to [-1, 1] to images in [-1, 1]; MONAI's ``(C, W, H)`` axis order is fine (all
layers are isotropic). Weights are initialised N(0, 0.02) (MONAI ``normal_init``), as in pix2pix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.nets import PatchDiscriminator, UNet
from monai.networks.utils import normal_init
from torch import nn

from ..errors import BreastGenError

__all__ = ["SelfAttention2d", "ResnetBlock", "ResnetGenerator", "UNetGenerator", "patch_discriminator",
           "make_generator", "GENERATORS"]


def _norm(kind: str, channels: int) -> nn.Module:
    kind = str(kind).lower()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if kind == "none":
        return nn.Identity()
    raise BreastGenError(f"norm must be 'batch', 'instance' or 'none', not {kind!r}")


class SelfAttention2d(nn.Module):
    """Self-attention over the pixels of a feature map with a learnable residual gate.

    ``y = x + gamma * softmax(Q K^T / sqrt(d)) V`` with ``Q, K`` (``d = qk_channels`` channels) and ``V``
    (``channels``) 1x1-convolution projections of ``x``; ``gamma`` starts at ``gate_init`` (0: the layer is the
    identity at initialisation and learns how much attention to mix in).

    Exact attention costs O(N^2) for N pixels. ``kv_grid`` (optional) average-pools the keys/values to at most
    ``kv_grid x kv_grid`` positions so that every pixel still attends over the whole image at a coarser grid -- this
    makes 512^2 / 1024^2 inputs tractable; ``None`` is exact global attention. Queries are processed in chunks of
    ``query_chunk`` so that memory stays O(chunk * M).

    MONAI's ``SABlock`` is a transformer block over token sequences (no residual gate, no key/value pooling), so
    this 2D layer is written here.
    """

    def __init__(self, channels: int, qk_channels: int | None = None, kv_grid: int | None = None,
                 gate_init: float = 0.0, query_chunk: int = 16384):
        super().__init__()
        self.qk_channels = int(qk_channels or max(1, channels // 8))
        self.kv_grid = None if kv_grid is None else int(kv_grid)
        self.query_chunk = int(query_chunk)
        self.query = nn.Conv2d(channels, self.qk_channels, 1)
        self.key = nn.Conv2d(channels, self.qk_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.tensor(float(gate_init)))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention output ``softmax(Q K^T / sqrt(d)) V`` (without gate and residual), shaped like ``x``."""
        b, c, w, h = x.shape
        kv = x
        if self.kv_grid is not None and (w > self.kv_grid or h > self.kv_grid):
            kv = F.adaptive_avg_pool2d(x, (min(w, self.kv_grid), min(h, self.kv_grid)))
        q = self.query(x).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, d)
        k = self.key(kv).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, M, d)
        v = self.value(kv).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, M, C)
        scale = 1.0 / math.sqrt(self.qk_channels)
        n = q.shape[2]
        if n <= self.query_chunk:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + self.query_chunk], k, v, scale=scale)
                             for i in range(0, n, self.query_chunk)], dim=2)
        return out.squeeze(1).transpose(1, 2).reshape(b, c, w, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.attend(x)

    def extra_repr(self) -> str:
        return f"qk_channels={self.qk_channels}, kv_grid={self.kv_grid}"


class ResnetBlock(nn.Module):
    """Residual block: reflect-pad, 3x3 conv, norm, ReLU, [dropout], reflect-pad, 3x3 conv, norm; plus input."""

    def __init__(self, channels: int, norm: str = "batch", dropout: float = 0.5):
        super().__init__()
        bias = str(norm).lower() != "batch"
        # the dropout slot is always there so that state dicts load whatever the dropout setting
        layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias),
                                   _norm(norm, channels), nn.ReLU(True),
                                   nn.Dropout(dropout) if dropout else nn.Identity()]
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias), _norm(norm, channels)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """pix2pix ``resnet_<n>blocks`` generator; ``attention=True`` adds :class:`SelfAttention2d` after each of the
    ``n_downsampling`` downsampling blocks and each upsampling block (the self-attention PyramidPix2pix variant).

    Defaults are ``resnet_9blocks``: ngf 64, BatchNorm, dropout 0.5. Input sides must be multiples of
    ``2 ** n_downsampling``.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, n_blocks: int = 9,
                 n_downsampling: int = 2, norm: str = "batch", dropout: float = 0.5, attention: bool = False,
                 attn_kv_grid: int | None = None, attn_qk_channels: int | None = None):
        super().__init__()
        self.n_downsampling = int(n_downsampling)
        bias = str(norm).lower() != "batch"

        def attn(c: int) -> nn.Module:  # Identity has no parameters: plain and attention state dicts share keys
            return SelfAttention2d(c, attn_qk_channels, attn_kv_grid) if attention else nn.Identity()

        self.stem = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7, bias=bias), _norm(norm, ngf),
                                  nn.ReLU(True))
        chans = [ngf * 2**i for i in range(self.n_downsampling + 1)]
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=bias),
                                                _norm(norm, 2 * c), nn.ReLU(True)) for c in chans[:-1])
        self.down_attn = nn.ModuleList(attn(2 * c) for c in chans[:-1])
        self.blocks = nn.Sequential(*[ResnetBlock(chans[-1], norm, dropout) for _ in range(n_blocks)])
        self.up = nn.ModuleList(nn.Sequential(nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1,
                                                                 bias=bias), _norm(norm, c // 2), nn.ReLU(True))
                                for c in chans[:0:-1])
        self.up_attn = nn.ModuleList(attn(c // 2) for c in chans[:0:-1])
        self.head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh())
        self.apply(normal_init)

    @property
    def size_multiple(self) -> int:
        return 2**self.n_downsampling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block, attn in zip(self.down, self.down_attn):
            x = attn(block(x))
        x = self.blocks(x)
        for block, attn in zip(self.up, self.up_attn):
            x = attn(block(x))
        return self.head(x)


class UNetGenerator(nn.Module):
    """U-Net generator: MONAI ``UNet`` (strided-conv encoder, transposed-conv decoder, skip connections) with a
    tanh head so that its output range matches the targets scaled to [-1, 1].

    ``channels`` has one entry per level; inputs must be multiples of ``2 ** (len(channels) - 1)``.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 channels: tuple[int, ...] = (64, 128, 256, 512, 512, 512, 512, 512), norm: str = "batch",
                 dropout: float = 0.0, act: str | tuple = ("LEAKYRELU", {"negative_slope": 0.2}),
                 num_res_units: int = 0):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        self.levels = len(channels) - 1
        self.unet = UNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, channels=channels,
                         strides=(2,) * self.levels, num_res_units=num_res_units, norm=str(norm).upper(), act=act,
                         dropout=dropout)
        self.apply(normal_init)

    @property
    def size_multiple(self) -> int:
        return 2**self.levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.unet(x))


def patch_discriminator(in_channels: int = 6, ndf: int = 64, n_layers: int = 3, norm: str = "BATCH") -> nn.Module:
    """The pix2pix PatchGAN (70x70 receptive field for ``n_layers=3``) as MONAI's ``PatchDiscriminator``:
    4x4 convs, stride 2 except the last two, LeakyReLU 0.2, no norm on the first layer, one logit per patch.

    It returns a list of intermediate features; the last element is the logit map. For a conditional GAN
    ``in_channels`` is input + output channels (the discriminator sees the pair)."""
    return PatchDiscriminator(spatial_dims=2, channels=ndf, in_channels=in_channels, out_channels=1,
                              num_layers_d=n_layers, kernel_size=4, norm=norm, bias=False, padding=1)


GENERATORS = {"resnet_9blocks": dict(n_blocks=9), "resnet_6blocks": dict(n_blocks=6),
              "resnet_9blocks_attention": dict(n_blocks=9, attention=True), "unet": {}}


def make_generator(name: str, **kwargs) -> nn.Module:
    """Generator by name (``resnet_9blocks``, ``resnet_6blocks``, ``resnet_9blocks_attention``, ``unet``)."""
    if name not in GENERATORS:
        raise BreastGenError(f"unknown generator {name!r}; choose from {', '.join(GENERATORS)}")
    if name == "unet":
        return UNetGenerator(**kwargs)
    return ResnetGenerator(**{**GENERATORS[name], **kwargs})
