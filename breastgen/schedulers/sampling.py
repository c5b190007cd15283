"""The denoising loop shared by all samplers, with classifier-free guidance and negative prompts."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from monai.networks.schedulers import DDPMScheduler, Scheduler

from breastgen.errors import BreastGenError

__all__ = ["guided_sample"]


def _to_batch(x: torch.Tensor | None, batch: int, name: str) -> torch.Tensor | None:
    """``x`` with a leading batch dimension of ``batch`` (a batch of 1 is broadcast)."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        raise BreastGenError(f"{name} must be a tensor with a batch dimension, got {type(x).__name__}")
    if x.shape[0] not in (1, batch):
        raise BreastGenError(f"{name} has batch size {x.shape[0]}, expected 1 or {batch} (the noise batch)")
    return x.expand(batch, *x.shape[1:])


def _pair(cond: torch.Tensor | None, uncond: torch.Tensor | None, batch: int, name: str) -> torch.Tensor | None:
    """``cat([cond, uncond])`` for a guided forward; a missing ``uncond`` repeats ``cond``."""
    cond, uncond = _to_batch(cond, batch, name), _to_batch(uncond, batch, f"uncond_{name}")
    if cond is None:
        if uncond is not None:
            raise BreastGenError(f"uncond_{name} was given without {name}")
        return None
    if uncond is None:
        uncond = cond
    elif uncond.shape != cond.shape:
        raise BreastGenError(
            f"uncond_{name} has shape {tuple(uncond.shape[1:])} per sample but {name} has {tuple(cond.shape[1:])}"
        )
    return torch.cat([cond, uncond.to(cond)])


@torch.no_grad()
def guided_sample(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    scheduler: Scheduler,
    num_inference_steps: int,
    *,
    context: torch.Tensor | None = None,
    uncond_context: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    class_labels: torch.Tensor | None = None,
    uncond_class_labels: torch.Tensor | None = None,
    concat: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` into samples with any MONAI-style scheduler, optionally with classifier-free guidance.

    The model is called as ``model(x, timesteps=t, context=..., class_labels=...)`` (MONAI's
    ``DiffusionModelUNet``), passing only the conditioning that is not None, exactly once per step:

    * guidance (``guidance_scale != 1`` and an ``uncond_context`` and/or ``uncond_class_labels``): the conditional and
      unconditional inputs are batched into one forward and combined as ``uncond + s * (cond - uncond)``.  The
      unconditional branch uses ``uncond_context`` (embedding of the empty prompt, or of a negative prompt) and
      ``uncond_class_labels`` (the null class); a conditioning without an unconditional counterpart is shared.
    * otherwise a plain conditional forward (``guidance_scale == 1`` is exactly conditional sampling).

    Args:
        model: the denoising network (put in eval mode for the loop, its previous mode restored afterwards).
        noise: initial Gaussian noise ``(B, C, *spatial)``; its device and dtype are used throughout.
        scheduler: a MONAI ``Scheduler`` (e.g. from :func:`breastgen.schedulers.make_scheduler`); its timesteps
            are (re)set to ``num_inference_steps``.
        num_inference_steps: number of denoising steps (>= 1); MONAI's DDPM needs all ``num_train_timesteps``.
        context: cross-attention conditioning ``(B or 1, tokens, dim)``.
        uncond_context: unconditional / negative-prompt conditioning, same shape per sample as ``context``.
        guidance_scale: classifier-free guidance weight ``s >= 0``; 1 disables guidance, 0 is unconditional.
        class_labels: class conditioning ``(B or 1,)``.
        uncond_class_labels: the null class labels for the unconditional branch.
        concat: tensor concatenated to the model input along channels at every step (inpainting, masks).
        generator: random generator for stochastic schedulers (DDPM).
        progress: called as ``progress(i, total)`` after step ``i`` (0-based) of ``total``.

    Returns:
        The final sample, shaped like ``noise``.
    """
    if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps:
        raise BreastGenError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise BreastGenError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    if not guidance_scale >= 0:  # also rejects NaN
        raise BreastGenError(f"guidance_scale must be >= 0 (1 = no guidance), got {guidance_scale}")
    if isinstance(scheduler, DDPMScheduler) and num_inference_steps != scheduler.num_train_timesteps:
        # MONAI's DDPM always steps t -> t-1, so skipping timesteps leaves the samples noisy
        raise BreastGenError(
            f"DDPM sampling needs num_inference_steps == num_train_timesteps ({scheduler.num_train_timesteps}), "
            f"got {num_inference_steps}; use 'ddim' or 'dpm++2m' for fewer steps"
        )
    batch = noise.shape[0]
    has_uncond = uncond_context is not None or uncond_class_labels is not None
    guided = guidance_scale != 1 and has_uncond
    if guidance_scale != 1 and not has_uncond:
        warnings.warn(
            f"guidance_scale={guidance_scale} is ignored: no uncond_context or uncond_class_labels given", stacklevel=2
        )
    if guided:
        cond_kwargs = {
            "context": _pair(context, uncond_context, batch, "context"),
            "class_labels": _pair(class_labels, uncond_class_labels, batch, "class_labels"),
        }
        extra = _to_batch(concat, batch, "concat")
        extra = None if extra is None else extra.repeat(2, *([1] * (extra.ndim - 1)))
    else:
        cond_kwargs = {
            "context": _to_batch(context, batch, "context"),
            "class_labels": _to_batch(class_labels, batch, "class_labels"),
        }
        extra = _to_batch(concat, batch, "concat")
    cond_kwargs = {k: v for k, v in cond_kwargs.items() if v is not None}
    if extra is not None:
        if extra.shape[2:] != noise.shape[2:]:
            raise BreastGenError(
                f"concat has spatial shape {tuple(extra.shape[2:])}, the noise has {tuple(noise.shape[2:])}"
            )
        extra = extra.to(noise)

    scheduler.set_timesteps(int(num_inference_steps), device=noise.device)
    timesteps = scheduler.timesteps
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    try:
        x = noise
        for i, t in enumerate(timesteps):
            x_in = torch.cat([x, x]) if guided else x
            if extra is not None:
                x_in = torch.cat([x_in, extra], dim=1)
            t_batch = torch.full((x_in.shape[0],), int(t), device=noise.device, dtype=torch.long)
            out = model(x_in, timesteps=t_batch, **cond_kwargs)
            if guided:
                out_cond, out_uncond = out.chunk(2)
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
            x, _ = scheduler.step(out, t, x, generator=generator)
            if progress is not None:
                progress(i, len(timesteps))
    finally:
        if was_training is not None:
            model.train(was_training)
    return x
