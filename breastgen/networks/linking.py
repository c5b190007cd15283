"""Networks linking mammograms and histology (the ``mammo2histo_link`` bundle); MONAI has none of these.

All are built from the same two pieces, so the similarity-search autoencoder, the single-input translation
network and the dual-input autoencoder differ only in how they are put together:

* :class:`ConvEncoder`: ``len(channels)`` blocks of conv 3x3 + max-pool 2 + ReLU (the seed's encoder: 5 blocks,
  an image of side S becomes a ``channels[-1]`` x S/32 x S/32 feature map);
* :class:`ConvDecoder`: the mirror, blocks of upsample x2 + conv 3x3 + ReLU and a sigmoid output in [0, 1].

On top of them:

* :class:`ConvAutoencoder` (similarity search): encoder + decoder trained with MSE; :meth:`ConvAutoencoder.embed`
  gives the flattened bottleneck (the vectors of the embedding index), :meth:`ConvAutoencoder.condition` the
  bottleneck as cross-attention tokens or as a feature map (the latent diffusion model's mammogram conditioning).
* :class:`UNet1D`: 5 down blocks (conv1d + BN + ReLU, max-pool) and 5 up blocks (upsample + conv1d + BN + ReLU,
  skip connections) over a 1-channel signal.
* :class:`MammoToHisto` (single-input translation): mammogram encoder -> flattened bottleneck -> :class:`UNet1D`
  -> histology decoder.
* :class:`DualInputAutoencoder`: mammogram and histology encoders in parallel, fused by a dense layer, decoded
  into both images; without a histology input (translation) that branch gets zeros.

Images are channel-first ``(B, C, W, H)``, square, of a side divisible by ``2 ** len(channels)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv, Norm, Pool
from torch import nn

from ..errors import BreastGenError

__all__ = ["ConvEncoder", "ConvDecoder", "ConvAutoencoder", "UNet1D", "MammoToHisto", "DualInputAutoencoder",
           "CONDITION_MODES", "translate"]

CONDITION_MODES = ("crossattn", "concat")


def _check_side(size: int, levels: int, what: str) -> int:
    size = int(size)
    if size < 2 ** levels or size % 2 ** levels:
        raise BreastGenError(f"{what} size {size} must be a multiple of 2^{levels} = {2 ** levels} "
                             f"({levels} pooling blocks)")
    return size


class ConvEncoder(nn.Module):
    """Blocks of conv 3x3 + max-pool 2 + ReLU; ``channels`` gives each block's width (5 blocks in the seed)."""

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128, 256, 256), spatial_dims: int = 2):
        super().__init__()
        if not channels:
            raise BreastGenError("the encoder needs at least one block")
        layers: list[nn.Module] = []
        cin = int(in_channels)
        for c in channels:
            layers += [Conv[Conv.CONV, spatial_dims](cin, int(c), 3, padding=1), Pool[Pool.MAX, spatial_dims](2),
                       nn.ReLU(inplace=True)]
            cin = int(c)
        self.blocks = nn.Sequential(*layers)
        self.in_channels, self.out_channels, self.levels = int(in_channels), cin, len(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ConvDecoder(nn.Module):
    """The mirror of :class:`ConvEncoder` (give the encoder's ``channels``): blocks of nearest upsample x2 +
    conv 3x3 + ReLU from ``channels[-1]`` down to ``channels[0]``, then conv 3x3 to ``out_channels`` and a sigmoid."""

    def __init__(self, out_channels: int = 1, channels: Sequence[int] = (32, 64, 128, 256, 256), spatial_dims: int = 2):
        super().__init__()
        if not channels:
            raise BreastGenError("the decoder needs at least one block")
        widths = [int(c) for c in channels][::-1]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths, widths[1:] + widths[-1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), Conv[Conv.CONV, spatial_dims](cin, cout, 3, padding=1),
                       nn.ReLU(inplace=True)]
        layers += [Conv[Conv.CONV, spatial_dims](widths[-1], int(out_channels), 3, padding=1), nn.Sigmoid()]
        self.blocks = nn.Sequential(*layers)
        self.in_channels, self.out_channels, self.levels = widths[0], int(out_channels), len(widths)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


