"""Lesion inpainting on mammograms (MAM-E's Stable-Diffusion inpainting, with full-resolution paste-back).

The inpainting UNet sees ``concat(noisy latent, mask at latent size, latent of the masked image)`` and a text
prompt (``breastgen.prompts.build_lesion_prompt``). It works on a square *window* around the mask, cut from the
full-resolution image and resized to the model size; the result is resized back and blended into the original
with a feathered edge, so pixels farther than ``feather`` from the mask keep their exact input values (16-bit
stays 16-bit). ``mode="repaint"`` inpaints with a text-to-image model instead (RePaint: the known region is
re-noised at every step), on the whole image as that model was trained.

Training is plain MONAI: ``SupervisedTrainer`` with :class:`InpaintPrepareBatch` (encodes the window and the
masked window with the frozen autoencoder on the training device) and ``ConditionalDiffusionInferer``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from scipy import ndimage
from torch import nn

from ..data.conditioning import LatentScaleFactor, scale_value
from ..data.transforms import (ScaleIntensityMammo, as_boxes, box_from_mask, breast_mask, laterality_from_filename,
                               laterality_from_image, laterality_from_meta)
from ..errors import BreastGenError
from ..io import atomic_write_json, make_grid, save_png, save_png16, save_tiff16, to_rows_cols
from ..io.dicom import write_synthetic_dicom
from ..prompts import NORMAL_PROMPT, build_lesion_prompt, parse_lesion_prompt, parse_prompt
from ..schedulers import (LDM_SCHEDULE, check_sampling_request, guided_sample, make_scheduler, repaint_sample,
                          seeded_noise)
from .conditional import ConditionalPrepareBatch

__all__ = ["context_window", "crop_window", "random_mask", "box_size_range", "oversample_lesions", "latent_mask", "paste_back",
           "InpaintWindowd", "InpaintPrepareBatch", "fit_latent_scale", "init_from_text2image",
           "InpaintingPipeline", "read_mask", "inpaint_files", "seam_ratio", "evaluate_inpainting"]
logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ geometry
def context_window(box: Sequence[float], image_wh: Sequence[int], context: float = 3.0, min_size: int = 64,
                   jitter: float = 0.0, rng: np.random.Generator | None = None) -> tuple[int, int, int]:
    """Square window ``(x0, y0, side)`` around ``box`` = [x0, y0, x1, y1]: side = max(min_size, context x the box's
    longer side), centred on the box (shifted by up to ``jitter`` x side), moved inside the image where it fits;
    a window larger than the image is centred on it (the outside is zero-padded by :func:`crop_window`)."""
    w, h = int(image_wh[0]), int(image_wh[1])
    bx0, by0, bx1, by1 = (float(v) for v in box)
    side = int(math.ceil(max(float(min_size), context * max(bx1 - bx0, by1 - by0), 1.0)))
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    if jitter and rng is not None:
        # the shift keeps the box inside the window
        room_x, room_y = max(0.0, (side - (bx1 - bx0)) / 2), max(0.0, (side - (by1 - by0)) / 2)
        cx += rng.uniform(-1, 1) * min(jitter * side, room_x)
        cy += rng.uniform(-1, 1) * min(jitter * side, room_y)
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    x0 = min(max(x0, min(0, w - side)), max(0, w - side)) if side <= w else (w - side) // 2
    y0 = min(max(y0, min(0, h - side)), max(0, h - side)) if side <= h else (h - side) // 2
    return x0, y0, side


def crop_window(arr: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """(C, W, H) -> (C, side, side) at ``window``; pixels outside the image are 0."""
    x0, y0, side = window
    c, w, h = arr.shape
    out = arr.new_zeros((c, side, side))
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        out[:, sx0 - x0:sx1 - x0, sy0 - y0:sy1 - y0] = arr[:, sx0:sx1, sy0:sy1]
    return out


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, s, s) image -> (B, C, size, size): area average down, antialiased bilinear up."""
    if x.shape[-1] == size:
        return x
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _resize_mask(m: torch.Tensor, size: int) -> torch.Tensor:
    """Binary mask resize that never loses a masked pixel: a target pixel is masked if any source pixel is."""
    if m.shape[-1] == size:
        return (m > 0.5).float()
    if m.shape[-1] > size:
        return (F.interpolate(m.float(), size=(size, size), mode="area") > 0).float()
    return (F.interpolate(m.float(), size=(size, size), mode="nearest") > 0.5).float()


def latent_mask(mask: torch.Tensor, latent_size: int) -> torch.Tensor:
    """(B, 1, S, S) pixel mask -> (B, 1, s, s) latent mask: a latent cell is masked if it covers any masked pixel
    (MAM-E resizes and binarises at 0.5, which can drop a small lesion's mask entirely)."""
    return _resize_mask(mask, latent_size)


