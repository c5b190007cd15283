"""Class- and mask-conditioned pixel-space DDPM for H&E tiles (the ``histo_ddpm_atypia`` bundle).

Training stays plain MONAI -- ``SupervisedTrainer`` + ``breastgen.engines.conditional.ConditionalPrepareBatch`` /
``ConditionalDiffusionInferer`` (class labels to ``DiffusionModelUNet(num_class_embeds=...)``, the one-hot mask
concatenated to the noisy image) + EMA of the weights (``breastgen.engines.ema.EMA``). This module holds the rest:
:class:`PerClassNetwork` (one model per class), :class:`TilePipeline` (sampling through
``breastgen.schedulers.guided_sample``: classifier-free guidance against the null class, mask concatenated at every
step), :class:`TileSampleLogger`, :func:`generate_tiles` and :func:`evaluate` (FID with ``breastgen.metrics``, nucleus
areas and mask IoU / Dice with ``breastgen.data.nuclei``).

Images in the networks are RGB in [-1, 1]; everything this module returns or writes is [0, 1] / uint8 PNG.
Arrays follow MONAI's (C, W, H) layout.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from ..data.nuclei import NucleiSegmenter, load_masks, mask_agreement, mask_preview, nucleus_areas
from ..errors import BreastGenError
from ..io import atomic_write_json, make_grid, save_png
from ..metrics.fid import InceptionFeatures, frechet_distance
from ..schedulers import check_sampling_request, guided_sample, make_scheduler, seeded_noise
from .checkpoints import load_checkpoint
from .perf import Stopwatch

__all__ = ["PerClassNetwork", "TilePipeline", "TileSampleLogger", "MODES", "load_weights", "check_sampling",
           "check_modes", "generate_tiles", "evaluate"]
logger = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------------- models
class PerClassNetwork(nn.Module):
    """One unconditional network per class behind the class-conditional interface (the seed's setup: one DDPM per
    atypia class): ``forward(x, timesteps, class_labels)`` runs each sample through its class's network."""

    def __init__(self, networks: Sequence[nn.Module]):
        super().__init__()
        self.networks = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        if class_labels is None:
            raise BreastGenError("per-class models need a class label for every sample")
        labels = torch.as_tensor(class_labels, device=x.device).long().view(-1)
        if int(labels.min()) < 0 or int(labels.max()) >= len(self.networks):
            raise BreastGenError(f"class label outside 0..{len(self.networks) - 1} for per-class models")
        out = None
        for c in labels.unique().tolist():
            idx = (labels == c).nonzero().view(-1)
            y = self.networks[c](x[idx], timesteps=timesteps[idx])
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[idx] = y
        return out


def load_weights(network: nn.Module, checkpoints: str | Path | Sequence[str | Path], use_ema: bool = True,
                 device: Any = "cpu") -> nn.Module:
    """Load the EMA (or raw, ``use_ema=False``) weights of the final checkpoint(s) into ``network``; a
    :class:`PerClassNetwork` takes one checkpoint per class. Returns the network in eval mode."""
    key = "ema" if use_ema else "network"
    if isinstance(network, PerClassNetwork):
        paths = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
        if len(paths) != len(network.networks):
            raise BreastGenError(f"{len(network.networks)} per-class networks but {len(paths)} checkpoints")
        for net, path in zip(network.networks, paths):
            load_checkpoint(path, {key: net}, map_location=device)
    else:
        load_checkpoint(checkpoints, {key: network}, map_location=device)
    return network.to(device).eval()


