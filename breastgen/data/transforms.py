"""Mammography transforms (MONAI style: array and dictionary versions, invertible where geometry changes).

Array convention (MONAI's): channel-first ``(C, W, H)``; spatial axis 0 is x (columns, left to right), axis 1 is
y (rows, top to bottom). Boxes are ``[x0, y0, x1, y1]`` in pixels, half-open, shape ``(4,)`` or ``(N, 4)`` --
MONAI's ``xyxy`` box mode for 2D. Laterality convention: a left breast ('L') is displayed with its chest wall
on the image's left (x = 0), a right breast ('R') with its chest wall on the right.

Geometric transforms run MONAI's own ``Flip``, ``Resize``, ``SpatialCrop`` and ``Pad`` (so the affine and the
applied-operations trace stay right) and record them as one invertible step; boxes follow the same geometry.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Flip, InvertibleTransform, MapTransform, Pad, Resize, SpatialCrop, Transform
from monai.utils import TraceKeys, convert_to_tensor
from scipy import ndimage

from ..errors import BreastGenError
from ..prompts import area_class, build_prompt, density_word, vendor_word

__all__ = [
    "source_of", "check_image", "ScaleIntensityMammo", "ScaleIntensityMammod", "laterality_from_meta",
    "laterality_from_filename", "laterality_from_image", "FlipToLaterality", "FlipToLateralityd",
    "ResizeToSquare", "ResizeToSquared", "breast_mask", "BreastMaskd", "MammoPromptd", "ValidateMaskd",
    "ValidateBoxesd", "flip_boxes", "resize_boxes", "as_boxes", "box_from_mask",
]


# ----------------------------------------------------------------------------------------------- helpers
def source_of(img: Any, meta: Mapping | None = None) -> str | None:
    """The file an image came from (MONAI's ``filename_or_obj`` meta key), for error messages."""
    meta = meta if meta is not None else getattr(img, "meta", None) or {}
    src = meta.get("filename_or_obj")
    return None if src is None else str(src)


def check_image(img: torch.Tensor | np.ndarray, src: str | None = None, allow_constant: bool = False) -> None:
    """Raise BreastGenError (naming ``src``) for an empty, non-finite or (unless allowed) constant image."""
    t = torch.as_tensor(img)
    if t.numel() == 0:
        raise BreastGenError("empty image (zero pixels)", src)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise BreastGenError("image contains NaN or infinite values", src)
    if not allow_constant and bool(t.max() == t.min()):
        raise BreastGenError(f"constant image (every pixel is {t.flatten()[0].item():g})", src)


def as_boxes(boxes: Any, src: str | None = None) -> np.ndarray:
    """Boxes as a float64 (N, 4) array; accepts one box (4,) or (N, 4); checks x0 <= x1 and y0 <= y1."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim == 1:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4 or not np.isfinite(b).all():
        raise BreastGenError(f"bbox must be [x0, y0, x1, y1] (or a list of them), got {np.asarray(boxes).tolist()}", src)
    if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise BreastGenError(f"bbox corners out of order (need x0 <= x1, y0 <= y1): {b.tolist()}", src)
    return b


def _restore_box_shape(new: np.ndarray, like: Any) -> np.ndarray:
    return new[0] if np.asarray(like).ndim == 1 else new


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror (N, 4) boxes left-right in an image of the given width (spatial axis 0)."""
    out = boxes.copy()
    out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return out


def resize_boxes(boxes: np.ndarray, old_size: Sequence[int], new_size: Sequence[int]) -> np.ndarray:
    sx, sy = new_size[0] / old_size[0], new_size[1] / old_size[1]
    return boxes * np.array([sx, sy, sx, sy])


def box_from_mask(mask: Any) -> np.ndarray | None:
    """Tight half-open box [x0, y0, x1, y1] of the non-zero pixels of a (W, H) or (1, W, H) mask, or None."""
    m = np.asarray(mask)
    m = m[0] if m.ndim == 3 else m
    xs, ys = np.nonzero(m)
    if xs.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def _to_meta_tensor(img: Any) -> MetaTensor:
    out = convert_to_tensor(img, track_meta=True)
    return out if isinstance(out, MetaTensor) else MetaTensor(out)


class _GroupedGeometry(InvertibleTransform):
    """Runs several MONAI invertible transforms and records them as one traced step of this transform."""

    _inverters = {"Flip": Flip(spatial_axis=0), "Resize": Resize(spatial_size=1), "SpatialCrop": SpatialCrop(roi_start=0, roi_end=1),
                  "Pad": Pad()}

    def _run(self, img: MetaTensor, ops: Sequence[Transform], extra: dict) -> MetaTensor:
        n0 = len(img.applied_operations)
        orig_size = tuple(img.shape[1:])
        out = img
        for op in ops:
            out = op(out)
        inner = list(out.applied_operations[n0:])
        del out.applied_operations[n0:]
        for rec in inner:  # replayed by fresh instances in inverse()
            rec[TraceKeys.ID] = TraceKeys.NONE
        self.push_transform(out, orig_size=orig_size, extra_info={**extra, "inner": inner})
        return out

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        rec = self.pop_transform(data)
        for op in reversed(rec[TraceKeys.EXTRA_INFO]["inner"]):
            data.applied_operations.append(op)
            data = self._inverters[op[TraceKeys.CLASS_NAME]].inverse(data)
        return data


# ------------------------------------------------------------------------------------------- intensity
class ScaleIntensityMammo(Transform):
    """Scale a mammogram to float32 in [0, 1] with no 8-bit step in between.

    ``mode``: ``"percentile"`` (default) maps the ``lower``/``upper`` percentiles to 0/1 and clips (robust to
    burnt-in markers); ``"minmax"``; ``"bits"`` divides by ``2**BitsStored - 1`` from the DICOM meta data (keeps
    absolute intensities comparable across images of one detector). Non-finite or constant images raise.
    """

    def __init__(self, mode: str = "percentile", lower: float = 0.0, upper: float = 99.9, allow_constant: bool = False,
                 max_samples: int = 1 << 20):
        if mode not in ("percentile", "minmax", "bits"):
            raise BreastGenError(f"unknown intensity mode {mode!r}; allowed: 'percentile', 'minmax', 'bits'")
        self.mode, self.lower, self.upper = mode, lower, upper
        self.allow_constant, self.max_samples = allow_constant, max_samples

    def _bounds(self, t: torch.Tensor, meta: Mapping) -> tuple[float, float]:
        if self.mode == "bits":
            bits = int(meta.get("BitsStored") or 16)
            return 0.0, float(2**bits - 1)
        if self.mode == "minmax" or (self.lower <= 0 and self.upper >= 100):
            return float(t.min()), float(t.max())
        flat = t.reshape(-1)
        step = max(1, flat.numel() // self.max_samples)  # a strided sample is plenty for percentiles
        sample = flat[::step].cpu().numpy()
        lo, hi = np.percentile(sample, [self.lower, self.upper])  # partition-based: ~10x faster than torch.quantile
        return float(lo), float(hi)

    def __call__(self, img: Any) -> torch.Tensor:
        meta = getattr(img, "meta", {}) or {}
        src = source_of(img, meta)
        t = torch.as_tensor(img)
        check_image(t, src, self.allow_constant)
        lo, hi = self._bounds(t, meta)
        out = t.float() if t.dtype != torch.float32 else t.clone()
        if hi > lo:
            out = out.sub_(lo).div_(hi - lo).clamp_(0.0, 1.0)
        else:
            out.zero_()
        if isinstance(img, MetaTensor):
            out = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
            out.meta["intensity_range"] = [lo, hi]
        return out


class ScaleIntensityMammod(MapTransform):
    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.scaler = ScaleIntensityMammo(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key])
        return d


# ------------------------------------------------------------------------------------------ laterality
_LAT_TOKENS = {"L": "L", "LEFT": "L", "LCC": "L", "LMLO": "L", "LML": "L",
               "R": "R", "RIGHT": "R", "RCC": "R", "RMLO": "R", "RML": "R"}


def laterality_from_meta(meta: Mapping) -> str | None:
    for key in ("ImageLaterality", "laterality", "Laterality"):
        v = meta.get(key)
        if isinstance(v, str) and v.strip().upper() in ("L", "R"):
            return v.strip().upper()
    return None


def laterality_from_filename(name: Any) -> str | None:
    """'Mass-Training_P_00001_LEFT_CC', '..._MG_R_ML_ANON.dcm', 'lcc.png' -> 'L' / 'R' (None if unsure)."""
    if name is None:
        return None
    tokens = re.split(r"[_\-.\s/\\]+", Path(str(name)).name.upper())
    found = {_LAT_TOKENS[t] for t in tokens if t in _LAT_TOKENS}
    return found.pop() if len(found) == 1 else None


def laterality_from_image(img: Any) -> str:
    """Chest wall = the heavier half of the image: left half heavier -> 'L' (left breast), else 'R'."""
    t = torch.as_tensor(img).float()
    t = t[0] if t.ndim == 3 else t
    w = t.shape[0]
    return "L" if float(t[: w // 2].sum()) >= float(t[w - w // 2:].sum()) else "R"


class FlipToLaterality(_GroupedGeometry):
    """Mirror images so that every breast has the ``target`` laterality's orientation (MAM-E flips R to L).

    The source laterality comes, in order, from an explicit argument, the meta data (DICOM ImageLaterality /
    Laterality), the filename convention, and last an intensity heuristic (the chest wall is the heavier side).
    ``method="image"`` always uses the heuristic (robust to files whose orientation does not match their tag).
    """

    def __init__(self, target: str = "L", method: str = "auto"):
        if target not in ("L", "R"):
            raise BreastGenError(f"unknown laterality {target!r}; allowed: 'L', 'R'")
        if method not in ("auto", "image"):
            raise BreastGenError(f"unknown laterality method {method!r}; allowed: 'auto', 'image'")
        self.target, self.method = target, method

    def resolve(self, img: Any, laterality: str | None = None) -> tuple[str, str]:
        meta = getattr(img, "meta", {}) or {}
        if laterality is not None and str(laterality).upper() in ("L", "R"):
            return str(laterality).upper(), "given"
        if self.method == "auto":
            lat = laterality_from_meta(meta)
            if lat:
                return lat, "meta"
            lat = laterality_from_filename(meta.get("filename_or_obj"))
            if lat:
                return lat, "filename"
        return laterality_from_image(img), "image"

    def __call__(self, img: Any, laterality: str | None = None, flip: bool | None = None) -> MetaTensor:
        img = _to_meta_tensor(img)
        if flip is None:
            lat, how = self.resolve(img, laterality)
            flip = lat != self.target
            img.meta["source_laterality"], img.meta["laterality_source"] = lat, how
        ops = [Flip(spatial_axis=0)] if flip else []
        out = self._run(img, ops, {"flipped": bool(flip)})
        out.meta["laterality"] = self.target
        out.meta["flipped"] = bool(flip)
        return out


class FlipToLateralityd(MapTransform, InvertibleTransform):
    """Dictionary version: decides on ``ref_key`` (default: first key) and flips every key and box key alike.

    ``laterality_key`` names an optional datalist field ('L'/'R') that overrides the meta data.
    """

    def __init__(self, keys: KeysCollection, box_keys: KeysCollection = (), ref_key: str | None = None,
                 laterality_key: str | None = "laterality", target: str = "L", method: str = "auto",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.box_keys = tuple([box_keys] if isinstance(box_keys, str) else box_keys)
        self.ref_key = ref_key or self.keys[0]
        self.laterality_key = laterality_key
        self.flipper = FlipToLaterality(target, method)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        ref = _to_meta_tensor(d[self.ref_key])
        lat, how = self.flipper.resolve(ref, d.get(self.laterality_key) if self.laterality_key else None)
        flip = lat != self.flipper.target
        for key in self.key_iterator(d):
            d[key] = self.flipper(d[key], flip=flip)
            d[key].meta["source_laterality"], d[key].meta["laterality_source"] = lat, how
        width = ref.shape[1]
        for key in self.box_keys:
            if key in d and d[key] is not None and flip:
                b = as_boxes(d[key], source_of(ref))
                d[key] = _restore_box_shape(flip_boxes(b, width), d[key])
        if self.laterality_key:
            d[self.laterality_key] = self.flipper.target
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.flipper.inverse(d[key])
        return d


# ---------------------------------------------------------------------------------------------- resize
class ResizeToSquare(_GroupedGeometry):
    """Resize keeping the aspect ratio, then crop or pad to ``size`` x ``size``.

    ``fit="crop"``: the shorter side becomes ``size`` and the longer is centre-cropped; ``fit="pad"``: the longer
    side becomes ``size`` and the shorter is padded with zeros. ``anchor_x="start"`` crops/pads x at the far end
    only, keeping x = 0 (the chest wall after flipping to 'L') in place; ``"center"`` splits evenly.
    ``mode`` is the interpolation: ``"area"`` (anti-aliased, for images) or ``"nearest-exact"`` (for masks).
    """

    def __init__(self, size: int = 512, fit: str = "crop", mode: str = "area", anchor_x: str = "center"):
        if fit not in ("crop", "pad"):
            raise BreastGenError(f"unknown fit {fit!r}; allowed: 'crop', 'pad'")
        if anchor_x not in ("center", "start"):
            raise BreastGenError(f"unknown anchor_x {anchor_x!r}; allowed: 'center', 'start'")
        self.size, self.fit, self.mode, self.anchor_x = int(size), fit, mode, anchor_x

    def plan(self, spatial: Sequence[int]) -> dict:
        """Resized size and per-axis (crop start, pad before, pad after) for an input of ``spatial`` size."""
        w, h = int(spatial[0]), int(spatial[1])
        s = self.size / (min(w, h) if self.fit == "crop" else max(w, h))
        new = [max(1, round(w * s)), max(1, round(h * s))]
        if self.fit == "crop":  # the short side must come out exactly `size`
            new[int(w > h)] = self.size
        else:
            new[int(h > w)] = self.size
        crop, pad = [0, 0], [(0, 0), (0, 0)]
        for ax, n in enumerate(new):
            start_anchor = ax == 0 and self.anchor_x == "start"
            if n > self.size:
                crop[ax] = 0 if start_anchor else (n - self.size) // 2
            elif n < self.size:
                before = 0 if start_anchor else (self.size - n) // 2
                pad[ax] = (before, self.size - n - before)
        return {"resized": new, "crop_start": crop, "pad": pad}

    def __call__(self, img: Any, mode: str | None = None) -> MetaTensor:
        img = _to_meta_tensor(img)
        p = self.plan(img.shape[1:])
        mode = mode or self.mode
        ops: list[Transform] = []
        if list(p["resized"]) != list(img.shape[1:]):
            ops.append(Resize(spatial_size=p["resized"], mode=mode,
                              anti_aliasing=False, dtype=torch.float32 if mode == "area" else None))
        if any(n > self.size for n in p["resized"]):
            start = p["crop_start"]
            ops.append(SpatialCrop(roi_start=start, roi_end=[start[0] + min(self.size, p["resized"][0]),
                                                             start[1] + min(self.size, p["resized"][1])]))
        if any(sum(pp) for pp in p["pad"]):
            ops.append(Pad(to_pad=[(0, 0), *p["pad"]]))
        return self._run(img, ops, {"plan": p})

    def boxes(self, boxes: np.ndarray, spatial: Sequence[int]) -> np.ndarray:
        """The same geometry for (N, 4) boxes, clipped to the output square."""
        p = self.plan(spatial)
        b = resize_boxes(boxes, spatial, p["resized"])
        shift = np.array([p["pad"][0][0] - p["crop_start"][0], p["pad"][1][0] - p["crop_start"][1]], dtype=np.float64)
        b = b + np.concatenate([shift, shift])
        return np.clip(b, 0, self.size)


class ResizeToSquared(MapTransform, InvertibleTransform):
    """Dictionary version; ``mode`` may be one value or one per key (e.g. ``["area", "nearest-exact"]``).

    ``box_keys`` follow the geometry of ``ref_key`` (default: first key).
    """

    def __init__(self, keys: KeysCollection, size: int = 512, fit: str = "crop", mode: str | Sequence[str] = "area",
                 anchor_x: str = "center", box_keys: KeysCollection = (), ref_key: str | None = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(modes) != len(self.keys):
            raise BreastGenError(f"ResizeToSquared: {len(modes)} modes for {len(self.keys)} keys")
        self.modes = dict(zip(self.keys, modes))
        self.box_keys = tuple([box_keys] if isinstance(box_keys, str) else box_keys)
        self.ref_key = ref_key or self.keys[0]
        self.resizer = ResizeToSquare(size, fit, modes[0], anchor_x)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        spatial = tuple(d[self.ref_key].shape[1:])
        src = source_of(d[self.ref_key])
        for key in self.box_keys:
            if key in d and d[key] is not None:
                d[key] = _restore_box_shape(self.resizer.boxes(as_boxes(d[key], src), spatial), d[key])
        for key in self.key_iterator(d):
            d[key] = self.resizer(d[key], mode=self.modes[key])
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resizer.inverse(d[key])
        return d


# ------------------------------------------------------------------------------- breast mask and area
def breast_mask(img: Any, threshold: float | None = None) -> np.ndarray:
    """Boolean breast mask of a (W, H) or (1, W, H) mammogram: threshold, the largest connected component
    (drops burnt-in labels and markers), holes filled.

    The default threshold is Otsu's, capped at 10 % of the robust intensity range: on images whose tissue is
    itself bimodal (bright pectoral muscle or dense tissue over dark fat) Otsu alone splits the tissue instead
    of tissue from background. ``threshold`` sets it explicitly (same units as the image)."""
    from skimage.filters import threshold_otsu

    a = np.asarray(img, dtype=np.float32)
    a = a[0] if a.ndim == 3 else a
    if a.max() <= a.min():
        return np.zeros(a.shape, dtype=bool)
    if threshold is None:
        sample = a[::2, ::2] if a.size > 1 << 18 else a
        lo, hi = np.percentile(sample, [1.0, 99.5])
        thr = min(float(threshold_otsu(sample)), float(lo + 0.1 * (hi - lo)))
    else:
        thr = float(threshold)
    fg = a > thr
    labels, n = ndimage.label(fg)
    if n == 0:
        return fg
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(sizes.argmax()))


class BreastMaskd(MapTransform):
    """Adds ``mask_key`` (the breast mask, 1 x W x H uint8), ``ratio_key`` (breast pixels / all pixels) and
    ``area_key`` (MAM-E's 'small' / 'medium' / 'big') computed from image ``keys[0]``."""

    def __init__(self, keys: KeysCollection, mask_key: str | None = "breast_mask", ratio_key: str = "breast_area_ratio",
                 area_key: str | None = "area", threshold: float | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key, self.ratio_key, self.area_key, self.threshold = mask_key, ratio_key, area_key, threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        img = d[self.keys[0]]
        m = breast_mask(torch.as_tensor(img).cpu().numpy(), self.threshold)
        ratio = float(m.mean())
        if self.mask_key:
            mt = torch.from_numpy(m[None].astype(np.uint8))
            d[self.mask_key] = MetaTensor(mt, meta=dict(getattr(img, "meta", {}) or {})) if isinstance(img, MetaTensor) else mt
        d[self.ratio_key] = ratio
        if self.area_key:
            d[self.area_key] = area_class(ratio)
        return d


class MammoPromptd(MapTransform):
    """Builds the MAM-E prompt into ``prompt_key`` from datalist fields (vendor, view, density, area).

    A field that is missing (or None) is left out of the prompt; vendor also accepts a DICOM Manufacturer
    string, and density BI-RADS letters. The image meta data (ViewPosition, Manufacturer) fill gaps.
    """

    def __init__(self, keys: KeysCollection = "image", prompt_key: str = "prompt", vendor_key: str = "vendor",
                 view_key: str = "view", density_key: str = "density", area_key: str = "area",
                 overwrite: bool = False, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.prompt_key, self.overwrite = prompt_key, overwrite
        self.fields = {"vendor": vendor_key, "view": view_key, "density": density_key, "area": area_key}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if d.get(self.prompt_key) and not self.overwrite:
            return d
        meta = getattr(d.get(self.keys[0]), "meta", {}) or {}
        attrs = {name: d.get(key) for name, key in self.fields.items()}
        if attrs["vendor"] is None and meta.get("Manufacturer"):
            attrs["vendor"] = vendor_word(meta["Manufacturer"])
        elif attrs["vendor"] is not None:
            attrs["vendor"] = vendor_word(attrs["vendor"]) or attrs["vendor"]
        if attrs["view"] is None and str(meta.get("ViewPosition") or "").upper() in ("CC", "MLO"):
            attrs["view"] = str(meta["ViewPosition"]).upper()
        try:
            if attrs["density"] is not None:
                attrs["density"] = density_word(attrs["density"])
            d[self.prompt_key] = build_prompt(**attrs)
        except BreastGenError as e:
            raise BreastGenError(e.reason, source_of(d.get(self.keys[0]))) from None
        return d


# ---------------------------------------------------------------------------------------- validation
class ValidateMaskd(MapTransform):
    """Checks that every mask key has the spatial size of the image ``ref_key``; optionally non-empty."""

    def __init__(self, keys: KeysCollection, ref_key: str = "image", require_nonempty: bool = False,
                 allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.ref_key, self.require_nonempty = ref_key, require_nonempty

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        ref = data[self.ref_key]
        for key in self.key_iterator(data):
            m = data[key]
            src = source_of(m) or source_of(ref)
            if tuple(m.shape[-2:]) != tuple(ref.shape[-2:]):
                raise BreastGenError(f"mask size {tuple(m.shape[-2:])} differs from image size "
                                     f"{tuple(ref.shape[-2:])} of {source_of(ref)} (sizes are W x H)", src)
            if self.require_nonempty and not bool(torch.as_tensor(m).any()):
                raise BreastGenError("empty mask (no foreground pixel)", src)
        return dict(data)


class ValidateBoxesd(MapTransform):
    """Checks that every box of ``keys`` lies inside the image ``ref_key`` and has a positive area."""

    def __init__(self, keys: KeysCollection, ref_key: str = "image", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        ref = data[self.ref_key]
        w, h = ref.shape[-2:]
        src = source_of(ref)
        for key in self.key_iterator(data):
            if data[key] is None:
                continue
            b = as_boxes(data[key], src)
            if (b[:, 0] < 0).any() or (b[:, 1] < 0).any() or (b[:, 2] > w).any() or (b[:, 3] > h).any():
                raise BreastGenError(f"bbox {b.tolist()} lies outside the image (W x H = {w} x {h})", src)
            if ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) <= 0).any():
                raise BreastGenError(f"bbox {b.tolist()} has zero area", src)
        return dict(data)
