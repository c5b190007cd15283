"""Diffusion training with several conditionings at once on MONAI's ``SupervisedTrainer``.

MONAI's ``DiffusionPrepareBatch`` hands one ``condition`` to ``DiffusionInferer``, which passes it either as
cross-attention context or concatenated to the input. A model conditioned on a class label *and* a context
(e.g. a pathology label and a mammogram embedding) needs both, so:

* :class:`ConditionalPrepareBatch` -- ``DiffusionPrepareBatch`` that also hands over ``class_labels``
  (``class_key``), ``context`` (``context_key``: cross-attention tokens) and ``concat`` (``concat_key``: channels
  concatenated to the noisy input); the target follows ``prediction_type``.
* :class:`ConditionalDiffusionInferer` -- ``DiffusionInferer``'s training forward with those three.

Sampling uses :func:`breastgen.schedulers.guided_sample`, which takes the same three conditionings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.engines import DiffusionPrepareBatch
from monai.inferers import DiffusionInferer

from ..errors import BreastGenError

__all__ = ["ConditionalPrepareBatch", "ConditionalDiffusionInferer"]


def _plain(x: Any) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class ConditionalPrepareBatch(DiffusionPrepareBatch):
    """Noise, timesteps and target for a batch whose ``image`` is the clean (latent) image, plus the
    conditionings named by ``class_key`` / ``context_key`` / ``concat_key`` (None: not used).

    ``prediction_type``: "epsilon" (target = noise), "v_prediction" (velocity; needs ``scheduler``) or "sample".
    """

    def __init__(self, num_train_timesteps: int, class_key: str | None = None, context_key: str | None = None,
                 concat_key: str | None = None, prediction_type: str = "epsilon", scheduler: Any = None):
        super().__init__(num_train_timesteps, condition_name=None)
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise BreastGenError(f"unknown prediction_type {prediction_type!r}; allowed: epsilon, v_prediction, sample")
        if prediction_type == "v_prediction" and scheduler is None:
            raise BreastGenError("v_prediction training needs the noise scheduler (for the velocity target)")
        self.keys = {"class_labels": class_key, "context": context_key, "concat": concat_key}
        self.prediction_type, self.scheduler = prediction_type, scheduler

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        return images if self.prediction_type == "sample" else noise

    def __call__(self, batchdata: dict, device: Any = None, non_blocking: bool = False, **kwargs: Any):
        images, target, args, infer_kwargs = super().__call__(batchdata, device, non_blocking, **kwargs)
        for name, key in self.keys.items():
            if key is None:
                continue
            if key not in batchdata:
                raise BreastGenError(f"the batch has no {key!r} (the {name} conditioning)")
            value = _plain(batchdata[key]).to(device, non_blocking=non_blocking)
            infer_kwargs[name] = value.long().view(-1) if name == "class_labels" else value.float()
        return images, target, args, infer_kwargs


class ConditionalDiffusionInferer(DiffusionInferer):
    """``DiffusionInferer``'s training forward with ``class_labels`` (class embedding), ``context``
    (cross-attention) and ``concat`` (concatenated to the noisy input along channels), each optional."""

    def __call__(self, inputs: torch.Tensor, diffusion_model: Callable, noise: torch.Tensor, timesteps: torch.Tensor,
                 condition: torch.Tensor | None = None, mode: str = "crossattn", seg: Any = None,
                 class_labels: torch.Tensor | None = None, context: torch.Tensor | None = None,
                 concat: torch.Tensor | None = None) -> torch.Tensor:
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        if concat is not None:
            if concat.shape[2:] != noisy.shape[2:]:
                raise BreastGenError(f"concat conditioning has spatial size {tuple(concat.shape[2:])}, the latent "
                                     f"{tuple(noisy.shape[2:])}")
            noisy = torch.cat([noisy, concat.to(noisy)], dim=1)
        kwargs: dict[str, Any] = {}
        if class_labels is not None:
            kwargs["class_labels"] = class_labels
        if context is not None or condition is not None:
            kwargs["context"] = context if context is not None else condition
        return diffusion_model(noisy, timesteps=timesteps, **kwargs)