def random_mask(breast: np.ndarray, rng: np.random.Generator, size_range: Sequence[float] = (16, 48),
                shape: str = "any", avoid: np.ndarray | None = None, tries: int = 50) -> np.ndarray:
    """A random (W, H) bool mask inside the breast: a filled box or a free-form blob whose longer side is drawn
    from ``size_range`` (pixels; e.g. the 25th-75th percentile of training boxes, :func:`box_size_range`), placed
    so that it lies on breast tissue and does not touch ``avoid`` (e.g. existing lesions)."""
    if shape not in ("any", "box", "blob"):
        raise BreastGenError(f"unknown random mask shape {shape!r}; allowed: 'any', 'box', 'blob'")
    w, h = breast.shape
    lo, hi = float(min(size_range)), float(max(size_range))
    for _ in range(tries):
        side = rng.uniform(lo, hi)
        aspect = rng.uniform(0.6, 1.0)
        bw, bh = (side, side * aspect) if rng.random() < 0.5 else (side * aspect, side)
        bw, bh = max(2, int(round(bw))), max(2, int(round(bh)))
        inner = ndimage.binary_erosion(breast, iterations=max(1, int(max(bw, bh) // 2) + 1))
        if avoid is not None:
            inner &= ~ndimage.binary_dilation(avoid, iterations=max(bw, bh))
        candidates = np.argwhere(inner)
        if len(candidates) == 0:
            size_range = (lo * 0.7, hi * 0.7)
            lo, hi = lo * 0.7, hi * 0.7
            continue
        cx, cy = candidates[rng.integers(len(candidates))]
        x0, y0 = int(cx - bw // 2), int(cy - bh // 2)
        m = np.zeros((w, h), dtype=bool)
        m[max(x0, 0):x0 + bw, max(y0, 0):y0 + bh] = True
        kind = shape if shape != "any" else ("box" if rng.random() < 0.5 else "blob")
        if kind == "blob":  # smoothed noise thresholded inside an ellipse: an irregular, connected outline
            yy, xx = np.mgrid[0:bh, 0:bw]
            ell = ((xx - (bw - 1) / 2) / (bw / 2)) ** 2 + ((yy - (bh - 1) / 2) / (bh / 2)) ** 2
            noise = ndimage.gaussian_filter(rng.normal(size=(bh, bw)), max(1.0, min(bw, bh) / 6))
            blob = ell + 0.6 * noise / (np.abs(noise).max() + 1e-6) < 0.9
            blob = ndimage.binary_fill_holes(blob)
            lab, n = ndimage.label(blob)
            if n:
                blob = lab == (np.bincount(lab.ravel())[1:].argmax() + 1)
            m[:] = False
            sub = m[max(x0, 0):x0 + bw, max(y0, 0):y0 + bh]
            sub[:] = blob.T[max(0, -x0):max(0, -x0) + sub.shape[0], max(0, -y0):max(0, -y0) + sub.shape[1]]
        m &= breast
        if m.sum() >= 4:
            return m
    raise BreastGenError(f"no room for a random mask of {lo:.0f}-{hi:.0f} px inside the breast")


def box_size_range(entries: Sequence[Mapping], percentiles: Sequence[float] = (25, 75), key: str = "bbox",
                   default: Sequence[float] = (16, 48)) -> list[float]:
    """MAM-E's random-box sizes: the given percentiles of the longer side of the training boxes (pixels)."""
    sides = [max(b[2] - b[0], b[3] - b[1]) for e in entries if e.get(key) is not None
             for b in as_boxes(e[key], e.get("image"))]
    if not sides:
        return [float(v) for v in default]
    lo, hi = np.percentile(sides, list(percentiles))
    return [float(lo), float(max(hi, lo + 1))]


def oversample_lesions(entries: Sequence[Mapping], repeats: int = 1, label_key: str = "label") -> list[dict]:
    """The training list with every lesion entry (label not 'normal') ``repeats`` times: lesion-free images only
    teach normal-tissue fills, so a set with few lesions needs them more often per epoch."""
    if int(repeats) < 1:
        raise BreastGenError(f"lesion_repeats must be >= 1, got {repeats}")
    out = []
    for e in entries:
        lesion = str(e.get(label_key) or "normal").lower() not in ("normal", "none", "")
        out += [dict(e) for _ in range(int(repeats) if lesion else 1)]
    return out


def _feather_alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """1 inside ``mask``, falling linearly to 0 at ``feather`` pixels outside it; 0 beyond (float32, (W, H))."""
    if feather <= 0:
        return mask.astype(np.float32)
    dist = ndimage.distance_transform_edt(~mask)
    return np.clip(1.0 - dist / float(feather), 0.0, 1.0).astype(np.float32)


def paste_back(original: np.ndarray, generated: np.ndarray, mask: np.ndarray, feather: int = 8) -> np.ndarray:
    """Blend ``generated`` (same shape and units as ``original``) into ``original`` with a feathered edge around
    ``mask``; every pixel farther than ``feather`` from the mask is copied bit for bit. Keeps the dtype."""
    alpha = _feather_alpha(mask, feather)
    blend = alpha * generated.astype(np.float64) + (1.0 - alpha) * original.astype(np.float64)
    if np.issubdtype(original.dtype, np.integer):
        info = np.iinfo(original.dtype)
        blend = np.clip(np.round(blend), info.min, info.max)
    out = blend.astype(original.dtype)
    return np.where(alpha > 0, out, original)


# ------------------------------------------------------------------------------------------------ training
class InpaintWindowd(Randomizable, MapTransform):
    """Training sample for the inpainting model: a mask, a window around it, the prompt.

    Lesion items (``label`` benign/malignant with a ``mask`` image and/or a ``bbox``): the mask is the lesion
    outline (dilated by ``margin`` px) or its filled box (MAM-E), per ``mask_source`` ("outline", "bbox" or
    "mixed"); the prompt is "a mammogram with a [pathology] {lesion_type}" (pathology kept with probability
    ``pathology_prob``). Other items get a random box or free-form blob on breast tissue
    (:func:`random_mask`, sizes ``random_size``) and the normal-tissue prompt. Writes ``image`` and ``mask``
    (1 x size x size, float) and ``prompt``; expects ``image`` (1 x W x H) already in [0, 1].
    """

    def __init__(self, keys: KeysCollection = ("image", "mask"), size: int = 64, context: float = 3.0,
                 min_window: int = 64, jitter: float = 0.25, mask_source: str = "mixed", margin: int = 2,
                 random_size: Sequence[float] = (16, 48), lesion_type: str = "lesion", pathology_prob: float = 0.5,
                 bbox_key: str = "bbox", label_key: str = "label", prompt_key: str = "prompt"):
        super().__init__(keys, allow_missing_keys=True)
        if mask_source not in ("outline", "bbox", "mixed"):
            raise BreastGenError(f"unknown mask_source {mask_source!r}; allowed: 'outline', 'bbox', 'mixed'")
        build_lesion_prompt(None, lesion_type)  # validates the word
        self.image_key, self.mask_key = self.keys[0], self.keys[1] if len(self.keys) > 1 else "mask"
        self.size, self.context, self.min_window, self.jitter = int(size), float(context), int(min_window), jitter
        self.mask_source, self.margin, self.random_size = mask_source, int(margin), list(random_size)
        self.lesion_type, self.pathology_prob = lesion_type, float(pathology_prob)
        self.bbox_key, self.label_key, self.prompt_key = bbox_key, label_key, prompt_key
        self._rng = np.random.default_rng()

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self._rng = np.random.default_rng(self.R.randint(0, 2**31 - 1))
        return self

    def randomize(self, data: Any = None) -> None:
        self._rng = np.random.default_rng(self.R.randint(0, 2**31 - 1))

    def _lesion_mask(self, d: Mapping, wh: tuple[int, int]) -> np.ndarray | None:
        label = str(d.get(self.label_key) or "normal").lower()
        if label in ("normal", "none", ""):
            return None
        outline = d.get(self.mask_key)
        outline = None if outline is None or isinstance(outline, str) else np.asarray(outline)[0] > 0
        box = box_from_mask(outline) if outline is not None and outline.any() else None
        if box is None and d.get(self.bbox_key) is not None:
            box = as_boxes(d[self.bbox_key])[0]
        if box is None:
            return None
        source = self.mask_source
        if source == "mixed":
            source = "outline" if outline is not None and outline.any() and self._rng.random() < 0.5 else "bbox"
        if source == "outline" and outline is not None and outline.any():
            return ndimage.binary_dilation(outline, iterations=self.margin) if self.margin else outline
        m = np.zeros(wh, dtype=bool)
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        m[max(x0 - self.margin, 0):x1 + self.margin, max(y0 - self.margin, 0):y1 + self.margin] = True
        return m

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        self.randomize()
        img = torch.as_tensor(d[self.image_key]).float()
        wh = tuple(img.shape[-2:])
        mask = self._lesion_mask(d, wh)
        label = str(d.get(self.label_key) or "normal").lower()
        if mask is None:
            mask = random_mask(breast_mask(img.numpy()), self._rng, self.random_size)
            prompt = NORMAL_PROMPT
        else:
            keep = label in ("benign", "malignant") and self._rng.random() < self.pathology_prob
            prompt = build_lesion_prompt(label if keep else None, self.lesion_type)
        window = context_window(box_from_mask(mask), wh, self.context, self.min_window, self.jitter, self._rng)
        m = torch.from_numpy(mask[None]).float()
        d[self.image_key] = _resize(crop_window(img, window)[None], self.size)[0]
        d[self.mask_key] = _resize_mask(crop_window(m, window)[None], self.size)[0]
        d[self.prompt_key] = prompt
        return d


class InpaintPrepareBatch(ConditionalPrepareBatch):
    """Training batch for the inpainting UNet (with :class:`~breastgen.engines.conditional.ConditionalDiffusionInferer`):
    encodes the batch's ``image`` windows (posterior sample) and masked windows (posterior mean) with the frozen
    autoencoder on the training device; the inferer gets ``concat = [latent mask, masked latent]`` and the prompt
    tokens as ``context``. ``prediction_type`` "v_prediction" needs ``scheduler`` (velocity target)."""

    def __init__(self, autoencoder: nn.Module, scale: LatentScaleFactor, num_train_timesteps: int,
                 prediction_type: str = "epsilon", scheduler: Any = None, context_key: str = "tokens",
                 mask_key: str = "mask"):
        super().__init__(num_train_timesteps, prediction_type=prediction_type, scheduler=scheduler)
        self.autoencoder, self.scale, self.context_key, self.mask_key = autoencoder, scale, context_key, mask_key

    @torch.no_grad()
    def encode(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,1,S,S) windows + masks -> scaled image latents (sampled), latent masks, scaled masked latents."""
        self.autoencoder.eval()
        mu, sigma = self.autoencoder.encode(torch.cat([image, image * (mask < 0.5)]))
        z, z_masked = (mu + sigma * torch.randn_like(sigma)).chunk(2)[0], mu.chunk(2)[1]
        if not self.scale.fitted:
            raise BreastGenError("the latent scale factor is not set: restore it from the text-to-image checkpoint "
                                 "or fit it (breastgen.engines.inpainting.fit_latent_scale) before training")
        s = float(self.scale.value)
        return z * s, latent_mask(mask, z.shape[-1]), z_masked * s

    def __call__(self, batchdata, device=None, non_blocking=False, **kwargs):
        image = torch.as_tensor(batchdata["image"]).to(device).float()
        mask = torch.as_tensor(batchdata[self.mask_key]).to(device).float()
        z, m, z_masked = self.encode(image, mask)
        images, target, args, infer_kwargs = super().__call__({"image": z}, device, non_blocking, **kwargs)
        infer_kwargs["concat"] = torch.cat([m, z_masked], dim=1)
        if self.context_key is not None:  # token ids stay integers: the network encodes them
            infer_kwargs["context"] = torch.as_tensor(batchdata[self.context_key]).to(device)
        return images, target, args, infer_kwargs


@torch.no_grad()
def fit_latent_scale(scale: LatentScaleFactor, autoencoder: nn.Module, dataset: Any, max_items: int = 64,
                     device: str | torch.device = "cpu") -> float:
    """1 / std of the (posterior-mean) latents of the first ``max_items`` training windows; a scale that is
    already set (restored from the text-to-image checkpoint: same autoencoder) is kept."""
    if scale.fitted:
        return float(scale.value)
    autoencoder.eval()
    latents = []
    for i in range(min(len(dataset), int(max_items))):
        item = dataset[i]
        item = item[0] if isinstance(item, list) else item
        latents.append({"image": autoencoder.encode(torch.as_tensor(item["image"]).float()[None].to(device))[0].cpu()})
    return scale.fit(latents)


def init_from_text2image(network: nn.Module, checkpoint: str | Path | None, scale: LatentScaleFactor | None = None,
                         key: str = "network") -> int:
    """Start the inpainting network from a trained text-to-image one (as SD-inpainting starts from SD): every
    weight of the same shape is copied; the first convolution's extra input channels (mask, masked latent) start
    at zero, so the initial model is the text-to-image model. Returns the number of tensors copied; ``checkpoint`` None
    leaves the network as it is (a missing file is an error). ``scale`` (unset) takes the checkpoint's scale."""
    from .checkpoints import load_state

    if checkpoint is None or str(checkpoint).strip().lower() in ("", "none", "null"):
        logger.info("no text-to-image checkpoint given: the inpainting network starts from scratch")
        return 0
    src = load_state(checkpoint)
    if scale is not None and isinstance(src, dict) and "scale" in src and not scale.fitted:
        scale.load_state_dict(src["scale"])  # the same autoencoder: the same latent scale
    src = src.get(key, src) if isinstance(src, dict) else src
    own = network.state_dict()
    copied = 0
    with torch.no_grad():
        for name, value in src.items():
            if name not in own:
                continue
            if own[name].shape == value.shape:
                own[name].copy_(value)
                copied += 1
            elif own[name].ndim == 4 and value.ndim == 4 and own[name].shape[0] == value.shape[0] \
                    and own[name].shape[1] > value.shape[1] and own[name].shape[2:] == value.shape[2:]:
                own[name].zero_()
                own[name][:, : value.shape[1]].copy_(value)
                copied += 1
    network.load_state_dict(own)
    logger.info("inpainting network initialised from %s (%d of %d tensors)", checkpoint, copied, len(own))
    return copied


# ------------------------------------------------------------------------------------------------ inference
def _as_mask(mask: Any) -> np.ndarray:
    m = np.asarray(mask)
    return (m[0] if m.ndim == 3 else m) > 0


class InpaintingPipeline:
    """Full-resolution image + mask + prompt -> inpainted image of the same size and dtype.

    Args:
        autoencoder, network, tokenizer, scale: the frozen autoencoder, the denoising network (inpainting UNet
            for ``mode="model"``, a text-to-image UNet for ``"repaint"``), its tokenizer and latent scale.
        image_size: the model's input size (pixels); ``latent_size`` follows from the autoencoder.
        mode: "model" (dedicated inpainting UNet on a window around the mask) or "repaint".
        context, min_window: window side = max(min_window, context x the mask's longer side) ("model" mode);
            "repaint" uses the whole image (the text-to-image model's field of view).
        feather: blend width in full-resolution pixels; farther from the mask the input is kept exactly.
        schedule: the training noise schedule (as in ``LatentDiffusionPipeline``).
        min_breast_fraction: refuse masks with less of their area on breast tissue.
        match_intensity: map the decoded window through the gain and offset that best fit its known (unmasked)
            pixels to the input's (least squares, gain clipped to 0.5-2): removes the autoencoder's intensity
            bias on the window (e.g. a darker reconstruction), which would otherwise show as a darker fill.
    """

    def __init__(self, autoencoder: nn.Module, network: nn.Module, tokenizer: Any, scale: LatentScaleFactor | float,
                 image_size: int, mode: str = "model", context: float = 3.0, min_window: int = 64,
                 feather: int = 8, schedule: Mapping | None = None, device: str | torch.device = "cpu",
                 min_breast_fraction: float = 0.5, match_intensity: bool = True):
        if mode not in ("model", "repaint"):
            raise BreastGenError(f"unknown inpainting mode {mode!r}; allowed: 'model', 'repaint'")
        self.autoencoder, self.network, self.tokenizer, self.scale = autoencoder, network, tokenizer, scale
        self.image_size, self.mode, self.context, self.min_window = int(image_size), mode, float(context), int(min_window)
        self.feather, self.min_breast_fraction = int(feather), float(min_breast_fraction)
        self.match_intensity = bool(match_intensity)
        self.schedule = {**LDM_SCHEDULE, **(schedule or {})}
        self.device = torch.device(device)

    @property
    def scale_value(self) -> float:
        return scale_value(self.scale)

    def check(self, image: np.ndarray, mask: np.ndarray, prompt: str, negative_prompt: str = "",
              guidance_scale: float = 4.0, num_inference_steps: int = 20, sampler: str = "dpm++2m",
              image_src: Any = None, mask_src: Any = None) -> np.ndarray:
        """Validate one request before any work; returns the boolean (W, H) mask."""
        m = _as_mask(mask)
        if m.shape != tuple(image.shape[-2:]):
            raise BreastGenError(f"mask size {m.shape} differs from image size {tuple(image.shape[-2:])} "
                                 f"of {image_src} (sizes are W x H)", mask_src)
        if not m.any():
            raise BreastGenError("empty mask (no pixel to inpaint)", mask_src)
        if m.mean() > 0.5:
            raise BreastGenError(f"the mask covers {m.mean():.0%} of the image; inpainting fills lesions, at most 50 %",
                                 mask_src)
        on_breast = float(breast_mask(image)[m].mean())
        if on_breast < self.min_breast_fraction:
            raise BreastGenError(f"the mask lies outside the breast ({on_breast:.0%} of it on breast tissue, "
                                 f"need >= {self.min_breast_fraction:.0%})", mask_src)
        if self.mode == "model":
            parse_lesion_prompt(prompt)
        else:  # a text-to-image model: its own prompt grammar
            parse_prompt(prompt)
        for p in (prompt, negative_prompt):
            unknown = self.tokenizer.unknown_words(p) if hasattr(self.tokenizer, "unknown_words") and p else []
            if unknown:
                raise BreastGenError(f"prompt {p!r} has words the model was not built with: {', '.join(unknown)}")
        # unknown sampler, bad step count (DDPM: all training steps) or guidance -> one-line error before any work
        check_sampling_request(make_scheduler(sampler, **self.schedule), num_inference_steps, guidance_scale)
        return m

    def window(self, mask: np.ndarray) -> tuple[int, int, int]:
        w, h = mask.shape
        if self.mode == "repaint":  # the whole image, chest wall at x = 0, as the text-to-image model saw it
            side = max(w, h)
            return 0, (h - side) // 2, side
        x0, y0, x1, y1 = box_from_mask(mask)
        f = self.feather
        win = context_window([x0 - f, y0 - f, x1 + f, y1 + f], (w, h), self.context, self.min_window)
        return win

    @torch.no_grad()
    def inpaint(self, image: np.ndarray, mask: np.ndarray, prompt: str, seed: int = 0, negative_prompt: str = "",
                guidance_scale: float = 4.0, num_inference_steps: int = 20, sampler: str = "dpm++2m",
                laterality: str | None = None, meta: Mapping | None = None, resample: int = 1,
                progress: Any = None) -> dict:
        """Inpaint one (W, H) image. Returns ``{"image": output (same dtype), "mask", "window", "flipped"}``."""
        image = np.asarray(image)
        m = self.check(image, mask, prompt, negative_prompt, guidance_scale, num_inference_steps, sampler,
                       (meta or {}).get("filename_or_obj"))
        t = torch.as_tensor(image.astype(np.float32) if image.dtype != np.float32 else image)
        lo, hi = ScaleIntensityMammo()._bounds(t, {})
        scaled = ((t - lo) / max(hi - lo, 1e-12)).clamp(0, 1)
        lat = laterality if laterality in ("L", "R") else (laterality_from_meta(meta or {})
                                                           or laterality_from_filename((meta or {}).get("filename_or_obj"))
                                                           or laterality_from_image(scaled))
        flipped = lat == "R"  # the models see left breasts (chest wall at x = 0)
        m_work = m[::-1].copy() if flipped else m
        x_full = torch.flip(scaled, dims=[0]) if flipped else scaled
        win = self.window(m_work)
        x = _resize(crop_window(x_full[None], win)[None], self.image_size).to(self.device)
        mk = _resize_mask(crop_window(torch.from_numpy(m_work[None]).float(), win)[None], self.image_size).to(self.device)
        self.autoencoder.eval()
        mu, _ = self.autoencoder.encode(torch.cat([x, x * (mk < 0.5)]))
        z_img, z_masked = (mu * self.scale_value).chunk(2)
        ml = latent_mask(mk, z_img.shape[-1])
        noise = seeded_noise(z_img.shape[1:], [seed], self.device)
        tokens = self.tokenizer([prompt, negative_prompt or ""]).to(self.device)
        emb = self.network.encode(tokens) if hasattr(self.network, "encode") else tokens
        scheduler = make_scheduler(sampler, **self.schedule)
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        if self.mode == "model":
            z = guided_sample(self.network, noise, scheduler, int(num_inference_steps), context=emb[:1],
                              uncond_context=emb[1:], guidance_scale=guidance_scale,
                              concat=torch.cat([ml, z_masked], dim=1), generator=gen, progress=progress)
        else:
            z = repaint_sample(self.network, noise, scheduler, int(num_inference_steps), known=z_img, mask=ml,
                               resample=resample, context=emb[:1], uncond_context=emb[1:],
                               guidance_scale=guidance_scale, generator=gen, progress=progress)
        g = self.autoencoder.decode_stage_2_outputs(z / self.scale_value).float().clamp(0, 1)
        if self.match_intensity:
            inside = _resize(crop_window(torch.ones_like(x_full)[None], win)[None], self.image_size).to(g) > 0.999
            g = _match_known(g, x, (mk < 0.5) & inside)
        g = F.interpolate(g, size=(win[2], win[2]), mode="bilinear", align_corners=False)[0, 0].cpu()
        # window -> full image (values outside the window are never used: the window covers the dilated mask)
        full = torch.zeros_like(x_full)
        w, h = full.shape
        x0, y0, side = win
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
        full[sx0:sx1, sy0:sy1] = g[sx0 - x0:sx1 - x0, sy0 - y0:sy1 - y0]
        if flipped:
            full = torch.flip(full, dims=[0])
        generated = (lo + full.numpy().astype(np.float64) * (hi - lo))
        out = paste_back(image, generated, m, self.feather)
        win_orig = (w - x0 - side, y0, side) if flipped else win
        return {"image": out, "mask": m, "window": win_orig, "flipped": flipped}


def _match_known(decoded: torch.Tensor, target: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """``a * decoded + b`` with (a, b) the least-squares fit of ``decoded`` to ``target`` on the ``known`` pixels."""
    d, t = decoded[known].double(), target[known].double()
    if d.numel() < 16 or float(d.var()) < 1e-10:
        return decoded
    a = float(((d - d.mean()) * (t - t.mean())).mean() / d.var(unbiased=False))
    a = min(max(a, 0.5), 2.0)
    b = float(t.mean() - a * d.mean())
    return (a * decoded + b).clamp(0, 1)


def read_mask(spec: Any, image: np.ndarray, rng: np.random.Generator | None = None,
              random_size: Sequence[float] = (16, 48), image_src: Any = None) -> tuple[np.ndarray, str]:
    """The mask of a request: a mask image path (non-zero = inpaint), a bbox ``[x0, y0, x1, y1]`` (or a JSON file
    holding one, or ``{"bbox": [...]}``), or ``"random"`` (a box/blob on breast tissue, sizes ``random_size``).
    Returns ``(mask (W, H) bool, description)``."""
    import json

    from ..data.readers import load_image

    w, h = image.shape[-2:]
    if isinstance(spec, str) and spec.strip().lower() == "random":
        return random_mask(breast_mask(image), rng or np.random.default_rng(0), random_size), "random"
    box, src = None, None
    if isinstance(spec, (list, tuple)) and len(spec) == 4 and not isinstance(spec[0], (list, tuple)):
        box = spec
    elif isinstance(spec, Mapping) and "bbox" in spec:
        box = spec["bbox"]
    elif isinstance(spec, (str, Path)) and str(spec).lower().endswith(".json"):
        src = Path(spec)
        if not src.is_file():
            raise BreastGenError("bbox file not found", src)
        try:
            obj = json.loads(src.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise BreastGenError(f"bbox file is not JSON ({exc})", src) from None
        box = obj.get("bbox") if isinstance(obj, Mapping) else obj
    elif isinstance(spec, (str, Path)):
        arr, _ = load_image(spec, allow_constant=True, modalities=None)
        arr = np.asarray(arr)
        arr = arr[..., 0] if arr.ndim == 3 else arr
        if arr.shape != (w, h):
            raise BreastGenError(f"mask size {arr.shape} differs from image size {(w, h)} of {image_src} "
                                 "(sizes are W x H)", spec)
        return arr > 0, str(spec)
    else:
        raise BreastGenError(f"mask must be a mask image, a bbox [x0, y0, x1, y1], a bbox JSON file or 'random', "
                             f"got {spec!r}", image_src)
    b = as_boxes(box, str(src or image_src))[0]
    if b[0] < 0 or b[1] < 0 or b[2] > w or b[3] > h:
        raise BreastGenError(f"bbox {b.tolist()} lies outside the image (W x H = {w} x {h})", src or image_src)
    if (b[2] - b[0]) * (b[3] - b[1]) <= 0:
        raise BreastGenError(f"bbox {b.tolist()} has zero area", src or image_src)
    m = np.zeros((w, h), dtype=bool)
    m[int(b[0]):int(math.ceil(b[2])), int(b[1]):int(math.ceil(b[3]))] = True
    return m, f"bbox {b.tolist()}"


def _preview(img: np.ndarray) -> np.ndarray:
    a = img.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / max(hi - lo, 1e-12)


def inpaint_files(pipeline: InpaintingPipeline, requests: Sequence[Mapping], output_dir: str | Path,
                  prompt: str = "a mammogram with a lesion", negative_prompt: str = "", guidance_scale: float = 4.0,
                  num_inference_steps: int = 20, sampler: str = "dpm++2m", seed: int = 0, resample: int = 1,
                  random_size: Sequence[float] = (16, 48), formats: Sequence[str] = ("png", "tiff", "dcm"),
                  description: str = "breastgen mammo_ldm_inpainting") -> list[dict]:
    """Inpaint ``requests`` (``{"image": path, "mask": mask image | bbox | bbox JSON | "random", "prompt"?}``).

    Every image and mask is read and checked before anything is written. Outputs per request ``k``:
    ``inpainted_<k>.{png (16-bit), tif (16-bit), dcm (synthetic, no source patient data)}``, the mask used
    ``mask_<k>.png`` and ``compare_<k>.png`` (input | mask | output, 8-bit preview); ``inpainted.json`` lists them.
    """
    from ..data.readers import load_image

    bad = set(formats) - {"png", "tiff", "dcm"}
    if bad:
        raise BreastGenError(f"unknown output format(s) {sorted(bad)}; allowed: 'png', 'tiff', 'dcm'")
    if not requests:
        raise BreastGenError("no image to inpaint (empty request list)")
    jobs = []
    for k, req in enumerate(requests):
        if "image" not in req:
            raise BreastGenError(f"request {k} has no 'image'")
        img, meta = load_image(req["image"])
        img = np.asarray(img)
        if img.ndim != 2:
            raise BreastGenError(f"expected a greyscale mammogram, got shape {img.shape}", req["image"])
        rng = np.random.default_rng(int(seed) + k)
        mask, how = read_mask(req.get("mask", "random"), img, rng, random_size, req["image"])
        p = req.get("prompt", prompt)
        pipeline.check(img, mask, p, negative_prompt, guidance_scale, num_inference_steps, sampler, req["image"],
                       req.get("mask"))
        jobs.append((k, req, img, meta, mask, how, p))
    out_dir = Path(output_dir)
    manifest = []
    for k, req, img, meta, mask, how, p in jobs:
        res = pipeline.inpaint(img, mask, p, seed=int(seed) + k, negative_prompt=negative_prompt,
                               guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                               sampler=sampler, meta=meta, resample=resample)
        out = res["image"]
        params = {"prompt": p, "negative_prompt": negative_prompt, "seed": int(seed) + k, "sampler": sampler,
                  "steps": int(num_inference_steps), "guidance_scale": float(guidance_scale), "mode": pipeline.mode,
                  "mask": how, "window": list(res["window"]), "feather": pipeline.feather}
        stem = out_dir / f"inpainted_{k:04d}"
        files = {}
        as16 = out if out.dtype == np.uint16 else _preview(out)
        if "png" in formats:
            files["png"] = str(save_png16(as16, stem.with_suffix(".png")))
        if "tiff" in formats:
            files["tiff"] = str(save_tiff16(as16, stem.with_suffix(".tif"), description=str(params)))
        if "dcm" in formats:
            src_meta = {"laterality": meta.get("ImageLaterality"), "view": meta.get("ViewPosition"),
                        "manufacturer": meta.get("Manufacturer"), "modality": "MG"}
            if meta.get("spacing_source") != "default" and meta.get("spacing") is not None:
                src_meta["pixel_spacing_mm"] = [float(meta["spacing"][1]), float(meta["spacing"][0])]
            files["dcm"] = str(write_synthetic_dicom(stem.with_suffix(".dcm"), to_rows_cols(as16),
                                                     source_meta=src_meta, description=description, params=params))
        files["mask"] = str(save_png(mask.astype(np.float32), out_dir / f"mask_{k:04d}.png"))
        files["compare"] = str(save_png(make_grid([_preview(img), mask.astype(np.float32), _preview(out)], ncol=3),
                                        out_dir / f"compare_{k:04d}.png"))
        manifest.append({"image": str(req["image"]), **params, "files": files})
    atomic_write_json(out_dir / "inpainted.json", manifest)
    return manifest


# ------------------------------------------------------------------------------------------------ evaluation
def seam_ratio(image: np.ndarray, mask: np.ndarray, band: int = 2) -> float:
    """Mean gradient magnitude on the mask's border (``band`` px either side) over the mean gradient magnitude of
    the surrounding ring (``band`` .. 4 x ``band`` px outside): ~1 when the border is invisible, > 1 for a seam."""
    a = _preview(np.asarray(image))
    grad = np.hypot(ndimage.sobel(a, 0), ndimage.sobel(a, 1))
    m = _as_mask(mask)
    outer = ndimage.binary_dilation(m, iterations=band)
    border = outer & ~ndimage.binary_erosion(m, iterations=band)
    ring = ndimage.binary_dilation(m, iterations=4 * band) & ~outer
    return float(grad[border].mean() / max(grad[ring].mean(), 1e-12))


def _window_crop(image: np.ndarray, mask: np.ndarray, size: int, context: float, min_window: int) -> torch.Tensor:
    """(1, size, size) window around the mask, intensities scaled as for the model."""
    t = torch.as_tensor(np.asarray(image, dtype=np.float32))
    lo, hi = ScaleIntensityMammo()._bounds(t, {})
    t = ((t - lo) / max(hi - lo, 1e-12)).clamp(0, 1)
    win = context_window(box_from_mask(mask), t.shape, context, min_window)
    return _resize(crop_window(t[None], win)[None], size)[0]


def evaluate_inpainting(pipelines: Mapping[str, InpaintingPipeline], entries: Sequence[Mapping],
                        train_entries: Sequence[Mapping], output_dir: str | Path,
                        prompt: str | Mapping[str, str] = "a mammogram with a lesion",
                        num_inference_steps: int = 20, sampler: str = "dpm++2m", guidance_scale: float = 4.0,
                        resample: int = 1, random_size: Sequence[float] = (16, 48), crop_size: int = 64,
                        context: float = 3.0, min_window: int = 64, classifier_epochs: int = 30, seed: int = 0,
                        fid: bool = True, repaint_sampler: str = "ddim", repaint_steps: int = 50) -> dict:
    """Seam quality, FID/KID of lesion crops and a lesion-classifier check for each pipeline (see the bundle docs).

    ``entries`` (evaluation split): lesion-free images are inpainted at a random mask with ``prompt`` (one, or
    one per pipeline name; RePaint pipelines sample with ``repaint_sampler`` / ``repaint_steps``); lesion
    images give the real lesion crops. ``train_entries`` train the lesion-vs-normal classifier (real crops only);
    FID/KID compare the inpainted windows with every real lesion window (both lists).
    Writes ``metrics.json`` and ``gallery.png`` (input | mask | output per pipeline) into ``output_dir``.
    """
    from monai.networks.nets import Classifier

    from ..data.readers import load_image

    def load(entry):
        img, meta = load_image(entry["image"])
        return np.asarray(img), meta

    def lesion_mask_of(entry, shape):
        if entry.get("mask"):
            arr, _ = load_image(entry["mask"], allow_constant=True, modalities=None)
            return np.asarray(arr) > 0
        m = np.zeros(shape, dtype=bool)
        x0, y0, x1, y1 = (int(v) for v in as_boxes(entry["bbox"])[0])
        m[x0:x1, y0:y1] = True
        return m

    def is_lesion(e):
        return str(e.get("label") or "normal").lower() not in ("normal", "none", "") and (e.get("mask") or e.get("bbox"))

    def crops(items, rng):
        """Real lesion windows (filled lesion box as the 'mask') and random normal windows."""
        les, nor = [], []
        for e in items:
            img, _ = load(e)
            if is_lesion(e):
                box = np.zeros(img.shape, dtype=bool)
                x0, y0, x1, y1 = (int(v) for v in box_from_mask(lesion_mask_of(e, img.shape)))
                box[x0:x1, y0:y1] = True
                les.append((img, box))
            else:
                nor.append((img, random_mask(breast_mask(img), rng, random_size, "box")))
        return les, nor

    rng = np.random.default_rng(seed)
    real_eval, normal_eval = crops(entries, rng)
    real_train, normal_train = crops(train_entries, rng)
    if not real_eval or not normal_eval:
        raise BreastGenError("the evaluation split needs lesion images and lesion-free images")
    to_crop = lambda pairs: torch.stack([_window_crop(i, m, crop_size, context, min_window) for i, m in pairs])  # noqa: E731

    # lesion-vs-normal classifier on real training windows (small CNN; flips for augmentation)
    torch.manual_seed(seed)
    train_lesion_crops = to_crop(real_train)  # classifier training and the FID reference set
    x_tr = torch.cat([train_lesion_crops, to_crop(normal_train)])
    y_tr = torch.tensor([1] * len(real_train) + [0] * len(normal_train))
    clf = Classifier(in_shape=(1, crop_size, crop_size), classes=2, channels=(16, 32, 64), strides=(2, 2, 2))
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    weight = torch.tensor([1.0, len(normal_train) / max(1, len(real_train))])
    g = torch.Generator().manual_seed(seed)
    clf.train()
    for _ in range(int(classifier_epochs)):
        for idx in torch.randperm(len(x_tr), generator=g).split(16):
            xb = x_tr[idx]
            xb = torch.where(torch.rand(len(xb), 1, 1, 1, generator=g) < 0.5, xb, xb.flip(-1))
            loss = F.cross_entropy(clf(xb), y_tr[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()

    def lesion_rate(x):
        with torch.no_grad():
            return float((clf(x).softmax(1)[:, 1] > 0.5).float().mean())

    real_crops, normal_crops = to_crop(real_eval), to_crop(normal_eval)
    metrics: dict[str, Any] = {
        "n_real_lesions": len(real_eval), "n_real_lesions_fid": len(real_eval) + len(real_train),
        "n_inpainted": len(normal_eval),
        "classifier_lesion_rate_real_lesions": lesion_rate(real_crops),
        "classifier_lesion_rate_normal": lesion_rate(normal_crops),
        "seam_ratio_real_lesions": float(np.mean([seam_ratio(i, m) for i, m in real_eval])),
    }
    feats = None
    if fid:
        from ..metrics.fid import InceptionFeatures, frechet_distance, kernel_inception_distance

        inception = InceptionFeatures()
        feats = inception(torch.cat([real_crops, train_lesion_crops]))  # every real lesion: the reference set
    results = {}
    for name, pipe in pipelines.items():
        outs = []
        p = prompt.get(name, NORMAL_PROMPT) if isinstance(prompt, Mapping) else prompt
        repaint = pipe.mode == "repaint"
        for k, (img, m) in enumerate(normal_eval):
            res = pipe.inpaint(img, m, p, seed=seed + k, guidance_scale=guidance_scale,
                               num_inference_steps=repaint_steps if repaint else num_inference_steps,
                               sampler=repaint_sampler if repaint else sampler, resample=resample if repaint else 1)
            outs.append((res["image"], m))
        results[name] = outs
        fake = to_crop(outs)
        metrics[f"{name}_classifier_lesion_rate"] = lesion_rate(fake)
        metrics[f"{name}_seam_ratio"] = float(np.mean([seam_ratio(i, m) for i, m in outs]))
        metrics[f"{name}_mean_change_in_window"] = float((fake - normal_crops).mean())
        if feats is not None:
            ff = inception(fake)
            metrics[f"{name}_fid_lesion_crops"] = frechet_distance(feats, ff)
            metrics[f"{name}_kid_lesion_crops"] = kernel_inception_distance(feats, ff)[0]
    gallery = []
    for k, (img, m) in enumerate(normal_eval[:4]):  # one row per image: input | mask | each pipeline's output
        gallery += [_preview(img), m.astype(np.float32), *(_preview(results[n][k][0]) for n in results)]
    out = Path(output_dir)
    if gallery:
        save_png(make_grid(gallery, ncol=2 + len(results)), out / "gallery.png")
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