# -------------------------------------------------------------------------------------------------- sampling
class TilePipeline:
    """Network + noise schedule -> RGB tiles (B, 3, S, S) in [0, 1].

    Args:
        network: ``DiffusionModelUNet`` (class-conditional when ``num_classes`` is set; mask-guided when
            ``mask_channels > 0``: its input is the noisy image plus the one-hot mask) or :class:`PerClassNetwork`.
        image_size: tile size S.
        schedule: the training noise schedule (``num_train_timesteps``, ``schedule``, ``beta_start``, ``beta_end``,
            ``prediction_type``) -- samplers are built on it.
        num_classes: number of classes the network takes (None: no class input).
        null_class: label of the unconditional branch for classifier-free guidance (None: no guidance, e.g.
            per-class models).
        mask_channels: one-hot mask channels concatenated to the input (0: no mask).
    """

    def __init__(self, network: nn.Module, image_size: int, schedule: Mapping[str, Any], num_classes: int | None = None,
                 null_class: int | None = None, mask_channels: int = 0, device: Any = "cpu"):
        self.network, self.image_size = network, int(image_size)
        self.schedule = dict(schedule)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.null_class = null_class
        self.mask_channels = int(mask_channels)
        self.device = torch.device(device)

    @property
    def class_conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def mask_guided(self) -> bool:
        return self.mask_channels > 0

    def scheduler(self, sampler: str):
        return make_scheduler(sampler, **self.schedule)

    def check(self, labels: Sequence[int] | None = None, masks: torch.Tensor | None = None, n: int | None = None,
              sampler: str = "ddim", steps: int = 50, guidance_scale: float = 1.0) -> None:
        """Every problem with a request, before any work."""
        check_sampling(self, sampler, steps, guidance_scale)
        if self.class_conditional:
            if labels is None:
                raise BreastGenError("this model is class-conditional: give a class label per tile")
            bad = [c for c in labels if isinstance(c, bool) or not isinstance(c, (int, np.integer))
                   or not 0 <= int(c) < self.num_classes]
            if bad:
                raise BreastGenError(f"unknown class(es) {bad}; the model has classes 0..{self.num_classes - 1}")
        if self.mask_guided:
            if masks is None:
                raise BreastGenError("this model is mask-guided: give one mask per tile")
            if masks.ndim != 4 or masks.shape[1] != self.mask_channels or \
                    tuple(masks.shape[2:]) != (self.image_size, self.image_size):
                raise BreastGenError(f"masks must be one-hot ({self.mask_channels}, {self.image_size}, "
                                     f"{self.image_size}) per tile, got {tuple(masks.shape[1:])}")
        if n is not None and labels is not None and self.class_conditional and len(labels) != n:
            raise BreastGenError(f"{len(labels)} class labels for {n} tiles")
        if n is not None and masks is not None and self.mask_guided and len(masks) != n:
            raise BreastGenError(f"{len(masks)} masks for {n} tiles")

    @torch.no_grad()
    def sample(self, seeds: Sequence[int], labels: Sequence[int] | None = None, masks: torch.Tensor | None = None,
               sampler: str = "ddim", steps: int = 50, guidance_scale: float = 1.0,
               progress: Any = None) -> torch.Tensor:
        """Tiles for ``seeds`` (tile k depends on seed k only, not on the batch -- except DDPM's per-step noise)."""
        self.check(labels, masks, len(seeds), sampler, steps, guidance_scale)
        s = self.image_size
        noise = seeded_noise((3, s, s), seeds, self.device)
        kwargs: dict[str, Any] = {}
        if self.class_conditional:
            kwargs["class_labels"] = torch.as_tensor([int(c) for c in labels], dtype=torch.long, device=self.device)
            if self.null_class is not None and guidance_scale != 1:
                kwargs["uncond_class_labels"] = torch.full((len(seeds),), int(self.null_class), dtype=torch.long,
                                                           device=self.device)
                kwargs["guidance_scale"] = float(guidance_scale)
        if self.mask_guided:
            kwargs["concat"] = masks.float().to(self.device)
        x = guided_sample(self.network, noise, self.scheduler(sampler), int(steps),
                          generator=torch.Generator(device=self.device).manual_seed(int(seeds[0])), progress=progress,
                          **kwargs)
        return ((x.float().clamp(-1.0, 1.0) + 1.0) / 2.0).cpu()


MODES = ("classcond", "maskguided")