class ConvAutoencoder(nn.Module):
    """The similarity-search autoencoder: :class:`ConvEncoder` + :class:`ConvDecoder`, trained with MSE.

    Args:
        in_channels: image channels (1 for mammograms).
        channels: encoder widths (the decoder mirrors them).
        image_size: side of the (square) input; fixes the embedding size ``channels[-1] * (image_size / 2^L)^2``.
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128, 256, 256), image_size: int = 256):
        super().__init__()
        self.image_size = _check_side(image_size, len(channels), "autoencoder image")
        self.encoder = ConvEncoder(in_channels, channels)
        self.decoder = ConvDecoder(in_channels, channels)
        self.grid = self.image_size // 2 ** len(channels)

    @property
    def embed_channels(self) -> int:
        return self.encoder.out_channels

    @property
    def embed_dim(self) -> int:
        return self.encoder.out_channels * self.grid ** 2

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.encoder.in_channels or tuple(x.shape[2:]) != (self.image_size,) * 2:
            raise BreastGenError(f"the autoencoder takes ({self.encoder.in_channels}, {self.image_size}, "
                                 f"{self.image_size}) images, got {tuple(x.shape[1:])}")
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self._encode(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) flattened bottleneck: the vectors stored in the embedding index."""
        return self._encode(x).flatten(1)

    def condition(self, x: torch.Tensor, mode: str = "crossattn", size: int | None = None) -> torch.Tensor:
        """The bottleneck as a diffusion conditioning: ``"crossattn"`` -> (B, grid^2 tokens, channels);
        ``"concat"`` -> (B, channels, size, size) feature map (nearest-resized to the latent side ``size``)."""
        z = self._encode(x)
        if mode == "crossattn":
            return z.flatten(2).transpose(1, 2)
        if mode == "concat":
            return z if size is None or z.shape[-1] == int(size) else F.interpolate(z, size=(int(size),) * 2,
                                                                                     mode="nearest")
        raise BreastGenError(f"unknown conditioning mode {mode!r}; allowed: {', '.join(CONDITION_MODES)}")


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(Conv[Conv.CONV, 1](cin, cout, 3, padding=1), Norm[Norm.BATCH, 1](cout), nn.ReLU(inplace=True))


