"""Pyramid L1 loss (PyramidPix2pix): L1 between fake and real at full resolution and at coarser octaves.

Octave k+1 is made from octave k by ``blur_repeats`` Gaussian blurs (``kernel_size`` x ``kernel_size``,
``sigma``; reflect padding) followed by stride-2 subsampling, applied identically to fake and real. Every term
is weighted by ``weight``::

    loss = weight * sum_{k=0..num_octaves} mean |P_k(fake) - P_k(real)|

Defaults are the BCI reference: 3 coarser octaves, 4 blurs of 3x3 / sigma 1, weight 25 (the generator loss is
GAN + this). ``num_octaves=0`` is plain ``weight * L1``. MONAI has the Gaussian kernel and separable filtering
(used here) but no image-pyramid loss, hence this module.
"""

from __future__ import annotations

import torch
from monai.networks.layers import gaussian_1d, separable_filtering
from torch import nn

from ..errors import BreastGenError

__all__ = ["gaussian_pyramid", "PyramidL1Loss"]


def _kernel(kernel_size: int, sigma: float) -> torch.Tensor:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise BreastGenError(f"pyramid blur kernel_size must be odd and positive, not {kernel_size}")
    # sampled Gaussian exp(-x^2 / 2 sigma^2) at x = -r..r, normalised to sum 1
    k = gaussian_1d(torch.tensor(float(sigma)), truncated=(kernel_size // 2) / float(sigma), approx="sampled",
                    normalize=True)
    if k.numel() != kernel_size:  # truncation rounding: fall back to the explicit formula
        x = torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2
        k = torch.exp(-(x**2) / (2 * float(sigma) ** 2))
        k = k / k.sum()
    return k


def gaussian_pyramid(x: torch.Tensor, num_octaves: int = 3, blur_repeats: int = 4, kernel_size: int = 3,
                     sigma: float = 1.0) -> list[torch.Tensor]:
    """``[x, P_1(x), ..., P_num_octaves(x)]`` for a batch ``(B, C, *spatial)``; each step blurs ``blur_repeats``
    times then keeps every second sample along every spatial axis."""
    kernel = _kernel(kernel_size, sigma).to(device=x.device, dtype=x.dtype)
    levels = [x]
    for _ in range(num_octaves):
        y = levels[-1]
        if min(y.shape[2:]) <= kernel_size // 2:
            raise BreastGenError(f"image of spatial size {tuple(x.shape[2:])} is too small for {num_octaves} pyramid "
                                 "octaves; use larger crops or fewer octaves")
        for _ in range(blur_repeats):
            y = separable_filtering(y, [kernel] * (y.ndim - 2), mode="reflect")
        levels.append(y[(Ellipsis, *[slice(None, None, 2)] * (y.ndim - 2))])
    return levels


class PyramidL1Loss(nn.Module):
    """``weight * sum_k L1(P_k(fake), P_k(real))`` over the full resolution and ``num_octaves`` coarser octaves."""

    def __init__(self, num_octaves: int = 3, weight: float = 25.0, blur_repeats: int = 4, kernel_size: int = 3,
                 sigma: float = 1.0):
        super().__init__()
        if num_octaves < 0 or blur_repeats < 0:
            raise BreastGenError("num_octaves and blur_repeats must be non-negative")
        self.num_octaves, self.weight, self.blur_repeats = int(num_octaves), float(weight), int(blur_repeats)
        self.kernel_size, self.sigma = int(kernel_size), float(sigma)
        _kernel(self.kernel_size, self.sigma)  # validate early

    def terms(self, fake: torch.Tensor, real: torch.Tensor) -> list[torch.Tensor]:
        """Unweighted mean-L1 of every level (full resolution first)."""
        if fake.shape != real.shape:
            raise BreastGenError(f"fake {tuple(fake.shape)} and real {tuple(real.shape)} differ in shape")
        args = (self.num_octaves, self.blur_repeats, self.kernel_size, self.sigma)
        # blurring is linear: the pyramid of (fake - real) is the difference of the pyramids
        return [level.abs().mean() for level in gaussian_pyramid(fake - real, *args)]

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.stack(self.terms(fake, real)).sum()

    def extra_repr(self) -> str:
        return (f"num_octaves={self.num_octaves}, weight={self.weight}, blur_repeats={self.blur_repeats}, "
                f"kernel_size={self.kernel_size}, sigma={self.sigma}")
