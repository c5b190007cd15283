"""Nuclei masks for H&E tiles: segmentation, mask agreement (IoU / Dice) and class masks for mask-guided diffusion.

* :func:`segment_nuclei` -- the classical default that needs no weights: colour deconvolution
  (``skimage.color.rgb2hed``) to the haematoxylin channel, smoothing, a threshold (Otsu unless given, never below
  ``min_threshold``), hole filling, small-object removal and a distance-transform watershed that splits touching
  nuclei. Returns an instance label image.
* :class:`NucleiSegmenter` -- the classical method or a MONAI segmentation network (e.g. ``UNet`` / ``BasicUNet``)
  loaded from a **local** checkpoint; :class:`SegmentNucleid` wraps either as a dictionary transform.
* :func:`mask_iou`, :func:`mask_dice`, :func:`mask_agreement` (matched pairs versus a shuffled pairing) and
  :func:`nucleus_areas` for the evaluation of generated tiles.
* :func:`class_index_mask`, :class:`OneHotMaskd`, :class:`MaskClassAblationd`: a mask file with known class values
  (e.g. 0 = background, 255 = nucleus) -> one-hot channels for mask-guided diffusion, and the per-sample class
  ablation of segmentation-guided diffusion (ablated classes become background).
* :func:`load_masks` (mask files -> one-hot batch), :func:`mask_files_from_datalist` (the masks of a datalist
  section with their class labels), :func:`mask_preview` (one-hot -> grey RGB for display).

Arrays follow MONAI's layout: images ``(3, W, H)``, masks ``(1, W, H)`` or ``(W, H)``; label images are ``(W, H)``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from scipy import ndimage

from ..errors import BreastGenError
from .transforms import source_of

__all__ = ["hematoxylin", "segment_nuclei", "NucleiSegmenter", "SegmentNucleid", "nucleus_areas", "mask_iou",
           "mask_dice", "mask_agreement", "derangement", "class_index_mask", "OneHotMaskd", "MaskClassAblationd",
           "load_masks", "mask_files_from_datalist", "mask_preview"]


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _rgb_unit(image: Any, src: str | None = None) -> np.ndarray:
    """Channel-first RGB (3, W, H), uint8 range or float [0, 1] -> float64 (W, H, 3) in [0, 1]."""
    a = _numpy(image)
    if a.ndim != 3 or a.shape[0] != 3:
        raise BreastGenError(f"nuclei segmentation expects an RGB tile (3, W, H), got shape {tuple(a.shape)}", src)
    a = np.moveaxis(a.astype(np.float64), 0, -1)
    if a.max(initial=0.0) > 1.0 + 1e-6:
        a = a / 255.0
    return np.clip(a, 0.0, 1.0)


def hematoxylin(image: Any) -> np.ndarray:
    """Haematoxylin concentration (W, H) of an RGB tile by colour deconvolution (``rgb2hed``)."""
    from skimage.color import rgb2hed

    return rgb2hed(_rgb_unit(image, source_of(image)))[..., 0]


def _remove_small(fg: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 1:
        return fg
    lab, n = ndimage.label(fg)
    if n == 0:
        return fg
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[lab]


def _split_touching(fg: np.ndarray, min_distance: int) -> np.ndarray:
    """Instance labels of a binary mask: watershed of the distance transform from one marker per maximum plateau."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    components, n = ndimage.label(fg)
    if n == 0:
        return components.astype(np.int32)
    dist = ndimage.distance_transform_edt(fg)
    peaks = peak_local_max(dist, min_distance=max(1, int(min_distance)), labels=components, exclude_border=False)
    peak_mask = np.zeros(fg.shape, bool)
    peak_mask[tuple(peaks.T)] = True
    markers, n_markers = ndimage.label(peak_mask)  # a flat maximum (plateau) is one marker, not several
    missed = np.setdiff1d(np.arange(1, n + 1), np.unique(components[peak_mask]))
    for k, comp in enumerate(missed, start=1):  # every component gets at least one marker
        markers[components == comp] = n_markers + k
    return watershed(-dist, markers, mask=fg).astype(np.int32)


