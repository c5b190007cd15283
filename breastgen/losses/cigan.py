"""ciGAN losses: boundary loss with Gaussian rim weights, masked L1, VGG-19 perceptual loss, adversarial terms.

* :func:`boundary_weight_map`: ``w = exp(-d^2 / (2 sigma^2))`` where ``d`` is the Euclidean distance to the mask
  rim (the pixels on either side of the mask's edge), so ``w = 1`` on the rim and decays with ``sigma`` (10 px in
  the paper) inwards and outwards. :class:`BoundaryLoss` is ``weight * mean(w * |G - x|)`` (weight 1000).
* :class:`MaskedL1Loss`: mean ``|G - x|`` over the mask's pixels (the reference code defines it but never
  optimises it; here it is part of the reconstruction loss).
* :class:`PerceptualLoss`: L1 between VGG-19 ``pool1``..``pool3`` features of G and x, evaluated separately on the
  context (outside the mask), the mask and the boundary region (``w``), each region's weights resized to the
  feature map. Needs VGG-19 ImageNet weights from a **local** state-dict file (torchvision layout
  ``features.<i>.weight``; nothing is downloaded). Without a file the term is off, and that is logged.
* :func:`d_adversarial_loss` / :func:`g_adversarial_loss`: the non-saturating GAN loss on logits.

MONAI has no boundary-weighted or region-masked perceptual loss (its ``PerceptualLoss`` downloads weights from
torch.hub), hence this module. The VGG-19 feature layers are defined here in plain torch (no torchvision).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from ..errors import BreastGenError

__all__ = ["mask_rim", "boundary_weight_map", "BoundaryLoss", "MaskedL1Loss", "VGG19Features", "PerceptualLoss",
           "perceptual_weights", "CIGANReconstructionLoss", "d_adversarial_loss", "g_adversarial_loss"]
logger = logging.getLogger(__name__)

# VGG-19 "features" up to pool3, in torchvision's index order so that its state dict loads unchanged
_VGG19_TO_POOL3 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------- boundary
def mask_rim(mask: np.ndarray) -> np.ndarray:
    """Bool rim of a 2D mask: mask pixels with an outside 4-neighbour and outside pixels with a mask 4-neighbour."""
    m = np.asarray(mask) > 0
    inner = m & ~ndimage.binary_erosion(m, border_value=1)
    outer = ndimage.binary_dilation(m) & ~m
    return inner | outer


def _weight_2d(mask: np.ndarray, sigma: float) -> np.ndarray:
    rim = mask_rim(mask)
    if not rim.any():
        return np.zeros(rim.shape, np.float32)
    d = ndimage.distance_transform_edt(~rim)
    return np.exp(-(d ** 2) / (2.0 * sigma ** 2)).astype(np.float32)


def boundary_weight_map(mask: np.ndarray | torch.Tensor, sigma: float = 10.0) -> np.ndarray | torch.Tensor:
    """Gaussian rim weights of a mask: 1 on the rim, ``exp(-d^2 / (2 sigma^2))`` at distance ``d`` from it.

    Accepts a 2D array, or any array/tensor whose last two axes are spatial ((B, 1, W, H) batches); returns the
    same type (a tensor on the input's device). An empty (or full) mask has no rim: all weights 0.
    """
    if sigma <= 0:
        raise BreastGenError(f"boundary sigma must be positive, not {sigma!r}")
    is_tensor = isinstance(mask, torch.Tensor)
    arr = mask.detach().cpu().numpy() if is_tensor else np.asarray(mask)
    flat = arr.reshape(-1, *arr.shape[-2:])
    out = np.stack([_weight_2d(m, sigma) for m in flat]).reshape(arr.shape)
    return torch.from_numpy(out).to(mask.device) if is_tensor else out


class BoundaryLoss(nn.Module):
    """``weight * mean(w * |G - x|)`` with ``w = boundary_weight_map(mask, sigma)`` (paper: 1000, sigma 10)."""

    def __init__(self, weight: float = 1000.0, sigma: float = 10.0):
        super().__init__()
        self.weight, self.sigma = float(weight), float(sigma)

    def forward(self, fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        w = boundary_weight_map(mask, self.sigma) if weights is None else weights
        return self.weight * (w.to(fake.dtype) * (fake - real).abs()).mean()


class MaskedL1Loss(nn.Module):
    """Mean ``|G - x|`` over the pixels inside the mask (per sample, then averaged; empty masks count 0)."""

    def forward(self, fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = (mask > 0.5).to(fake.dtype)
        per_sample = ((fake - real).abs() * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
        return per_sample.mean()


# --------------------------------------------------------------------------------------------- perceptual
class VGG19Features(nn.Module):
    """VGG-19 convolution layers up to pool3 (torchvision's ``features[:19]``), returning pool1, pool2, pool3.

    ``load(path)`` reads a local state dict: torchvision's full VGG-19 (``features.<i>.weight`` ... extra keys such
    as the classifier are ignored) or one saved from this module. Input: grey or RGB in [0, 1]; it is copied to 3
    channels and ImageNet-normalised here. Parameters are frozen.
    """

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG19_TO_POOL3:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def load(self, path: str | os.PathLike) -> "VGG19Features":
        from ..engines.checkpoints import load_state

        state = load_state(path)
        if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
            state = state["model"]
        own = self.state_dict()
        picked = {k: v for k, v in state.items() if k in own}
        missing = sorted(set(own) - set(picked))
        if missing:
            raise BreastGenError(f"not a VGG-19 state dict: {len(missing)} of the {len(own)} tensors up to pool3 are "
                                 f"missing (e.g. {missing[0]}); expected torchvision's 'features.<i>.weight' keys", path)
        bad = [k for k in picked if tuple(picked[k].shape) != tuple(own[k].shape)]
        if bad:
            raise BreastGenError(f"not a VGG-19 state dict: {bad[0]} has shape {tuple(picked[bad[0]].shape)}, "
                                 f"expected {tuple(own[bad[0]].shape)}", path)
        self.load_state_dict(picked)
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.pools:
                out.append(h)
        return out


class PerceptualLoss(nn.Module):
    """Region-weighted VGG-19 pool1..pool3 L1 between G and x on context, mask and boundary regions.

    Args:
        weights_path: local VGG-19 state-dict file; None (or "") switches the term off (logged once).
        weight: overall factor; region_weights: factors for ("context", "mask", "boundary").
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, weight: float = 1.0,
                 region_weights: Sequence[float] = (1.0, 1.0, 1.0), sigma: float = 10.0):
        super().__init__()
        self.weight, self.sigma = float(weight), float(sigma)
        self.region_weights = tuple(float(r) for r in region_weights)
        self.enabled = bool(weights_path)
        self.vgg = VGG19Features().load(weights_path) if self.enabled else None
        if self.enabled:
            logger.info("perceptual loss on: VGG-19 pool1-3 features from %s", weights_path)
        else:
            logger.info("perceptual loss off: no local VGG-19 weights file configured (set 'perceptual_loss' true "
                        "and 'vgg_weights_path')")

    def forward(self, fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor,
                boundary: torch.Tensor | None = None) -> torch.Tensor:
        if not self.enabled:
            return fake.new_zeros(())
        self.vgg.eval()
        m = (mask > 0.5).to(fake.dtype)
        w = boundary_weight_map(mask, self.sigma).to(fake.dtype) if boundary is None else boundary.to(fake.dtype)
        regions = (1.0 - m, m, w)
        total = fake.new_zeros(())
        for f_fake, f_real in zip(self.vgg(fake), self.vgg(real)):
            diff = (f_fake - f_real).abs().mean(dim=1, keepdim=True)
            for rw, region in zip(self.region_weights, regions):
                r = F.interpolate(region, size=diff.shape[-2:], mode="area")
                total = total + rw * (diff * r).flatten(1).sum(1).div(r.flatten(1).sum(1).clamp_min(1e-6)).mean()
        return self.weight * total


