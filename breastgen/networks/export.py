"""TorchScript export for networks that ``torch.jit.script`` cannot compile or that take several inputs.

MONAI's ``DiffusionModelUNet`` (attention blocks) and our ``TextConditionedUNet`` do not script, and MONAI's
``ckpt_export`` traces with one input tensor only. Here the network is wrapped so that its keyword inputs
(``x, timesteps, context``; ``corrupted, mask, label`` ...) become positional, traced with MONAI's
``convert_to_torchscript`` (which checks the traced module against the eager one), and saved atomically with
MONAI's ``save_net_with_metadata`` (metadata and configs inside the ``.ts``, as ``ckpt_export`` does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import BreastGenError
from ..io import atomic_path

__all__ = ["PositionalWrapper", "trace_network", "export_torchscript"]


class PositionalWrapper(nn.Module):
    """``forward(*inputs)`` -> ``net.<method>(**dict(zip(names, inputs)))`` (tracing needs positional tensors)."""

    def __init__(self, net: nn.Module, names: tuple[str, ...] | list[str], method: str | None = None):
        super().__init__()
        self.net, self.names, self.method = net, tuple(names), method

    def forward(self, *inputs: torch.Tensor):
        fn = self.net if self.method is None else getattr(self.net, self.method)
        return fn(**dict(zip(self.names, inputs)))


def trace_network(net: nn.Module, inputs: Mapping[str, torch.Tensor], method: str | None = None,
                  rtol: float = 1e-4, atol: float = 1e-4) -> torch.jit.ScriptModule:
    """Trace ``net`` (called with the keyword ``inputs``, or its ``method``) into a module taking the inputs
    positionally, in the mapping's order; the traced outputs must equal the eager ones within the tolerances."""
    from monai.networks.utils import convert_to_torchscript

    module = PositionalWrapper(net, list(inputs), method).eval()
    try:
        return convert_to_torchscript(module, inputs=list(inputs.values()), use_trace=True, verify=True,
                                      device=torch.device("cpu"), rtol=rtol, atol=atol, check_trace=False)
    except AssertionError as e:  # torch.testing.assert_close's report; its first line says how far apart
        raise BreastGenError(f"the traced network differs from the eager one: {str(e).splitlines()[0]}") from None


def export_torchscript(net: nn.Module, inputs: Mapping[str, torch.Tensor], path: str | os.PathLike,
                       method: str | None = None, meta: Mapping | None = None,
                       extra_files: Mapping[str, str] | None = None, atol: float = 1e-4) -> Path:
    """Trace and verify (:func:`trace_network`), then write ``path`` atomically with ``meta`` as the MONAI
    ``metadata.json`` of the TorchScript file and ``extra_files`` (name -> text) beside it."""
    from monai.data import save_net_with_metadata

    traced = trace_network(net, inputs, method, atol=atol)
    more = {name: text.encode() for name, text in (extra_files or {}).items()}
    more.setdefault("inputs.json", json.dumps(list(inputs)).encode())  # the positional order
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        save_net_with_metadata(traced, f, include_config_vals=True, append_timestamp=False,
                               meta_values=dict(meta or {}), more_extra_files=more)
    return Path(path)