def segment_nuclei(image: Any, threshold: float | None = None, min_threshold: float = 0.03, max_threshold: float = 0.08,
                   sigma: float = 1.0, min_size: int = 4, min_distance: int = 3, split: bool = True) -> np.ndarray:
    """Instance labels (W, H) int32 of the nuclei of an RGB tile (3, W, H): 0 background, 1..n nuclei.

    Args:
        image: channel-first RGB, uint8 range (0..255) or float in [0, 1].
        threshold: haematoxylin threshold; None: Otsu on the tile (computed on the channel capped at
            ``2 * max_threshold``, so that a few near-black pixels do not pull it up), clamped to
            [``min_threshold``, ``max_threshold``] (so that a tile without nuclei does not get its stroma split into
            "nuclei", and a tile with very dark nuclei keeps the pale ones).
        min_threshold, max_threshold: bounds of the automatic threshold (``rgb2hed`` units; on the demo phantoms
            stroma is ~0.01 and nuclei 0.06 - 0.12; check them on a few real tiles of a new scanner).
        sigma: Gaussian smoothing (pixels) of the haematoxylin channel before thresholding; 0 disables it.
        min_size: objects smaller than this many pixels are removed.
        min_distance: minimal distance (pixels) between two nucleus centres for the watershed split.
        split: split touching nuclei by watershed (else connected components).
    """
    from skimage.filters import threshold_otsu

    h = hematoxylin(image)
    if sigma > 0:
        h = ndimage.gaussian_filter(h, float(sigma))
    if threshold is None:
        capped = np.minimum(h, 2.0 * max_threshold)
        t = threshold_otsu(capped) if float(capped.max()) > float(capped.min()) else max_threshold
        threshold = min(max(float(t), float(min_threshold)), float(max_threshold))
    fg = ndimage.binary_fill_holes(h > threshold)
    fg = _remove_small(fg, int(min_size))
    if not split:
        return ndimage.label(fg)[0].astype(np.int32)
    return _split_touching(fg, min_distance)


class NucleiSegmenter:
    """Nuclei instance segmentation of RGB tiles, ``segmenter(image (3, W, H)) -> labels (W, H)``.

    ``method="classical"`` (default, no weights) runs :func:`segment_nuclei` with ``options``.
    ``method="network"`` runs ``network`` (any MONAI 2D segmentation network taking RGB in [0, 1]; 1 output channel
    = nucleus logit, or 2+ channels with channel 1 = nucleus after softmax), loaded from the local ``checkpoint``
    (a state dict, or a dict with ``checkpoint_key``), thresholds the probability at ``prob_threshold`` and splits
    touching nuclei with the same watershed (``min_size``, ``min_distance``, ``split`` from ``options``).
    """

    def __init__(self, method: str = "classical", network: torch.nn.Module | None = None,
                 checkpoint: str | os.PathLike | None = None, checkpoint_key: str = "model",
                 prob_threshold: float = 0.5, device: str | torch.device = "cpu", **options: Any):
        if method not in ("classical", "network"):
            raise BreastGenError(f"unknown nuclei segmentation method {method!r}; allowed: 'classical', 'network'")
        known = {"threshold", "min_threshold", "max_threshold", "sigma", "min_size", "min_distance", "split"}
        if set(options) - known:
            raise BreastGenError(f"unknown nuclei segmentation option(s) {sorted(set(options) - known)}; "
                                 f"allowed: {sorted(known)}")
        self.method, self.options, self.prob_threshold = method, options, float(prob_threshold)
        self.device = torch.device(device)
        self.network = None
        if method == "network":
            if network is None or not checkpoint:
                raise BreastGenError("nuclei segmentation method 'network' needs a network and a local checkpoint")
            from ..engines.checkpoints import load_checkpoint

            load_checkpoint(checkpoint, {checkpoint_key: network}, map_location=self.device)
            self.network = network.to(self.device).eval()

    @torch.no_grad()
    def probability(self, image: Any) -> np.ndarray:
        x = torch.from_numpy(np.moveaxis(_rgb_unit(image, source_of(image)), -1, 0)).float()[None].to(self.device)
        out = self.network(x).float()
        prob = torch.sigmoid(out[:, 0]) if out.shape[1] == 1 else torch.softmax(out, dim=1)[:, 1]
        return prob[0].cpu().numpy()

    def __call__(self, image: Any) -> np.ndarray:
        if self.method == "classical":
            return segment_nuclei(image, **self.options)
        fg = ndimage.binary_fill_holes(self.probability(image) > self.prob_threshold)
        fg = _remove_small(fg, int(self.options.get("min_size", 4)))
        if not self.options.get("split", True):
            return ndimage.label(fg)[0].astype(np.int32)
        return _split_touching(fg, int(self.options.get("min_distance", 3)))


