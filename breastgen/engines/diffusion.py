"""Text-to-image latent diffusion: sampling pipeline, validation samples during training, inference writer.

Training itself is plain MONAI: ``SupervisedTrainer`` + ``DiffusionPrepareBatch`` + ``DiffusionInferer`` on
latents prepared by ``breastgen.data.conditioning`` (see the ``mammo_ldm_text2image`` bundle).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from ..data.conditioning import LatentScaleFactor, check_prompt, scale_value
from ..errors import BreastGenError
from ..io import atomic_write_json, make_grid, save_png, save_tiff16, to_rows_cols
from ..io.dicom import write_synthetic_dicom
from ..prompts import parse_prompt
from ..schedulers import LDM_SCHEDULE, check_sampling_request, guided_sample, make_scheduler, seeded_noise

__all__ = ["LatentDiffusionPipeline", "DiffusionSampleLogger", "torch_dtype", "in_dtype_of", "check_request", "generate_images", "read_prompts"]
logger = logging.getLogger(__name__)


class LatentDiffusionPipeline:
    """Autoencoder + text-conditioned UNet + tokenizer + latent scale: prompts in, images (B, 1, W, H) in [0, 1] out.

    ``schedule`` holds the training noise schedule (``num_train_timesteps``, ``schedule``, ``beta_start``,
    ``beta_end``, ``prediction_type``); every sampler is built on it, so training and sampling agree.
    """

    def __init__(self, autoencoder: nn.Module, network: nn.Module, tokenizer: Any, scale: LatentScaleFactor | float,
                 latent_shape: Sequence[int], schedule: dict | None = None, device: str | torch.device = "cpu"):
        self.autoencoder, self.network, self.tokenizer = autoencoder, network, tokenizer
        self.scale = scale
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.schedule = {**LDM_SCHEDULE, **(schedule or {})}
        self.device = torch.device(device)

    @property
    def scale_value(self) -> float:
        return scale_value(self.scale)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.network.encode(tokens) if hasattr(self.network, "encode") else tokens

    def scheduler(self, sampler: str):
        return make_scheduler(sampler, **self.schedule)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], negative_prompt: str = "",
               guidance_scale: float = 4.0, num_inference_steps: int = 20, sampler: str = "dpm++2m",
               progress: Any = None) -> torch.Tensor:
        if len(prompts) != len(seeds):
            raise BreastGenError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        noise = self.initial_noise(seeds)
        context = self.encode_prompts(prompts)
        uncond = self.encode_prompts([negative_prompt or ""] * len(prompts))
        z = guided_sample(in_dtype_of(self.network), noise, self.scheduler(sampler), num_inference_steps,
                          context=context,
                          uncond_context=uncond, guidance_scale=guidance_scale,
                          generator=torch.Generator(device=self.device).manual_seed(int(seeds[0])),
                          progress=progress)
        return self.decode(z)

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Gaussian latents, one generator per seed: an image depends on its own seed only, not on its batch."""
        return seeded_noise(self.latent_shape, seeds, self.device)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1] on the CPU."""
        self.autoencoder.eval()
        images = self.autoencoder.decode_stage_2_outputs(z / self.scale_value)
        return images.float().clamp(0.0, 1.0).cpu()


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' / 'bfloat16' / 'float16' -> the torch dtype (a one-line error otherwise)."""
    if isinstance(name, torch.dtype):
        return name
    allowed = ("float32", "bfloat16", "float16")
    if str(name) not in allowed:
        raise BreastGenError(f"unknown dtype {name!r}; allowed: {', '.join(allowed)}")
    return getattr(torch, str(name))