def check_modes(modes: Sequence[str]) -> list[str]:
    """The requested generation modes ("classcond", "maskguided"), checked."""
    modes = [modes] if isinstance(modes, str) else list(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise BreastGenError(f"unknown generation mode(s) {bad or modes}; allowed: {', '.join(MODES)}")
    return modes


def check_sampling(pipeline: TilePipeline, sampler: str, steps: int, guidance_scale: float) -> None:
    """An unknown sampler and what :func:`breastgen.schedulers.check_sampling_request` refuses (a step count that
    is not an integer >= 1, or not all training steps for DDPM; a negative guidance scale) are one-line errors,
    raised before any tile is sampled."""
    check_sampling_request(pipeline.scheduler(sampler), steps, guidance_scale)  # unknown sampler / schedule -> error


class TileSampleLogger:
    """Ignite handler: every ``interval`` iterations and at the end, sample fixed tiles with the pipeline (built on
    the EMA weights) and write ``<output_dir>/val_samples/<name>_iter_<n>.png`` (with the masks underneath)."""

    def __init__(self, pipeline: TilePipeline, output_dir: str | Path, name: str, interval: int = 1000,
                 labels: Sequence[int] | None = None, masks: torch.Tensor | None = None, num_samples: int = 6,
                 sampler: str = "ddim", steps: int = 50, guidance_scale: float = 1.0):
        self.pipeline, self.out, self.name = pipeline, Path(output_dir) / "val_samples", name
        self.interval, self.labels, self.masks = int(interval), labels, masks
        self.sampler, self.steps, self.guidance = sampler, int(steps), float(guidance_scale)
        n = len(masks) if masks is not None else len(labels) if labels is not None else int(num_samples)
        if n < 1:
            raise BreastGenError("TileSampleLogger needs at least one tile to sample")
        self.seeds = list(range(n))
        pipeline.check(labels, masks, n, sampler, steps, guidance_scale)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval) | Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        tiles = self.pipeline.sample(self.seeds, self.labels, self.masks, self.sampler, self.steps, self.guidance)
        rows = list(tiles)
        if self.masks is not None:
            rows += [mask_preview(m) for m in self.masks]
        save_png(make_grid(rows, ncol=len(tiles)), self.out / f"{self.name}_iter_{engine.state.iteration:07d}.png")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_").lower() or "class"


