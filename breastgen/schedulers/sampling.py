"""The denoising loop shared by all samplers, with classifier-free guidance and negative prompts."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from monai.networks.schedulers import DDPMScheduler, Scheduler

from breastgen.errors import BreastGenError

__all__ = ["guided_sample", "repaint_sample", "check_sampling_request", "seeded_noise"]


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
    check_sampling_request(scheduler, num_inference_steps, guidance_scale)
    step_model = _GuidedStep(model, noise, guidance_scale, context, uncond_context, class_labels,
                             uncond_class_labels, concat)
    scheduler.set_timesteps(int(num_inference_steps), device=noise.device)
    timesteps = scheduler.timesteps
    with step_model:
        x = noise
        for i, t in enumerate(timesteps):
            x, _ = scheduler.step(step_model(x, t), t, x, generator=generator)
            if progress is not None:
                progress(i, len(timesteps))
    return x


def check_sampling_request(scheduler: Scheduler, num_inference_steps: int, guidance_scale: float) -> None:
    """One-line :class:`~breastgen.errors.BreastGenError` unless ``num_inference_steps`` is an integer >= 1 (all
    ``num_train_timesteps`` for MONAI's DDPM) and ``guidance_scale >= 0``; run by :func:`guided_sample` and
    :func:`repaint_sample`, and by pipelines that check a request before any work."""
    try:
        integral = not isinstance(num_inference_steps, bool) and int(num_inference_steps) == num_inference_steps
    except (TypeError, ValueError):
        integral = False
    if not integral:
        raise BreastGenError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise BreastGenError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    if not guidance_scale >= 0:  # also rejects NaN
        raise BreastGenError(f"guidance_scale must be >= 0 (1 = no guidance), got {guidance_scale}")
    if isinstance(scheduler, DDPMScheduler) and num_inference_steps != scheduler.num_train_timesteps:
        # MONAI's DDPM always steps t -> t-1, so skipping timesteps leaves the samples noisy
        raise BreastGenError(
            f"DDPM sampling runs all {scheduler.num_train_timesteps} training steps (num_inference_steps == "
            f"num_train_timesteps), got num_inference_steps={num_inference_steps}; use 'ddim' or 'dpm++2m' for fewer"
        )


def seeded_noise(shape: Sequence[int], seeds: Sequence[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """Initial Gaussian noise ``(len(seeds), *shape)`` on ``device``, one CPU generator per seed: sample k depends on
    ``seeds[k]`` only -- not on its batch, nor on the device."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds]).to(device)


class _GuidedStep:
    """One (guided) model evaluation per call: ``__call__(x, t)`` -> the combined model output. A context manager
    that puts the model in eval mode and restores its previous mode."""

    def __init__(self, model, noise, guidance_scale, context, uncond_context, class_labels, uncond_class_labels,
                 concat):
        batch = noise.shape[0]
        has_uncond = uncond_context is not None or uncond_class_labels is not None
        self.guided = guidance_scale != 1 and has_uncond
        if guidance_scale != 1 and not has_uncond:
            warnings.warn(
                f"guidance_scale={guidance_scale} is ignored: no uncond_context or uncond_class_labels given",
                stacklevel=3,
            )
        if self.guided:
            kwargs = {
                "context": _pair(context, uncond_context, batch, "context"),
                "class_labels": _pair(class_labels, uncond_class_labels, batch, "class_labels"),
            }
            extra = _to_batch(concat, batch, "concat")
            extra = None if extra is None else extra.repeat(2, *([1] * (extra.ndim - 1)))
        else:
            kwargs = {
                "context": _to_batch(context, batch, "context"),
                "class_labels": _to_batch(class_labels, batch, "class_labels"),
            }
            extra = _to_batch(concat, batch, "concat")
        if extra is not None:
            if extra.shape[2:] != noise.shape[2:]:
                raise BreastGenError(
                    f"concat has spatial shape {tuple(extra.shape[2:])}, the noise has {tuple(noise.shape[2:])}"
                )
            extra = extra.to(noise)
        self.model, self.scale, self.extra = model, guidance_scale, extra
        self.kwargs = {k: v for k, v in kwargs.items() if v is not None}
        self.was_training = None

    def __enter__(self):
        self.was_training = getattr(self.model, "training", None)
        if self.was_training is not None:
            self.model.eval()
        return self

    def __exit__(self, *exc):
        if self.was_training is not None:
            self.model.train(self.was_training)

    def __call__(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        x_in = torch.cat([x, x]) if self.guided else x
        if self.extra is not None:
            x_in = torch.cat([x_in, self.extra], dim=1)
        t_batch = torch.full((x_in.shape[0],), int(t), device=x.device, dtype=torch.long)
        out = self.model(x_in, timesteps=t_batch, **self.kwargs)
        if self.guided:
            out_cond, out_uncond = out.chunk(2)
            out = out_uncond + self.scale * (out_cond - out_uncond)
        return out


@torch.no_grad()
def repaint_sample(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    scheduler: Scheduler,
    num_inference_steps: int,
    known: torch.Tensor,
    mask: torch.Tensor,
    *,
    resample: int = 1,
    context: torch.Tensor | None = None,
    uncond_context: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022) with an unconditional-inpainting-free model: after every step the known region
    (``mask == 0``) is replaced by ``known`` noised to the new timestep, so only ``mask == 1`` is generated.

    ``resample > 1`` repeats each step that many times, re-noising the merged sample back by one step in between
    (jump length 1), which harmonises the generated region with its surroundings; it needs a single-step sampler
    ("ddim" or "ddpm") -- a multistep solver's history does not survive going back in time.
    """
    if int(resample) < 1:
        raise BreastGenError(f"resample must be >= 1, got {resample}")
    if int(resample) > 1 and type(scheduler).__name__ not in ("DDIMScheduler", "DDPMScheduler"):
        raise BreastGenError(f"RePaint resampling needs the 'ddim' or 'ddpm' sampler, not {type(scheduler).__name__}")
    if known.shape != noise.shape:
        raise BreastGenError(f"known latent shape {tuple(known.shape)} differs from the noise {tuple(noise.shape)}")
    if mask.shape[0] not in (1, noise.shape[0]) or mask.shape[2:] != noise.shape[2:]:
        raise BreastGenError(f"mask shape {tuple(mask.shape)} does not match the noise {tuple(noise.shape)}")
    check_sampling_request(scheduler, num_inference_steps, guidance_scale)
    step_model = _GuidedStep(model, noise, guidance_scale, context, uncond_context, None, None, None)
    scheduler.set_timesteps(int(num_inference_steps), device=noise.device)
    timesteps = [int(t) for t in scheduler.timesteps]
    m = mask.to(noise)
    known = known.to(noise)
    acp = scheduler.alphas_cumprod.to(noise.device)

    def noised_known(t_prev: int) -> torch.Tensor:
        if t_prev < 0:
            return known
        eps = torch.randn(known.shape, generator=generator, device=known.device, dtype=known.dtype)
        return scheduler.add_noise(known, eps, torch.full((known.shape[0],), t_prev, device=known.device))

    with step_model:
        x = noise
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            for r in range(int(resample)):
                x_prev, _ = scheduler.step(step_model(x, t), t, x, generator=generator)
                x_prev = m * x_prev + (1 - m) * noised_known(t_prev)
                if r + 1 < int(resample) and t_prev >= 0:  # back from t_prev to t: q(x_t | x_t_prev)
                    ratio = acp[t] / acp[t_prev]
                    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                    x = ratio.sqrt() * x_prev + (1 - ratio).sqrt() * eps
                else:
                    x = x_prev
            if progress is not None:
                progress(i, len(timesteps))
    return x