class _InDtype(nn.Module):
    """Calls ``module`` with floating inputs cast to its parameters' dtype and returns float32 outputs, so a network
    kept in bfloat16 (half the memory) runs inside a float32 sampling loop."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.module.encode(tokens)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs = {k: v.to(self.dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
        return self.module(x.to(self.dtype), timesteps, **kwargs).float()


def in_dtype_of(network: nn.Module) -> nn.Module:
    """``network`` itself when its weights are float32, else wrapped to take and return float32 tensors."""
    param = next(network.parameters(), None)
    if param is None or param.dtype == torch.float32:
        return network
    return _InDtype(network, param.dtype)


class DiffusionSampleLogger:
    """Ignite handler: every ``interval`` iterations (and at the end) sample fixed prompts from fixed seeds,
    write ``<output_dir>/val_samples/iter_<n>.png`` and, given a SummaryWriter, a TensorBoard image."""

    def __init__(self, pipeline: LatentDiffusionPipeline, prompts: Sequence[str], output_dir: str | Path,
                 interval: int = 1000, seeds: Sequence[int] | None = None, sampler: str = "dpm++2m",
                 num_inference_steps: int = 20, guidance_scale: float = 4.0, summary_writer: Any = None):
        self.pipeline, self.prompts = pipeline, list(prompts)
        self.seeds = list(seeds) if seeds is not None else list(range(len(self.prompts)))
        self.out = Path(output_dir) / "val_samples"
        self.interval, self.sampler, self.steps, self.guidance = int(interval), sampler, num_inference_steps, guidance_scale
        self.writer = summary_writer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        was_training = self.pipeline.network.training
        images = self.pipeline.sample(self.prompts, self.seeds, guidance_scale=self.guidance,
                                      num_inference_steps=self.steps, sampler=self.sampler)
        self.pipeline.network.train(was_training)
        grid = make_grid(list(images), ncol=min(8, len(images)))
        save_png(grid, self.out / f"iter_{engine.state.iteration:07d}.png")
        if self.writer is not None:
            self.writer.add_image("val_samples", np.transpose(grid, (0, 2, 1)), engine.state.iteration)


def read_prompts(prompts: str | Sequence[str] | None = None, prompt_file: str | Path | None = None) -> list[str]:
    """Prompts from a list/str and/or a text file (one prompt per line, '#' comments)."""
    out = [prompts] if isinstance(prompts, str) else list(prompts or [])
    if prompt_file:
        p = Path(prompt_file)
        if not p.is_file():
            raise BreastGenError("prompt file not found", p)
        out += [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
    if not out:
        raise BreastGenError("no prompt given (set 'prompts' or 'prompt_file')")
    return out


def check_request(pipeline: LatentDiffusionPipeline, prompts: Sequence[str], negative_prompt: str = "",
                  num_samples: int = 1, guidance_scale: float = 4.0, num_inference_steps: int = 20,
                  sampler: str = "dpm++2m", laterality: str = "L", formats: Sequence[str] = ("png", "tiff", "dcm"),
                  prompt_vendors: Sequence[str] | None = None) -> list[str]:
    """Validate a generation request (prompts, guidance, steps, sampler ...) before any work; returns the prompts."""
    prompts = [check_prompt(p, pipeline.tokenizer, prompt_vendors) for p in prompts]
    if negative_prompt and hasattr(pipeline.tokenizer, "unknown_words") and pipeline.tokenizer.unknown_words(negative_prompt):
        logger.warning("negative prompt words outside the model's vocabulary are ignored: %s",
                       ", ".join(pipeline.tokenizer.unknown_words(negative_prompt)))
    check_sampling_request(pipeline.scheduler(sampler), num_inference_steps, guidance_scale)  # + unknown sampler
    if int(num_samples) < 1:
        raise BreastGenError(f"num_samples must be >= 1, got {num_samples}")
    if str(laterality).upper() not in ("L", "R"):
        raise BreastGenError(f"unknown laterality {laterality!r}; allowed: 'L', 'R'")
    bad = set(formats) - {"png", "tiff", "dcm"}
    if bad:
        raise BreastGenError(f"unknown output format(s) {sorted(bad)}; allowed: 'png', 'tiff', 'dcm'")
    return prompts


def generate_images(pipeline: LatentDiffusionPipeline, prompts: Sequence[str], output_dir: str | Path,
                    negative_prompt: str = "", num_samples: int = 1, guidance_scale: float = 4.0,
                    num_inference_steps: int = 20, sampler: str = "dpm++2m", seed: int = 0, laterality: str = "L",
                    batch_size: int = 4, formats: Sequence[str] = ("png", "tiff", "dcm"),
                    prompt_vendors: Sequence[str] | None = None) -> list[dict]:
    """Generate ``num_samples`` images per prompt and write PNG (8-bit), TIFF (16-bit) and synthetic DICOM.

    Everything is validated before anything is written. Image ``k`` of the run uses seed ``seed + k``: the same
    seed gives the identical image. Returns the manifest (also written to ``<output_dir>/generated.json``).
    """
    prompts = check_request(pipeline, prompts, negative_prompt, num_samples, guidance_scale, num_inference_steps,
                            sampler, laterality, formats, prompt_vendors)
    laterality = str(laterality).upper()
    jobs = [(p, seed + k) for k, p in enumerate(p for p in prompts for _ in range(int(num_samples)))]
    out_dir = Path(output_dir)
    manifest = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        t0 = time.perf_counter()
        images = pipeline.sample([p for p, _ in chunk], [s for _, s in chunk], negative_prompt, guidance_scale,
                                 int(num_inference_steps), sampler)
        secs = (time.perf_counter() - t0) / len(chunk)
        for (prompt, s), img in zip(chunk, images):
            if laterality == "R":  # the model draws left breasts (chest wall at x = 0)
                img = torch.flip(img, dims=[1])
            params = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": s, "sampler": sampler,
                      "steps": int(num_inference_steps), "guidance_scale": float(guidance_scale),
                      "laterality": laterality}
            stem = out_dir / f"sample_{s:06d}"
            files = {}
            if "png" in formats:
                files["png"] = str(save_png(img, stem.with_suffix(".png")))
            if "tiff" in formats:
                files["tiff"] = str(save_tiff16(img, stem.with_suffix(".tif"), description=str(params)))
            if "dcm" in formats:
                attrs = parse_prompt(prompt, **({"vendors": prompt_vendors} if prompt_vendors else {}))
                files["dcm"] = str(write_synthetic_dicom(
                    stem.with_suffix(".dcm"), to_rows_cols(img), description="breastgen mammo_ldm_text2image",
                    source_meta={"laterality": laterality, "view": attrs.view, "manufacturer": attrs.vendor,
                                 "modality": "MG"}, params=params))
            manifest.append({**params, "files": files, "seconds_per_image": round(secs, 3)})
    atomic_write_json(out_dir / "generated.json", manifest)
    return manifest
