"""Samplers behind one interface: MONAI's DDPM and DDIM, and our DPM-Solver++ 2M.

All three are MONAI ``Scheduler`` subclasses (``set_timesteps``, ``step -> (prev_sample, x0)``, ``add_noise``,
``timesteps``), so they work with MONAI's inferers and with :func:`guided_sample`.  Bundle configs build them
with :func:`make_scheduler`::

    "scheduler": {"_target_": "breastgen.schedulers.make_scheduler", "name": "dpm++2m"}

Typical step counts: "ddpm" needs every training step, "ddim" ~50, "dpm++2m" ~20.
"""

from __future__ import annotations

import inspect
from typing import Any

from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, NoiseSchedules, Scheduler
from monai.networks.schedulers.ddpm import DDPMPredictionType

from breastgen.errors import BreastGenError

from .dpm_solver import DPMSolverMultistepScheduler
from .sampling import check_sampling_request, guided_sample, repaint_sample, seeded_noise

__all__ = ["SCHEDULERS", "LDM_SCHEDULE", "ALIASES", "make_scheduler", "DPMSolverMultistepScheduler", "guided_sample",
           "repaint_sample", "check_sampling_request", "seeded_noise"]

SCHEDULERS = ("ddpm", "ddim", "dpm++2m")
# the latent-diffusion training schedule (Stable Diffusion's): the default of every latent pipeline
LDM_SCHEDULE = {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.00085,
                "beta_end": 0.012, "prediction_type": "epsilon"}
ALIASES = {"dpmsolver++": "dpm++2m"}
_CLASSES: dict[str, type[Scheduler]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
}


def _parameters(fn: Any) -> set[str]:
    return {
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"
    }


def make_scheduler(
    name: str,
    num_train_timesteps: int = 1000,
    schedule: str = "scaled_linear_beta",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    prediction_type: str = "epsilon",
    **kwargs: Any,
) -> Scheduler:
    """Build a sampler by name: "ddpm", "ddim" or "dpm++2m" (alias "dpmsolver++").

    The defaults are the latent-diffusion schedule (scaled linear betas 0.00085 .. 0.012, epsilon prediction); the
    schedule must be the one the model was trained with.  ``kwargs`` go to the scheduler's constructor (e.g.
    ``timestep_spacing`` or ``solver_order`` for DPM-Solver++, ``variance_type`` for DDPM) or to the noise schedule
    function (e.g. ``s`` for "cosine", which takes no beta range: ``beta_start``/``beta_end`` are then ignored).

    ``clip_sample`` defaults to False for every sampler.  MONAI's own default (True) clamps the x0 prediction of
    DDPM/DDIM to [-1, 1] but keeps the raw noise prediction, which is inconsistent and turns the samples of a
    briefly trained model into noise; pass ``clip_sample=True`` explicitly to get it anyway.

    Raises:
        BreastGenError: unknown sampler, noise schedule, prediction type or option.
    """
    key = ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in _CLASSES:
        allowed = ", ".join(repr(n) for n in (*SCHEDULERS, *ALIASES))
        raise BreastGenError(f"unknown sampler {name!r}; choose one of {allowed}")
    if schedule not in NoiseSchedules.names:
        raise BreastGenError(f"unknown noise schedule {schedule!r}; choose one of {list(NoiseSchedules.names)}")
    if prediction_type not in DDPMPredictionType.__members__.values():
        raise BreastGenError(
            f"unknown prediction_type {prediction_type!r}; choose one of "
            f"{list(DDPMPredictionType.__members__.values())}"
        )
    cls = _CLASSES[key]
    schedule_params = _parameters(NoiseSchedules[schedule]) - {"num_train_timesteps"}
    unknown = set(kwargs) - (_parameters(cls.__init__) | schedule_params)
    if unknown:
        raise BreastGenError(f"sampler {key!r} with schedule {schedule!r} has no option(s) {sorted(unknown)}")
    args: dict[str, Any] = {"clip_sample": False}
    args.update({k: v for k, v in (("beta_start", beta_start), ("beta_end", beta_end)) if k in schedule_params})
    args.update(kwargs)
    return cls(num_train_timesteps=num_train_timesteps, schedule=schedule, prediction_type=prediction_type, **args)