class UNet1D(nn.Module):
    """1D U-Net: ``len(channels)`` down blocks (conv1d + BN + ReLU, then max-pool 2), a conv1d + BN + ReLU
    bottleneck, as many up blocks (upsample x2, concatenate the skip, conv1d + BN + ReLU) and a 1x1 conv output
    (linear). The signal length must be a multiple of ``2 ** len(channels)``."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, channels: Sequence[int] = (16, 32, 64, 128, 256)):
        super().__init__()
        widths = [int(c) for c in channels]
        if not widths:
            raise BreastGenError("the 1D U-Net needs at least one level")
        self.down = nn.ModuleList()
        cin = int(in_channels)
        for c in widths:
            self.down.append(_conv_bn_relu(cin, c))
            cin = c
        self.bottleneck = _conv_bn_relu(widths[-1], widths[-1])
        self.up = nn.ModuleList()
        for i in reversed(range(len(widths))):
            below = widths[-1] if i == len(widths) - 1 else widths[i + 1]
            self.up.append(_conv_bn_relu(below + widths[i], widths[i]))
        self.head = Conv[Conv.CONV, 1](widths[0], int(out_channels), 1)
        self.levels = len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2 ** self.levels:
            raise BreastGenError(f"1D U-Net input length {x.shape[-1]} is not a multiple of 2^{self.levels}")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool1d(x, 2)
        x = self.bottleneck(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = block(torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skip], dim=1))
        return self.head(x)


class _Branch(nn.Module):
    """An encoder (or decoder) with the size of its flattened bottleneck."""

    def __init__(self, channels: Sequence[int], image_size: int, what: str):
        super().__init__()
        self.size = _check_side(image_size, len(channels), what)
        self.grid = self.size // 2 ** len(channels)
        self.width = int(channels[-1])
        self.flat = self.width * self.grid ** 2

    def unflatten(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(v.shape[0], self.width, self.grid, self.grid)


def _check_input(x: torch.Tensor, channels: int, size: int, what: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels or tuple(x.shape[2:]) != (size, size):
        raise BreastGenError(f"the network takes {what} of shape ({channels}, {size}, {size}), got {tuple(x.shape[1:])}")


class MammoToHisto(nn.Module):
    """Single-input translation: mammogram encoder -> flattened bottleneck -> :class:`UNet1D` (-> a linear map when
    the two bottlenecks differ in size) -> histology decoder. ``forward(mammo) -> histology`` in [0, 1]."""

    def __init__(self, mammo_size: int = 256, histo_size: int = 256, mammo_channels: int = 1, histo_channels: int = 3,
                 encoder_channels: Sequence[int] = (32, 64, 128, 256, 256),
                 decoder_channels: Sequence[int] = (32, 64, 128, 256, 256),
                 unet_channels: Sequence[int] = (16, 32, 64, 128, 256)):
        super().__init__()
        self.m = _Branch(encoder_channels, mammo_size, "mammogram")
        self.h = _Branch(decoder_channels, histo_size, "histology")
        self.mammo_channels, self.histo_channels = int(mammo_channels), int(histo_channels)
        self.mammo_encoder = ConvEncoder(mammo_channels, encoder_channels)
        self.unet = UNet1D(1, 1, unet_channels)
        _check_side(self.m.flat, len(unet_channels), "1D U-Net input (flattened mammogram bottleneck)")
        self.project = nn.Identity() if self.m.flat == self.h.flat else nn.Linear(self.m.flat, self.h.flat)
        self.histo_decoder = ConvDecoder(histo_channels, decoder_channels)

    def forward(self, mammo: torch.Tensor) -> torch.Tensor:
        _check_input(mammo, self.mammo_channels, self.m.size, "mammograms")
        v = self.unet(self.mammo_encoder(mammo).flatten(1)[:, None])[:, 0]
        return self.histo_decoder(self.h.unflatten(self.project(v)))


class DualInputAutoencoder(nn.Module):
    """Two parallel encoders (mammogram, histology), fused by a dense layer (+ ReLU) into ``fused_dim`` features,
    decoded into both images. ``forward(mammo, histo=None) -> (mammo_hat, histo_hat)``; a missing histology input
    is zeros (what translation feeds; train with histology-input dropout so that this path is learned)."""

    def __init__(self, mammo_size: int = 256, histo_size: int = 256, mammo_channels: int = 1, histo_channels: int = 3,
                 encoder_channels: Sequence[int] = (32, 64, 128, 256, 256),
                 histo_encoder_channels: Sequence[int] | None = None, fused_dim: int = 512):
        super().__init__()
        histo_encoder_channels = encoder_channels if histo_encoder_channels is None else histo_encoder_channels
        self.m = _Branch(encoder_channels, mammo_size, "mammogram")
        self.h = _Branch(histo_encoder_channels, histo_size, "histology")
        self.mammo_channels, self.histo_channels = int(mammo_channels), int(histo_channels)
        self.mammo_encoder = ConvEncoder(mammo_channels, encoder_channels)
        self.histo_encoder = ConvEncoder(histo_channels, histo_encoder_channels)
        self.fuse = nn.Sequential(nn.Linear(self.m.flat + self.h.flat, int(fused_dim)), nn.ReLU(inplace=True))
        self.to_mammo = nn.Sequential(nn.Linear(int(fused_dim), self.m.flat), nn.ReLU(inplace=True))
        self.to_histo = nn.Sequential(nn.Linear(int(fused_dim), self.h.flat), nn.ReLU(inplace=True))
        self.mammo_decoder = ConvDecoder(mammo_channels, encoder_channels)
        self.histo_decoder = ConvDecoder(histo_channels, histo_encoder_channels)

    def forward(self, mammo: torch.Tensor, histo: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        _check_input(mammo, self.mammo_channels, self.m.size, "mammograms")
        if histo is None:
            histo = mammo.new_zeros((mammo.shape[0], self.histo_channels, self.h.size, self.h.size))
        _check_input(histo, self.histo_channels, self.h.size, "histology")
        f = self.fuse(torch.cat([self.mammo_encoder(mammo).flatten(1), self.histo_encoder(histo).flatten(1)], dim=1))
        return (self.mammo_decoder(self.m.unflatten(self.to_mammo(f))),
                self.histo_decoder(self.h.unflatten(self.to_histo(f))))


@torch.no_grad()
def translate(network: nn.Module, mammo: torch.Tensor) -> torch.Tensor:
    """Histology predicted from mammograms by a :class:`MammoToHisto` or a :class:`DualInputAutoencoder` (with
    no histology input); the network's train/eval mode is restored."""
    was = network.training
    network.eval()
    try:
        out = network(mammo)
    finally:
        network.train(was)
    return out[1] if isinstance(out, tuple) else out