def perceptual_weights(enabled: bool, weights_path: str | os.PathLike | None) -> str | os.PathLike | None:
    """The VGG-19 weights file to use: None when the perceptual term is switched off (config ``perceptual_loss``);
    switching it on without a local ``vgg_weights_path`` is a one-line error (nothing is downloaded)."""
    if not enabled:
        return None
    if not weights_path:
        raise BreastGenError("perceptual_loss is on but vgg_weights_path is not set: give a local VGG-19 state-dict "
                             "file (nothing is downloaded) or set perceptual_loss to false")
    if not Path(weights_path).is_file():
        raise BreastGenError("VGG-19 weights file not found (vgg_weights_path)", weights_path)
    return weights_path


class CIGANReconstructionLoss(nn.Module):
    """The generator's reconstruction losses (used alone during warm-up, then with the adversarial terms):
    ``boundary + masked_l1_weight * masked L1 + perceptual``. ``forward`` returns a dict with ``total`` and terms."""

    def __init__(self, boundary_weight: float = 1000.0, sigma: float = 10.0, masked_l1_weight: float = 10.0,
                 perceptual_weight: float = 1.0, vgg_weights_path: str | os.PathLike | None = None):
        super().__init__()
        self.boundary = BoundaryLoss(boundary_weight, sigma)
        self.masked_l1 = MaskedL1Loss()
        self.masked_l1_weight = float(masked_l1_weight)
        self.perceptual = PerceptualLoss(vgg_weights_path, perceptual_weight, sigma=sigma)
        self.sigma = float(sigma)

    def forward(self, fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        w = boundary_weight_map(mask, self.sigma).to(fake.dtype)
        terms = {"boundary": self.boundary(fake, real, mask, weights=w),
                 "masked_l1": self.masked_l1(fake, real, mask)}
        if self.perceptual.enabled:
            terms["perceptual"] = self.perceptual(fake, real, mask, boundary=w)
        terms["total"] = terms["boundary"] + self.masked_l1_weight * terms["masked_l1"] + terms.get(
            "perceptual", fake.new_zeros(()))
        return terms


# --------------------------------------------------------------------------------------------- adversarial
def d_adversarial_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator: ``softplus(-D(x)) + softplus(D(G))`` (binary cross-entropy on logits)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator, non-saturating: ``softplus(-D(G))``."""
    return F.softplus(-fake_logits).mean()
