"""Exponential moving average (EMA) of a network's weights, as an Ignite handler.

Diffusion models are sampled with averaged weights (DDPM, lucidrains' trainers, Stable Diffusion): the average of
the last few thousand optimizer steps gives visibly cleaner samples than the last step. Usage in a bundle config::

    "ema": {"_target_": "breastgen.engines.ema.EMA", "network": "@network", "decay": 0.9999},  # DDP is unwrapped
    "train_handlers": ["@ema", ...],                    # attached in "initialize" like every handler
    "checkpoint_objects": {"network": "@network_def", "ema": "@ema", ...},         # resumable (keeps the counter)
    final CheckpointSaver: {"network": "@network_def", "ema": "$@ema.module"}   # plain state dicts

``ema.module`` is the averaged copy (eval mode, no gradients): sample with it directly, or save it -- its state dict
loads into a fresh network (``load_checkpoint(path, {"ema": network})``). :meth:`EMA.swapped` puts the averaged
weights into the live network for a moment (sampling during training) and restores the trained ones afterwards.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from ..errors import BreastGenError

__all__ = ["EMA", "unwrap"]

_COUNTER = "_ema_num_updates"


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers (the network itself otherwise)."""
    while isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        network = network.module
    return network


class EMA:
    """EMA of ``network``'s parameters (buffers are copied), updated after every ``update_every`` iterations.

    Args:
        network: the trained module (a DDP wrapper is unwrapped).
        decay: the EMA decay ``d`` (shadow = d * shadow + (1 - d) * weights).
        warmup: ramp the decay as ``min(decay, (1 + n) / (10 + n))`` over the ``n`` updates done so far, so that a
            short run is not dominated by the random initial weights.
        update_every: update after every this many iterations.
        start_iteration: no update before this iteration (the shadow follows the weights exactly until then).
    """

    def __init__(self, network: nn.Module, decay: float = 0.9999, warmup: bool = True, update_every: int = 1,
                 start_iteration: int = 0):
        if not 0.0 <= float(decay) < 1.0:
            raise BreastGenError(f"EMA decay must be in [0, 1), got {decay}")
        if int(update_every) < 1:
            raise BreastGenError(f"EMA update_every must be >= 1, got {update_every}")
        self.network = unwrap(network)
        self.decay, self.warmup = float(decay), bool(warmup)
        self.update_every, self.start_iteration = int(update_every), int(start_iteration)
        self.module = copy.deepcopy(self.network).eval().requires_grad_(False)
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def _follow_device(self) -> None:
        """Keep the copy on the network's device (the network may be moved after the EMA was built)."""
        p = next(self.network.parameters(), None)
        q = next(self.module.parameters(), None)
        if p is not None and q is not None and p.device != q.device:
            self.module.to(p.device)

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the network's current weights."""
        self._follow_device()
        d = self.current_decay()
        for avg, p in zip(self.module.parameters(), self.network.parameters()):
            if avg.shape != p.shape:
                raise BreastGenError("EMA copy and network differ in shape: was the network replaced after the EMA "
                                     "was built?")
            avg.lerp_(p.detach().to(avg.device, avg.dtype), 1.0 - d)
        for avg, b in zip(self.module.buffers(), self.network.buffers()):
            avg.copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Make the average equal to the current weights (and restart the warm-up)."""
        self.module.load_state_dict(self.network.state_dict())
        self.num_updates = 0

    # ------------------------------------------------------------------ Ignite
    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.update_every), self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration < self.start_iteration:
            self.reset()
        else:
            self.update()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The averaged weights plus the update counter (so that a resumed run continues the warm-up)."""
        state = dict(self.module.state_dict())
        state[_COUNTER] = torch.tensor(self.num_updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        state = dict(state)
        counter = state.pop(_COUNTER, None)
        self.module.load_state_dict(state, strict=strict)
        self.num_updates = int(counter) if counter is not None else 0

    # ------------------------------------------------------------------ swap-in
    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> nn.Module:
        """Load the averaged weights into ``module`` (e.g. the network, before a final save or export)."""
        unwrap(module).load_state_dict(self.module.state_dict())
        return module

    @contextlib.contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """``with ema.swapped() as net:`` -- the live network holds the averaged weights inside the block (and is in
        eval mode); its trained weights and mode come back afterwards, also on error."""
        backup = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        was_training = self.network.training
        try:
            with torch.no_grad():
                self.network.load_state_dict(self.module.state_dict())
            self.network.eval()
            yield self.network
        finally:
            with torch.no_grad():
                self.network.load_state_dict(backup)
            self.network.train(was_training)
