"""Conditional infilling GAN (ciGAN) networks: a cascaded refinement generator and a class-conditional
discriminator with an auxiliary class head.

Generator (cascaded refinement, as in the seed paper's ciGAN): the inputs -- the corrupted patch (masked
area replaced by noise) and the lesion mask -- are area-downsampled to 4x4, 8x8, ... up to the patch size; the
class one-hot is tiled and concatenated at every scale; each scale concatenates its inputs with the 2x-upsampled
features of the previous scale and applies 2 x (conv 3x3 + ReLU); a 1x1 conv makes the image. Unlike the
reference code (unbounded ReLU output) the output goes through a sigmoid: it always lies in [0, 1], the range
of the patches.

Discriminator: a class-free convolutional trunk over (image, mask); a conditional stream that concatenates the
tiled class one-hot with the trunk features at every level and ends in patch logits (real / fake); and an
auxiliary class head (global pooling + linear) on the class-free trunk, so that it has to recognise the class
from the pixels. The reference code defines the class head but never optimises it; the trainer
(:class:`breastgen.engines.cigan.CIGANTrainer`) trains it on real patches and asks the generator to satisfy it.

MONAI has no cascaded refinement network nor a class-conditional discriminator with an auxiliary head, hence
these modules. Tensors are MONAI channel-first ``(B, C, W, H)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BreastGenError

__all__ = ["CLASSES", "one_hot_classes", "CascadedRefinementGenerator", "ConditionalPatchDiscriminator"]

CLASSES = ("normal", "benign", "malignant")


def one_hot_classes(label: torch.Tensor | Sequence[int] | int, n_classes: int, device=None) -> torch.Tensor:
    """(B,) class indices (or (B, n) one-hot / soft vectors, returned as float) -> (B, n) float one-hot."""
    t = torch.as_tensor(label, device=device)
    if t.ndim == 0:
        t = t[None]
    if t.ndim == 2:
        if t.shape[1] != n_classes:
            raise BreastGenError(f"class vectors have {t.shape[1]} entries, the network has {n_classes} classes")
        return t.float()
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        raise BreastGenError(f"class index out of range 0..{n_classes - 1}: {t.tolist()}")
    return F.one_hot(t, n_classes).float()


def _tile(onehot: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return onehot[:, :, None, None].expand(-1, -1, int(size[0]), int(size[1]))


class CascadedRefinementGenerator(nn.Module):
    """Cascaded refinement generator for class-conditional infilling.

    Args:
        n_classes: number of conditioning classes (normal, benign, malignant).
        widths: feature widths per scale, coarsest first; ``len(widths)`` scales from ``base_size`` doubling up
            to ``base_size * 2 ** (len(widths) - 1)`` = the patch size (paper: 128,128,64,64,32,32,32 -> 256).
        in_channels: input image channels (the mask adds one more).
        base_size: side of the coarsest scale (4).
        norm: None (paper) or "instance" / "batch" after each conv.

    ``forward(corrupted, mask, label)`` -> image in [0, 1] of the input's size.
    """

    def __init__(self, n_classes: int = 3, widths: Sequence[int] = (128, 128, 64, 64, 32, 32, 32),
                 in_channels: int = 1, base_size: int = 4, norm: str | None = None):
        super().__init__()
        if not widths:
            raise BreastGenError("CascadedRefinementGenerator needs at least one width")
        self.n_classes, self.in_channels, self.base_size = int(n_classes), int(in_channels), int(base_size)
        self.widths = [int(w) for w in widths]
        self.out_size = self.base_size * 2 ** (len(self.widths) - 1)
        cond = self.in_channels + 1 + self.n_classes
        blocks, prev = [], 0
        for w in self.widths:
            blocks.append(nn.Sequential(*self._conv(cond + prev, w, norm), *self._conv(w, w, norm)))
            prev = w
        self.blocks = nn.ModuleList(blocks)
        self.to_image = nn.Conv2d(prev, self.in_channels, kernel_size=1)

    @staticmethod
    def _conv(cin: int, cout: int, norm: str | None) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
        if norm == "instance":
            layers.append(nn.InstanceNorm2d(cout, affine=True))
        elif norm == "batch":
            layers.append(nn.BatchNorm2d(cout))
        elif norm is not None:
            raise BreastGenError(f"unknown norm {norm!r}; allowed: None, 'instance', 'batch'")
        layers.append(nn.ReLU(inplace=True))
        return layers

    def forward(self, corrupted: torch.Tensor, mask: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if tuple(corrupted.shape[-2:]) != (self.out_size, self.out_size):
            raise BreastGenError(f"generator input is {tuple(corrupted.shape[-2:])} but the network makes "
                                 f"{self.out_size} x {self.out_size} patches ({len(self.widths)} scales from "
                                 f"{self.base_size}); resize the patch or change 'widths'")
        onehot = one_hot_classes(label, self.n_classes, corrupted.device).to(corrupted.dtype)
        inputs = torch.cat([corrupted, mask.to(corrupted.dtype)], dim=1)
        feats = None
        for i, block in enumerate(self.blocks):
            size = self.base_size * 2 ** i
            x = inputs if size == self.out_size else F.interpolate(inputs, size=(size, size), mode="area")
            parts = [x, _tile(onehot, (size, size))]
            if feats is not None:
                parts.append(F.interpolate(feats, scale_factor=2, mode="bilinear", align_corners=False))
            feats = block(torch.cat(parts, dim=1))
        return torch.sigmoid(self.to_image(feats))  # bounded output (the reference's ReLU is unbounded)


class ConditionalPatchDiscriminator(nn.Module):
    """Class-conditional PatchGAN discriminator with an auxiliary class head.

    Args:
        n_classes: number of classes.
        channels: trunk widths; each level halves the resolution (conv 4x4 stride 2 + LeakyReLU).
        in_channels: image channels (the mask adds one more).
        spectral_norm: spectral normalisation of every conv/linear (stabilises small-data GAN training).

    ``forward(image, mask, label)`` -> ``(adv_logits (B, 1, w, h), class_logits (B, n_classes))``.
    """

    def __init__(self, n_classes: int = 3, channels: Sequence[int] = (64, 128, 256, 256), in_channels: int = 1,
                 spectral_norm: bool = True):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        self.n_classes = int(n_classes)
        trunk, cond = [], []
        prev_t, prev_c = in_channels + 1, 0
        for ch in channels:
            trunk.append(nn.Sequential(sn(nn.Conv2d(prev_t, ch, 4, stride=2, padding=1)), nn.LeakyReLU(0.2, True)))
            cond.append(nn.Sequential(sn(nn.Conv2d(ch + self.n_classes + prev_c, ch, 3, padding=1)),
                                      nn.LeakyReLU(0.2, True)))
            prev_t = prev_c = ch
        self.trunk, self.cond = nn.ModuleList(trunk), nn.ModuleList(cond)
        self.adv_head = sn(nn.Conv2d(prev_c, 1, 3, padding=1))
        self.class_head = sn(nn.Linear(prev_t, self.n_classes))

    def forward(self, image: torch.Tensor, mask: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        onehot = one_hot_classes(label, self.n_classes, image.device).to(image.dtype)
        h = torch.cat([image, mask.to(image.dtype)], dim=1)
        a = None
        for trunk, cond in zip(self.trunk, self.cond):
            h = trunk(h)
            parts = [h, _tile(onehot, h.shape[-2:])]
            if a is not None:
                parts.append(F.avg_pool2d(a, 2))
            a = cond(torch.cat(parts, dim=1))
        return self.adv_head(a), self.class_head(h.mean(dim=(-2, -1)))