class SegmentNucleid(MapTransform):
    """``output_key`` = nuclei of ``keys`` (RGB (3, W, H)) as a (1, W, H) tensor: instance labels, or 0/1 with
    ``binary=True``. ``segmenter`` defaults to the classical :class:`NucleiSegmenter`."""

    def __init__(self, keys: KeysCollection = "image", output_key: str = "nuclei", segmenter: Any = None,
                 binary: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.output_key, self.binary = output_key, binary
        self.segmenter = segmenter if segmenter is not None else NucleiSegmenter()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            labels = self.segmenter(d[key])
            out = torch.from_numpy((labels > 0).astype(np.uint8) if self.binary else labels)[None]
            d[self.output_key if len(self.keys) == 1 else f"{key}_{self.output_key}"] = out
        return d


# --------------------------------------------------------------------------------------------- mask statistics
def nucleus_areas(labels: Any) -> np.ndarray:
    """Pixel areas of the instances 1..n of a label image (any shape); empty array without nuclei."""
    lab = _numpy(labels).astype(np.int64).ravel()
    if lab.size == 0 or lab.max(initial=0) == 0:
        return np.zeros(0, np.int64)
    counts = np.bincount(lab)[1:]
    return counts[counts > 0]


def _binary_pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = _numpy(a) > 0, _numpy(b) > 0
    x, y = np.squeeze(x), np.squeeze(y)
    if x.shape != y.shape:
        raise BreastGenError(f"cannot compare masks of shapes {x.shape} and {y.shape}")
    return x, y


def mask_iou(a: Any, b: Any) -> float:
    """Intersection over union of two masks (non-zero = foreground); 1.0 when both are empty."""
    x, y = _binary_pair(a, b)
    union = np.logical_or(x, y).sum()
    return 1.0 if union == 0 else float(np.logical_and(x, y).sum() / union)


def mask_dice(a: Any, b: Any) -> float:
    """Dice coefficient of two masks (non-zero = foreground); 1.0 when both are empty."""
    x, y = _binary_pair(a, b)
    total = x.sum() + y.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(x, y).sum() / total)


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A random permutation of range(n) without fixed points (n >= 2)."""
    if n < 2:
        raise BreastGenError(f"a shuffled pairing needs at least 2 masks, got {n}")
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


def mask_agreement(input_masks: Sequence[Any], segmented: Sequence[Any], seed: int = 0) -> dict[str, float]:
    """Mean IoU / Dice of ``segmented[i]`` with its own ``input_masks[i]`` and, as the chance level, with the
    input mask of another sample (a random derangement): ``iou``, ``dice``, ``iou_shuffled``, ``dice_shuffled``."""
    if len(input_masks) != len(segmented):
        raise BreastGenError(f"{len(input_masks)} input masks but {len(segmented)} segmented masks")
    n = len(input_masks)
    perm = derangement(n, seed)
    out = {"iou": float(np.mean([mask_iou(m, s) for m, s in zip(input_masks, segmented)])),
           "dice": float(np.mean([mask_dice(m, s) for m, s in zip(input_masks, segmented)])),
           "iou_shuffled": float(np.mean([mask_iou(input_masks[perm[i]], segmented[i]) for i in range(n)])),
           "dice_shuffled": float(np.mean([mask_dice(input_masks[perm[i]], segmented[i]) for i in range(n)]))}
    return out


# ------------------------------------------------------------------------------------------------- class masks
def class_index_mask(mask: Any, values: Sequence[int], src: str | None = None) -> np.ndarray:
    """Class indices (same shape, int64) of a mask whose pixel values are ``values`` (value ``values[k]`` -> class
    ``k``); any other value is an error naming the file (e.g. a 0/255 mask read with values [0, 1])."""
    a = _numpy(mask)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise BreastGenError("mask contains NaN or infinite values", src)
    vals = np.asarray(list(values), dtype=np.float64)
    if len(vals) < 2 or len(np.unique(vals)) != len(vals):
        raise BreastGenError(f"mask values must list at least 2 distinct class values, got {list(values)}")
    present = np.unique(a)
    unknown = [v for v in present.tolist() if not np.isclose(vals, v).any()]
    if unknown:
        shown = ", ".join(f"{v:g}" for v in unknown[:6]) + (" ..." if len(unknown) > 6 else "")
        raise BreastGenError(f"mask has values {shown} that are not known classes (mask values "
                             f"{', '.join(f'{v:g}' for v in vals)} = classes 0..{len(vals) - 1})", src)
    out = np.zeros(a.shape, np.int64)
    for k, v in enumerate(vals):
        out[np.isclose(a, v)] = k
    return out


class OneHotMaskd(MapTransform):
    """A class mask (1, W, H) with pixel values ``values`` -> one-hot float channels (len(values), W, H).

    Unknown pixel values raise (one line, naming the file). ``spatial_size`` resizes the one-hot channels with area
    interpolation and re-hardens them by argmax (a nucleus covering most of a coarse pixel keeps it). ``ref_key``
    (default "image") must have the mask's spatial size *before* resizing: a mismatch is an error too.
    """

    def __init__(self, keys: KeysCollection = "mask", values: Sequence[int] = (0, 255),
                 spatial_size: int | Sequence[int] | None = None, ref_key: str | None = "image",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.values = [float(v) for v in values]
        class_index_mask(np.zeros(1), self.values)  # validates the value list itself
        if spatial_size is not None and not isinstance(spatial_size, Sequence):
            spatial_size = (int(spatial_size), int(spatial_size))
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in spatial_size)
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            m = d[key]
            src = source_of(m)
            shape = tuple(np.shape(m))
            if len(shape) == 3 and shape[0] != 1:
                raise BreastGenError(f"a class mask has one channel, got shape {shape} (an RGB file?)", src)
            if self.ref_key is not None and self.ref_key in d and self.ref_key != key:
                ref = d[self.ref_key]
                if tuple(np.shape(ref))[-2:] != shape[-2:]:
                    raise BreastGenError(f"mask size {shape[-2:]} differs from image size {tuple(np.shape(ref))[-2:]} "
                                         f"of {source_of(ref)} (sizes are W x H)", src)
            idx = torch.from_numpy(class_index_mask(np.reshape(_numpy(m), shape[-2:]), self.values, src))
            onehot = F.one_hot(idx, len(self.values)).permute(2, 0, 1).float()
            if self.spatial_size is not None and tuple(onehot.shape[1:]) != self.spatial_size:
                soft = F.interpolate(onehot[None], size=self.spatial_size, mode="area")[0]
                onehot = F.one_hot(soft.argmax(0), len(self.values)).permute(2, 0, 1).float()
            d[key] = MetaTensor(onehot, meta=dict(m.meta)) if isinstance(m, MetaTensor) else onehot
        return d


class MaskClassAblationd(Randomizable, MapTransform):
    """Per-sample class ablation of one-hot masks (segmentation-guided diffusion): with probability ``prob`` a
    random non-empty subset of the foreground classes present in the mask is removed (its pixels become
    ``background``), so the model also learns to generate from incomplete masks."""

    def __init__(self, keys: KeysCollection = "mask", prob: float = 0.5, background: int = 0,
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        if not 0.0 <= prob <= 1.0:
            raise BreastGenError(f"class ablation probability must be in [0, 1], got {prob}")
        self.prob, self.background = float(prob), int(background)
        self._draw = 1.0
        self._choice = np.zeros(0)

    def randomize(self, data: Any = None) -> None:
        self._draw = self.R.random()
        self._choice = self.R.random(64)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        self.randomize()
        if self._draw >= self.prob:
            return d
        for key in self.key_iterator(d):
            m = torch.as_tensor(d[key]).clone()
            present = [c for c in range(m.shape[0]) if c != self.background and bool(m[c].any())]
            if not present:
                continue
            drop = [c for c, u in zip(present, self._choice) if u < 0.5]
            drop = drop or [present[int(self._choice[-1] * len(present))]]  # a non-empty subset
            for c in drop:
                m[self.background] += m[c]
                m[c] = 0
            d[key] = MetaTensor(m, meta=dict(d[key].meta)) if isinstance(d[key], MetaTensor) else m
        return d


# ------------------------------------------------------------------------------------------------- mask files
def load_masks(paths: Sequence[str | os.PathLike], values: Sequence[int], image_size: int) -> torch.Tensor:
    """Mask files -> one-hot (N, len(values), S, S) (:class:`OneHotMaskd`, resized to ``image_size``). Unknown pixel
    values, RGB or non-square masks and unreadable files are one-line errors naming the file."""
    from .readers import load_image

    onehot = OneHotMaskd("mask", values=values, spatial_size=image_size, ref_key=None)
    out = []
    for p in paths:
        arr, _ = load_image(p, modalities=None, allow_constant=True)
        if arr.ndim != 2:
            raise BreastGenError(f"a mask has one grey channel, got shape {arr.shape} (W x H x C)", p)
        if arr.shape[0] != arr.shape[1]:
            raise BreastGenError(f"mask is {arr.shape[0]} x {arr.shape[1]} (W x H); the model makes square "
                                 f"{image_size} x {image_size} tiles", p)
        m = MetaTensor(torch.as_tensor(arr)[None], meta={"filename_or_obj": str(p)})
        out.append(torch.as_tensor(onehot({"mask": m})["mask"]).as_subclass(torch.Tensor))
    if not out:
        raise BreastGenError("no mask given for mask-guided generation")
    return torch.stack(out)


def mask_files_from_datalist(entries: Sequence[Mapping], n: int | None = None) -> tuple[list[str], list[int | None]]:
    """(mask paths, class labels) of the first ``n`` (all for None) datalist entries that have a ``mask``."""
    picked = [e for e in entries if e.get("mask")][: None if n is None else int(n)]
    if not picked:
        raise BreastGenError("the datalist section has no entry with a 'mask'")
    return [str(e["mask"]) for e in picked], [None if e.get("label") is None else int(e["label"]) for e in picked]


def mask_preview(onehot: Any) -> torch.Tensor:
    """One-hot (C, W, H) -> RGB (3, W, H) in [0, 1] for display: background black, class k grey level k / (C - 1)."""
    idx = torch.as_tensor(onehot).argmax(0).float()
    return (idx / max(1, onehot.shape[0] - 1))[None].expand(3, -1, -1)