# -------------------------------------------------------------------------------------------------- inference
def generate_tiles(output_dir: str | Path, classcond: TilePipeline | None = None,
                   maskguided: TilePipeline | None = None, classes: Sequence[int] = (), num_samples: int = 1,
                   mask_paths: Sequence[str | Path] = (), mask_labels: Sequence[int | None] | None = None,
                   mask_values: Sequence[int] = (0, 255), class_names: Sequence[str] | None = None, seed: int = 0,
                   sampler: str = "ddim", num_inference_steps: int = 50, guidance_scale: float = 2.0,
                   batch_size: int = 16) -> list[dict]:
    """Class -> tiles (``num_samples`` per class with the class-conditional model) and/or mask -> tiles (one per
    mask with the mask-guided model), written as PNG under ``output_dir/classcond`` and ``output_dir/maskguided``
    with ``output_dir/manifest.json``. Everything is checked before any tile is made; tile k of the run uses seed
    ``seed + k``."""
    jobs: list[dict] = []
    names = list(class_names) if class_names else None
    if classes:
        if classcond is None:
            raise BreastGenError("class-conditional tiles were requested but no class-conditional model is loaded")
        if int(num_samples) < 1:
            raise BreastGenError(f"num_samples must be >= 1, got {num_samples}")
        classcond.check(list(classes), None, len(classes), sampler, num_inference_steps, guidance_scale)
        jobs += [{"mode": "classcond", "class": int(c)} for c in classes for _ in range(int(num_samples))]
    masks = None
    if mask_paths:
        if maskguided is None:
            raise BreastGenError("mask-guided tiles were requested but no mask-guided model is loaded")
        masks = load_masks(mask_paths, mask_values, maskguided.image_size)
        labels = list(mask_labels) if mask_labels is not None else [None] * len(mask_paths)
        if len(labels) != len(mask_paths):
            raise BreastGenError(f"{len(labels)} mask labels for {len(mask_paths)} masks")
        if maskguided.class_conditional and any(lab is None for lab in labels):
            raise BreastGenError("this mask-guided model also takes a class label: give one per mask (mask_labels)")
        maskguided.check(labels if maskguided.class_conditional else None, masks, len(mask_paths), sampler,
                         num_inference_steps, guidance_scale)
        jobs += [{"mode": "maskguided", "class": lab, "mask": str(p), "mask_index": i}
                 for i, (p, lab) in enumerate(zip(mask_paths, labels))]
    if not jobs:
        raise BreastGenError("nothing to generate: give classes and/or masks")
    out = Path(output_dir)
    for k, job in enumerate(jobs):
        job["seed"] = int(seed) + k
    manifest = []
    shown: dict[str, list[torch.Tensor]] = {"classcond": [], "maskguided": []}  # the first 32 tiles of each mode
    for mode, pipe in (("classcond", classcond), ("maskguided", maskguided)):
        todo = [j for j in jobs if j["mode"] == mode]
        for start in range(0, len(todo), int(batch_size)):
            chunk = todo[start:start + int(batch_size)]
            m = masks[[j["mask_index"] for j in chunk]] if mode == "maskguided" else None
            labels = [j["class"] for j in chunk] if pipe.class_conditional else None
            with Stopwatch() as sw:
                tiles = pipe.sample([j["seed"] for j in chunk], labels, m, sampler, num_inference_steps,
                                    guidance_scale)
            secs = sw.wall / len(chunk)
            for i, (job, tile) in enumerate(zip(chunk, tiles)):
                c = job["class"]
                rec = {"mode": mode, "class": c, "class_name": names[c] if names and c is not None else None,
                       "seed": job["seed"], "sampler": sampler, "steps": int(num_inference_steps),
                       "guidance_scale": float(guidance_scale) if pipe.class_conditional and pipe.null_class is not None
                       else 1.0, "seconds_per_tile": round(secs, 4)}
                if mode == "classcond":
                    rec["file"] = str(save_png(tile, out / mode / f"c{c}_{_slug(rec['class_name'] or c)}_"
                                                              f"s{job['seed']:06d}.png"))
                else:
                    stem = f"{Path(job['mask']).stem}_s{job['seed']:06d}"
                    rec["file"] = str(save_png(tile, out / mode / f"{stem}.png"))
                    rec["mask"] = job["mask"]
                    rec["mask_used"] = str(save_png(mask_preview(m[i])[0], out / mode / f"{stem}_mask.png"))
                manifest.append(rec)
                if len(shown[mode]) < 32:
                    shown[mode].append(tile)
    for mode, imgs in shown.items():
        if imgs:
            save_png(make_grid(imgs, ncol=min(8, len(imgs))), out / f"{mode}_grid.png")
    atomic_write_json(out / "manifest.json", manifest)
    logger.info("wrote %d tiles and %s", len(manifest), out / "manifest.json")
    return manifest


# -------------------------------------------------------------------------------------------------- evaluation
def _segment_all(segmenter: Callable, tiles: torch.Tensor) -> list[np.ndarray]:
    return [segmenter(t.numpy()) for t in tiles]


