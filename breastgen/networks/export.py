"""TorchScript export for networks that ``torch.jit.script`` cannot compile.

MONAI's ``DiffusionModelUNet`` (attention blocks) and our ``TextConditionedUNet`` do not script, so they are
traced through a wrapper with positional inputs ``(x, timesteps[, context])``; the traced module is checked
against the eager one before it is written (atomically).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import BreastGenError
from ..io import atomic_path

__all__ = ["PositionalDiffusionWrapper", "export_torchscript"]


class PositionalDiffusionWrapper(nn.Module):
    """``forward(x, timesteps, context)`` -> ``net(x, timesteps=timesteps, context=context)`` (tracing needs
    positional tensors)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, timesteps=timesteps, context=context)


def export_torchscript(net: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike,
                       atol: float = 1e-4) -> Path:
    """Trace ``net`` (wrapped for diffusion signatures) on ``example_inputs``, verify, save to ``path``."""
    module = PositionalDiffusionWrapper(net).eval()
    with torch.no_grad():
        expected = module(*example_inputs)
        traced = torch.jit.trace(module, tuple(example_inputs), check_trace=False)
        got = traced(*example_inputs)
    err = float((got - expected).abs().max())
    if err > atol:
        raise BreastGenError(f"traced network differs from the eager one by {err:.2e} (> {atol})")
    with atomic_path(path) as tmp:
        torch.jit.save(traced, str(tmp))
    return Path(path)
