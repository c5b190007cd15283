"""DPM-Solver++ (2M): a fast deterministic sampler with the interface of MONAI's schedulers.

DPM-Solver++ (Lu et al. 2022, https://arxiv.org/abs/2211.01095) integrates the probability-flow ODE of a
variance-preserving diffusion in the log-SNR variable ``lambda = log(alpha / sigma)`` using the model's prediction
of the clean sample ``x0``.  The "2M" variant is a linear multistep method: the second-order correction re-uses
the ``x0`` prediction of the previous step, so every step costs exactly one network evaluation.  20 steps give
samples comparable to 50 DDIM steps.

With ``alpha_t, sigma_t`` the signal and noise scales (``alpha_t**2 = alphas_cumprod[t]``), ``h = lambda_t -
lambda_s`` the log-SNR increment from the current time ``s`` to the next time ``t`` and ``D`` the x0 prediction:

* first order (equivalent to DDIM):   ``x_t = sigma_t/sigma_s * x_s + alpha_t * (1 - exp(-h)) * D_s``
* second order (multistep, midpoint): the same with ``D_s`` replaced by ``D_s + (D_s - D_prev) * h / (2 h_prev)``.

The timestep grid, the float32 arithmetic and the switch to first order on the final steps follow the reference
implementation in ``diffusers`` (``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")``) so that the
results agree with it to float32 round-off; ``tests/test_schedulers.py`` checks this.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.schedulers import Scheduler
from monai.networks.schedulers.ddpm import DDPMPredictionType

from breastgen.errors import BreastGenError

__all__ = ["DPMSolverMultistepScheduler", "TIMESTEP_SPACINGS"]

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


# MONAI (1.6) ships DDPM, DDIM, PNDM and rectified flow but no DPM-Solver, hence this class.
class DPMSolverMultistepScheduler(Scheduler):
    """Multistep DPM-Solver++ of order 1 or 2, usable wherever MONAI's ``DDIMScheduler`` is.

    It plugs into ``DiffusionInferer.sample`` / ``LatentDiffusionInferer.sample``: call
    :meth:`set_timesteps` (which also clears the multistep history), then :meth:`step` once per entry of
    ``timesteps``, in order.  :meth:`add_noise` (training) is inherited from MONAI's ``Scheduler``.

    Args:
        num_train_timesteps: number of diffusion steps the model was trained with.
        schedule: member of MONAI's ``NoiseSchedules`` ("linear_beta", "scaled_linear_beta", ...); its
            arguments (``beta_start``, ``beta_end`` ...) are passed through ``schedule_args``.
        solver_order: 2 for DPM-Solver++ 2M (recommended, also with classifier-free guidance), 1 for the
            first-order solver (equivalent to DDIM with eta=0).
        prediction_type: what the network predicts: "epsilon", "v_prediction" or "sample".
        lower_order_final: with fewer than 15 steps use first order on the last steps (stabler); the very last
            step, which lands on noise level zero, is always first order (it returns the x0 prediction).
        final_sigmas_type: "zero" (default) ends at noise level zero; "sigma_min" ends at the noise level of
            training timestep 0.
        timestep_spacing: "linspace" (default, as in diffusers), "leading" or "trailing"; see Table 2 of
            https://arxiv.org/abs/2305.08891.
        steps_offset: added to the timesteps with "leading" spacing (Stable Diffusion uses 1).
        thresholding: dynamic thresholding of the x0 prediction (Imagen); for pixel-space models only.
        dynamic_thresholding_ratio: percentile of ``|x0|`` used as the threshold.
        sample_max_value: upper bound of the dynamic threshold.
        clip_sample: clamp the x0 prediction to ``[clip_sample_min, clip_sample_max]``.  Unlike in MONAI's DDIM
            this is consistent here, because DPM-Solver++ only uses the (clamped) x0 prediction.
        clip_sample_min: lower clamp bound.
        clip_sample_max: upper clamp bound.
        schedule_args: arguments of the noise schedule function.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        solver_order: int = 2,
        prediction_type: str = DDPMPredictionType.EPSILON,
        lower_order_final: bool = True,
        final_sigmas_type: str = "zero",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        clip_sample: bool = False,
        clip_sample_min: float = -1.0,
        clip_sample_max: float = 1.0,
        **schedule_args,
    ) -> None:
        super().__init__(num_train_timesteps, schedule, **schedule_args)
        checks = {
            "solver_order": (solver_order, (1, 2)),
            "prediction_type": (prediction_type, tuple(DDPMPredictionType.__members__.values())),
            "final_sigmas_type": (final_sigmas_type, ("zero", "sigma_min")),
            "timestep_spacing": (timestep_spacing, TIMESTEP_SPACINGS),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise BreastGenError(f"DPMSolverMultistepScheduler: {name}={value!r} is not one of {list(allowed)}")
        self.solver_order = solver_order
        self.prediction_type = prediction_type
        self.lower_order_final = lower_order_final
        self.final_sigmas_type = final_sigmas_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.thresholding = thresholding
        self.dynamic_thresholding_ratio = dynamic_thresholding_ratio
        self.sample_max_value = sample_max_value
        self.clip_sample = clip_sample
        self.clip_sample_values = (clip_sample_min, clip_sample_max)
        self.init_noise_sigma = 1.0
        # noise-to-signal ratio sigma/alpha of every training timestep (float32, as the reference implementation)
        self._train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.sigmas = torch.zeros(0)  # per inference step, plus the final one; set by set_timesteps
        self._reset_history()

    def _reset_history(self) -> None:
        self._x0_history: list[torch.Tensor] = []  # x0 predictions of the previous steps (newest last)
        self._step_index: int | None = None  # index of the step expected next

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Set the ``num_inference_steps`` descending timesteps used for sampling and reset the multistep state.

        Args:
            num_inference_steps: number of denoising steps (= network evaluations), 1 .. ``num_train_timesteps``.
            device: device of the ``timesteps`` tensor.
        """
        n, big_t = int(num_inference_steps), self.num_train_timesteps
        if not 1 <= n <= big_t:
            raise BreastGenError(f"num_inference_steps must be between 1 and {big_t} (the training steps), got {n}")
        if self.timestep_spacing == "linspace":
            steps = np.linspace(0, big_t - 1, n + 1).round()[::-1][:-1]
        elif self.timestep_spacing == "leading":
            steps = (np.arange(n + 1) * (big_t // (n + 1)))[::-1][:-1] + self.steps_offset
        else:  # trailing
            steps = (big_t - np.arange(n) * (big_t / n)).round() - 1
        timesteps = torch.from_numpy(steps.astype(np.int64))
        if len(torch.unique(timesteps)) != n or timesteps.min() < 0 or timesteps.max() >= big_t:
            raise BreastGenError(
                f"{n} inference steps with timestep_spacing={self.timestep_spacing!r} do not give {n} distinct "
                f"timesteps in [0, {big_t}); use fewer steps"
            )
        last = self._train_sigmas[0:1] if self.final_sigmas_type == "sigma_min" else torch.zeros(1)
        self.sigmas = torch.cat([self._train_sigmas[timesteps], last]).float()
        self.timesteps = timesteps.to(device)
        self.num_inference_steps = n
        self._reset_history()

    def _index_of(self, timestep: int | torch.Tensor) -> int:
        """Position of ``timestep`` in ``timesteps``; jumping anywhere but to the next step restarts the history."""
        t = int(timestep)
        i = self._step_index
        if i is not None and i < len(self.timesteps) and int(self.timesteps[i]) == t:
            return i
        found = (self.timesteps.cpu() == t).nonzero()
        if len(found) == 0:
            raise BreastGenError(f"timestep {t} is not in this scheduler's timesteps; call set_timesteps first")
        self._x0_history = []  # started (or restarted) part-way: previous outputs belong to another trajectory
        return int(found[0])

    def _threshold(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Imagen, https://arxiv.org/abs/2205.11487): per sample, clamp to the
        ``dynamic_thresholding_ratio`` quantile ``s`` of ``|x0|`` (kept in ``[1, sample_max_value]``), divide by s."""
        flat = x0.float().reshape(x0.shape[0], -1)
        s = torch.quantile(flat.abs(), self.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1, max=self.sample_max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)

    @staticmethod
    def _alpha_sigma_lambda(ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Signal scale, noise scale and log-SNR for a noise-to-signal ratio (lambda = +inf at ratio 0)."""
        alpha = 1 / (ratio**2 + 1) ** 0.5
        sigma = ratio * alpha
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One solver step from ``timestep`` to the next entry of ``timesteps``.

        Args:
            model_output: network output at ``(sample, timestep)`` (noise, velocity or sample, see ``prediction_type``).
            timestep: the current entry of ``timesteps``.
            sample: the current noisy sample.
            generator: unused (the solver is deterministic); accepted for interchangeability with DDPM.

        Returns:
            ``(prev_sample, predicted_original_sample)``: the sample at the next (less noisy) timestep and the x0
            prediction used for it.
        """
        if self.num_inference_steps is None or len(self.sigmas) == 0:
            raise BreastGenError("call set_timesteps(num_inference_steps) before step()")
        i = self._index_of(timestep)
        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(self.sigmas[i])
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.sigmas[i + 1])

        # data prediction x0 = D(x_s), whatever the network predicts
        if self.prediction_type == DDPMPredictionType.EPSILON:
            x0 = (sample - sigma_s * model_output) / alpha_s
        elif self.prediction_type == DDPMPredictionType.V_PREDICTION:
            x0 = alpha_s * sample - sigma_s * model_output
        else:
            x0 = model_output
        if self.thresholding:
            x0 = self._threshold(x0)
        if self.clip_sample:
            x0 = x0.clamp(*self.clip_sample_values)

        n = len(self.timesteps)
        last = i == n - 1 and (self.final_sigmas_type == "zero" or (self.lower_order_final and n < 15))
        h = lambda_t - lambda_s
        d = x0
        if self.solver_order == 2 and self._x0_history and not last:
            # second-order multistep correction from the previous x0 prediction (midpoint form)
            lambda_prev = self._alpha_sigma_lambda(self.sigmas[i - 1])[2]
            r = (lambda_s - lambda_prev) / h
            d = x0 + 0.5 * (1.0 / r) * (x0 - self._x0_history[-1])
        prev_sample = (sigma_t / sigma_s) * sample.float() - (alpha_t * (torch.exp(-h) - 1.0)) * d

        self._x0_history = [x0]  # order <= 2: only the newest prediction is needed next time
        self._step_index = i + 1
        return prev_sample.to(model_output.dtype), x0