def evaluate(output_dir: str | Path, reference: Sequence[Mapping], mask_reference: Sequence[Mapping] | None = None,
             classcond: TilePipeline | None = None,
             maskguided: TilePipeline | None = None, segmenter: Callable | None = None,
             class_names: Sequence[str] | None = None, fid_samples_per_class: int = 50, mask_samples: int = 50,
             maskguided_fid: bool = True, compare_tiles: int = 6, sampler: str = "ddim",
             num_inference_steps: int = 50, guidance_scale: float = 2.0, seed: int = 0, batch_size: int = 16,
             inception_path: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the models against preprocessed real tiles and write ``<output_dir>/metrics.json`` + PNGs.

    ``reference``: items with ``image`` (3, S, S) in [-1, 1] (the training preprocessing) and ``label``, for FID and
    nucleus areas; ``mask_reference`` (default: ``reference``): items with a one-hot ``mask`` whose masks guide the
    mask-guided model (held-out masks). Metrics (flat): FID overall / per class of class-conditional DDIM tiles
    against the real tiles (offline TF-Inception), mean segmented nucleus area per class (real and generated),
    DDIM-``num_inference_steps`` vs DDPM-``num_train_timesteps`` seconds/tile and FID on ``compare_tiles`` tiles
    with the same seeds, and for the mask-guided model IoU / Dice of the re-segmented tiles with their input masks
    and with shuffled masks (chance level), plus the segmenter's IoU on the real tiles (its ceiling).
    """
    out = Path(output_dir)
    segmenter = segmenter or NucleiSegmenter()
    if not reference:
        raise BreastGenError("no reference tile to evaluate against")
    real = torch.stack([(torch.as_tensor(r["image"]).float() + 1.0) / 2.0 for r in reference]).clamp(0, 1)
    real_labels = np.asarray([int(r["label"]) for r in reference])
    num_classes = classcond.num_classes if classcond is not None and classcond.class_conditional else \
        int(real_labels.max()) + 1
    metrics: dict[str, Any] = {"n_reference": len(reference), "image_size": int(real.shape[-1]),
                               "sampler": sampler, "steps": int(num_inference_steps)}
    ext = InceptionFeatures(inception_path, batch_size=batch_size)
    inception_cpu = 0.0

    def features(images: torch.Tensor) -> torch.Tensor:  # Inception features, their CPU time counted
        nonlocal inception_cpu
        with Stopwatch() as sw:
            feats = ext(images)
        inception_cpu += sw.cpu
        return feats

    t0 = time.perf_counter()
    real_feats = features(real)
    real_seg = _segment_all(segmenter, real)
    for c in range(num_classes):
        sel = [s for s, lab in zip(real_seg, real_labels) if lab == c]
        areas = np.concatenate([nucleus_areas(s) for s in sel]) if sel else np.zeros(0)
        metrics[f"real_nucleus_area_class{c}"] = float(areas.mean()) if len(areas) else float("nan")
    if all(r.get("mask") is not None for r in reference):
        truth = [torch.as_tensor(r["mask"]).argmax(0).numpy() for r in reference]
        metrics["segmenter_iou_real"] = mask_agreement(truth, real_seg)["iou"]

    if classcond is not None:
        labels = [c for c in range(num_classes) for _ in range(int(fid_samples_per_class))]
        seeds = [int(seed) + k for k in range(len(labels))]
        tiles, secs, cpus = [], 0.0, 0.0
        for s in range(0, len(labels), batch_size):
            with Stopwatch() as sw:
                tiles.append(classcond.sample(seeds[s:s + batch_size], labels[s:s + batch_size] if
                                              classcond.class_conditional else None, None, sampler,
                                              num_inference_steps, guidance_scale))
            secs, cpus = secs + sw.wall, cpus + sw.cpu
        gen = torch.cat(tiles)
        gen_feats = features(gen)
        lab_arr = np.asarray(labels)
        metrics["fid"] = frechet_distance(gen_feats, real_feats)
        gen_seg = _segment_all(segmenter, gen)
        for c in range(num_classes):
            g, r = gen_feats[lab_arr == c], real_feats[real_labels == c]
            metrics[f"fid_class{c}"] = frechet_distance(g, r) if len(g) >= 2 and len(r) >= 2 else float("nan")
            areas = np.concatenate([nucleus_areas(s) for s, lab in zip(gen_seg, labels) if lab == c] or [np.zeros(0)])
            metrics[f"nucleus_area_class{c}"] = float(areas.mean()) if len(areas) else 0.0
            metrics[f"nuclei_per_tile_class{c}"] = float(len(areas) / max(1, int(fid_samples_per_class)))
        metrics["n_generated_per_class"] = int(fid_samples_per_class)
        metrics[f"{sampler}{int(num_inference_steps)}_seconds_per_tile"] = secs / len(labels)
        metrics[f"{sampler}{int(num_inference_steps)}_cpu_seconds_per_tile"] = cpus / len(labels)
        per_class = [gen[lab_arr == c][:8] for c in range(num_classes)]
        ncol = max(len(p) for p in per_class)
        save_png(make_grid([t for p in per_class for t in p], ncol=ncol), out / "evaluation" / "classcond_samples.png")
        save_png(make_grid([t for c in range(num_classes) for t in real[real_labels == c][:ncol]], ncol=ncol),
                 out / "evaluation" / "real_samples.png")

        # DDIM vs DDPM: the first compare_tiles tiles (classes round-robin) with the same seeds
        n_cmp = int(compare_tiles)
        if n_cmp >= 2:
            order = _round_robin(labels, n_cmp)
            T = int(classcond.schedule.get("num_train_timesteps", 1000))
            with Stopwatch() as sw:
                ddpm = classcond.sample([seeds[i] for i in order], [labels[i] for i in order] if
                                        classcond.class_conditional else None, None, "ddpm", T, guidance_scale)
            ddpm_secs, ddpm_cpu = sw.wall / n_cmp, sw.cpu / n_cmp
            ddpm_feats = features(ddpm)
            metrics.update({"compare_tiles": n_cmp, "ddpm_steps": T, "ddpm_seconds_per_tile": ddpm_secs,
                            "ddpm_cpu_seconds_per_tile": ddpm_cpu,
                            "ddpm_fid_compare": frechet_distance(ddpm_feats, real_feats),
                            f"{sampler}_fid_compare": frechet_distance(gen_feats[order], real_feats),
                            "ddpm_nucleus_area": float(np.mean(np.concatenate(
                                [nucleus_areas(segmenter(t.numpy())) for t in ddpm] or [np.zeros(1)])))})
            save_png(make_grid(list(gen[order]) + list(ddpm), ncol=n_cmp), out / "evaluation" / "ddim_vs_ddpm.png")

    if maskguided is not None:
        with_mask = [r for r in (reference if mask_reference is None else mask_reference)
                     if r.get("mask") is not None][: int(mask_samples)]
        if len(with_mask) < 2:
            raise BreastGenError("mask-guided evaluation needs at least 2 reference tiles with masks")
        masks = torch.stack([torch.as_tensor(r["mask"]).float() for r in with_mask])
        mlabels = [int(r["label"]) for r in with_mask] if maskguided.class_conditional else None
        seeds = [int(seed) + 10_000 + k for k in range(len(with_mask))]
        tiles = [maskguided.sample(seeds[s:s + batch_size], None if mlabels is None else mlabels[s:s + batch_size],
                                   masks[s:s + batch_size], sampler, num_inference_steps, guidance_scale)
                 for s in range(0, len(with_mask), batch_size)]
        gen = torch.cat(tiles)
        seg = _segment_all(segmenter, gen)
        input_masks = [m.argmax(0).numpy() for m in masks]
        agree = mask_agreement(input_masks, seg, seed=int(seed))
        metrics.update({f"mask_{k}": v for k, v in agree.items()})
        metrics["mask_samples"] = len(with_mask)
        if maskguided_fid:
            metrics["fid_maskguided"] = frechet_distance(features(gen), real_feats)
        k = min(8, len(gen))
        seg_rgb = [torch.as_tensor(s > 0).float()[None].expand(3, -1, -1) for s in seg[:k]]
        save_png(make_grid([mask_preview(m) for m in masks[:k]] + list(gen[:k]) + seg_rgb, ncol=k),
                 out / "evaluation" / "maskguided_mask_sample_segmentation.png")
    metrics["inception_cpu_seconds"] = inception_cpu
    metrics["evaluate_seconds"] = time.perf_counter() - t0
    metrics.update(dict(extra or {}))
    metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _round_robin(labels: Sequence[int], n: int) -> list[int]:
    """Indices of ``n`` samples taking the classes in turn (first sample of each class, then the second ...)."""
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(int(lab), []).append(i)
    order, depth = [], 0
    while len(order) < n and any(depth < len(v) for v in by_class.values()):
        order += [v[depth] for _, v in sorted(by_class.items()) if depth < len(v)]
        depth += 1
    return order[:n]
