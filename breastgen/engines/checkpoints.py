"""Checkpoints: resume training from the newest checkpoint, load weights for inference with clear errors.

Everything loads with ``torch.load(..., weights_only=True)``; MONAI's ``CheckpointSaver`` writes through
Ignite's ``DiskSaver``, which writes atomically (temporary file + rename).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from ..errors import BreastGenError

__all__ = ["latest_checkpoint", "TrainerProgress", "ResumeFromLatest", "load_checkpoint", "load_state"]
logger = logging.getLogger(__name__)


def _order(p: Path) -> tuple[int, float]:
    nums = re.findall(r"\d+", p.stem)
    return (int(nums[-1]) if nums else -1, p.stat().st_mtime)


def latest_checkpoint(ckpt_dir: str | Path, pattern: str = "*checkpoint*.pt") -> Path | None:
    """The checkpoint in ``ckpt_dir`` with the highest epoch/iteration number in its name (newest on ties)."""
    files = [p for p in Path(ckpt_dir).glob(pattern) if p.is_file()] if Path(ckpt_dir).is_dir() else []
    return max(files, key=_order) if files else None


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:200]}"


class TrainerProgress:
    """The resumable part of an Ignite engine's state (epoch, iteration), for ``CheckpointSaver`` save dicts.

    MONAI's trainers put their networks, optimizers and losses into ``engine.state_dict()``, which then pickles
    whole objects that ``torch.load(weights_only=True)`` rightly refuses; this keeps the counters only.
    """

    def __init__(self, engine: Engine):
        self.engine = engine

    def state_dict(self) -> dict:
        s = self.engine.state
        return {"epoch": int(s.epoch), "iteration": int(s.iteration), "epoch_length": s.epoch_length}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        s = self.engine.state
        s.epoch, s.iteration = int(state["epoch"]), int(state["iteration"])
        if state.get("epoch_length"):
            s.epoch_length = int(state["epoch_length"])


class ResumeFromLatest:
    """Ignite handler: at the start of training, load the newest checkpoint of ``ckpt_dir`` (if any) into
    ``load_dict`` (network, optimizer, trainer ...), so that re-running a training config continues it."""

    def __init__(self, ckpt_dir: str | Path, load_dict: Mapping[str, Any], pattern: str = "*checkpoint*.pt",
                 map_location: Any = "cpu", enabled: bool = True):
        self.ckpt_dir, self.load_dict, self.pattern = Path(ckpt_dir), dict(load_dict), pattern
        self.map_location, self.enabled = map_location, enabled

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        path = latest_checkpoint(self.ckpt_dir, self.pattern) if self.enabled else None
        if path is None:
            return
        try:
            CheckpointLoader(load_path=str(path), load_dict=self.load_dict, map_location=self.map_location)(engine)
        except Exception as e:  # noqa: BLE001 - a half-written or foreign file is a user-facing problem
            raise BreastGenError(f"cannot resume from checkpoint ({_short(e)}); delete it to start afresh",
                                 path) from None
        logger.info("resumed from %s at epoch %d, iteration %d", path, engine.state.epoch, engine.state.iteration)


def load_state(path: str | Path, map_location: Any = "cpu") -> dict:
    """``torch.load(path, weights_only=True, mmap=True)`` with one-line errors for a missing or unreadable file.
    Memory-mapped: ``load_state_dict`` copies the weights straight from the file instead of from a second copy
    in memory (a legacy non-zip file is read the ordinary way)."""
    path = Path(path)
    if not path.is_file():
        raise BreastGenError("checkpoint not found (train the bundle first, or set ckpt_path / pretrained_path)", path)
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise BreastGenError(f"cannot read checkpoint ({_short(e)})", path) from None


def load_checkpoint(path: str | Path, modules: Mapping[str, torch.nn.Module] | torch.nn.Module,
                    map_location: Any = "cpu", strict: bool = True) -> dict:
    """Load weights into one module (a plain state dict file, or a dict with key ``model``) or into several
    modules by key (``{"autoencoder": ae, "unet": unet}``). Returns the loaded dict."""
    state = load_state(path, map_location)
    if isinstance(modules, torch.nn.Module):
        modules = {"model": modules}
    if len(modules) == 1 and next(iter(modules)) not in state and all(torch.is_tensor(v) for v in state.values()):
        state = {next(iter(modules)): state}  # a bare state dict (what a one-object CheckpointSaver writes)
    for key, module in modules.items():
        if key not in state:
            have = ", ".join(map(str, list(state)[:6])) + (", ..." if len(state) > 6 else "")
            raise BreastGenError(f"checkpoint has no {key!r} entry (it has: {have})", path)
        try:
            module.load_state_dict(state[key], strict=strict)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise BreastGenError(f"checkpoint {key!r} does not fit the configured network ({first}); "
                                 "check the network settings", path) from None
    return state
