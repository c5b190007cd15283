"""Mammogram patches: sliding-window extraction labelled by ROI overlap, case readers for CBIS-DDSM, mini-MIAS
and datalists, and the lesion-mask tools of ciGAN synthesis (placement on breast tissue, noise corruption).

**Extraction** (seed paper): a ``size`` x ``size`` window slides with ``stride`` over each mammogram; a window is
kept when at least ``min_breast`` of it is breast (Otsu breast mask, :func:`breastgen.data.transforms.breast_mask`).
A kept window is

* a lesion patch (``benign`` / ``malignant``) when it holds at least ``min_lesion_overlap`` of an ROI -- overlap
  pixels / min(ROI area, window area), so that ROIs larger than the window count when they fill it -- labelled
  by the most severe such ROI;
* a ``normal`` patch when it touches no ROI at all;
* dropped otherwise (a sliver of a lesion is neither).

Window sums come from summed-area tables, so a full-field image costs a few passes over its pixels.
Intensities are scaled per image to [0, 1] (:class:`~breastgen.data.transforms.ScaleIntensityMammo`, percentile
0-99.9) before cropping; patches are written as 16-bit PNG with the patch's breast mask (only when the patch is
not all breast: no ``breast`` entry means every pixel is breast) and, for lesion patches, the lesion mask
(uint8 0/255). The datalist (``datalist.json``, sections training / validation / test)
records ``image``, ``breast``, ``mask`` (lesion patches), ``label``, ``source``, ``box`` ``[x0, y0, x1, y1]``
in the source image, ``breast_fraction`` and ``lesion_overlap``.

**Cases** come from :func:`cases_from_cbis_ddsm` (``*_case_description_*.csv``), :func:`cases_from_mias`
(mini-MIAS ``Info.txt``: y measured from the bottom) or :func:`cases_from_datalist` (entries with ``image``,
``label`` and, for lesions, ``mask``). An image with an unusable abnormality (unknown pathology, ROI file missing
or not a mask, ROI off the breast) is skipped as a whole -- its other windows could not be called normal -- and
:func:`extract_cases` carries on, returning what it skipped and why (one line each).

Arrays follow MONAI's convention: (W, H), axis 0 is x (columns), axis 1 is y (rows).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from scipy import ndimage

from ..errors import BreastGenError
from ..io.atomic import atomic_write_json
from .datalists import SECTIONS, read_datalist_json
from .readers import load_image
from .transforms import ScaleIntensityMammo, breast_mask

__all__ = [
    "CLASSES", "PATHOLOGIES", "lesion_label", "PatchSpec", "Case", "window_starts", "window_sums", "find_patches",
    "cases_from_datalist", "cases_from_cbis_ddsm", "cases_from_mias", "extract_cases", "ensure_patch_datalist",
    "check_mask_on_breast", "place_lesion_mask", "corrupt_with_noise", "load_mask_pool", "RandLesionMaskd",
    "class_counts", "balanced_sampler",
]
logger = logging.getLogger(__name__)

CLASSES = ("normal", "benign", "malignant")  # index = severity
PATHOLOGIES = ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK")  # CBIS-DDSM spelling
_LABEL_WORDS = {"normal": "normal", "norm": "normal", "benign": "benign", "benign_without_callback": "benign",
                "b": "benign", "malignant": "malignant", "m": "malignant"}
_IMAGE_EXTS = (".pgm", ".png", ".tif", ".tiff", ".dcm", ".jpg")


def lesion_label(value: Any, src: Any = None, what: str = "pathology") -> str:
    """'normal' / 'benign' / 'malignant' from CBIS-DDSM pathology (MALIGNANT, BENIGN, BENIGN_WITHOUT_CALLBACK),
    mini-MIAS severity (B, M) or a label word; anything else raises a one-line error."""
    key = re.sub(r"[\s-]+", "_", str(value).strip().lower())
    if key not in _LABEL_WORDS:
        raise BreastGenError(f"unknown {what} {str(value).strip()!r}; allowed: {', '.join(PATHOLOGIES)} "
                             "(or normal / benign / malignant)", src)
    return _LABEL_WORDS[key]


# ------------------------------------------------------------------------------------------------ windows
@dataclass(frozen=True)
class PatchSpec:
    """Extraction settings (paper: 256 / 128). ``max_normal_per_image`` keeps a random subset of normal windows."""

    size: int = 256
    stride: int = 128
    min_breast: float = 0.75
    min_lesion_overlap: float = 0.5
    max_normal_per_image: int | None = None
    seed: int = 0

    def __post_init__(self):
        if int(self.size) < 8 or int(self.stride) < 1:
            raise BreastGenError(f"patch size must be >= 8 and stride >= 1, not {self.size} / {self.stride}")
        if not (0 < self.min_breast <= 1 and 0 < self.min_lesion_overlap <= 1):
            raise BreastGenError("min_breast and min_lesion_overlap must lie in (0, 1]")

    def as_dict(self) -> dict:
        return {"size": int(self.size), "stride": int(self.stride), "min_breast": float(self.min_breast),
                "min_lesion_overlap": float(self.min_lesion_overlap),
                "max_normal_per_image": self.max_normal_per_image, "seed": int(self.seed)}


def window_starts(length: int, size: int, stride: int) -> np.ndarray:
    """Start offsets of windows of ``size`` with ``stride`` that fit in ``length`` (none if size > length)."""
    return np.arange(0, int(length) - int(size) + 1, int(stride), dtype=np.int64)


def _summed_area(a: np.ndarray) -> np.ndarray:
    sat = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.int64)
    np.cumsum(a, axis=0, dtype=np.int64, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
    return sat


def window_sums(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, size: int, stride: int | None = None) -> np.ndarray:
    """(len(xs), len(ys)) counts of ``mask`` pixels in the windows starting at (xs[i], ys[j]).

    With ``stride`` dividing ``size`` and the starts on the stride grid (sliding windows), the mask is summed in
    stride x stride blocks first (one pass, no full-size table); otherwise a summed-area table is used."""
    mask = np.asarray(mask, dtype=bool)
    x0, y0 = xs[:, None], ys[None, :]
    if stride and size % stride == 0 and len(xs) and len(ys) and not (xs % stride).any() and not (ys % stride).any():
        k = size // stride
        nx, ny = int(xs[-1]) // stride + k, int(ys[-1]) // stride + k
        blocks = mask[:nx * stride, :ny * stride].reshape(nx, stride, ny, stride).sum(axis=(1, 3), dtype=np.int64)
        sat = np.zeros((nx + 1, ny + 1), dtype=np.int64)
        sat[1:, 1:] = blocks.cumsum(0).cumsum(1)
        bx, by = x0 // stride, y0 // stride
        return sat[bx + k, by + k] - sat[bx, by + k] - sat[bx + k, by] + sat[bx, by]
    sat = _summed_area(mask)
    return sat[x0 + size, y0 + size] - sat[x0, y0 + size] - sat[x0 + size, y0] + sat[x0, y0]


def find_patches(breast: np.ndarray, rois: Sequence[tuple[np.ndarray, str]], spec: PatchSpec,
                 rng: np.random.Generator | None = None) -> list[dict]:
    """The windows to keep: dicts with ``x0``, ``y0``, ``label``, ``breast_fraction``, ``lesion_overlap`` and
    ``rois`` (indices of the ROIs inside). ``breast`` and the ROI masks are (W, H) bool arrays."""
    size = int(spec.size)
    xs, ys = window_starts(breast.shape[0], size, spec.stride), window_starts(breast.shape[1], size, spec.stride)
    if not len(xs) or not len(ys):
        return []
    area = float(size * size)
    frac = window_sums(breast, xs, ys, size, int(spec.stride)) / area
    keep = frac >= spec.min_breast
    severity = np.zeros(keep.shape, dtype=np.int64)  # 0 normal, 1 benign, 2 malignant
    best = np.zeros(keep.shape)
    touched = np.zeros(keep.shape, dtype=bool)
    inside: list[list[list[int]]] = [[[] for _ in ys] for _ in xs]
    for k, (roi, label) in enumerate(rois):
        overlap = window_sums(roi, xs, ys, size, int(spec.stride))
        touched |= overlap > 0
        ratio = overlap / max(1.0, min(float(roi.sum()), area))
        hit = ratio >= spec.min_lesion_overlap
        sev = CLASSES.index(label)
        severity = np.where(hit, np.maximum(severity, sev), severity)
        best = np.maximum(best, np.where(hit, ratio, 0.0))
        for i, j in zip(*np.nonzero(hit & keep)):
            inside[i][j].append(k)
    out, normals = [], []
    for i, j in zip(*np.nonzero(keep)):
        sev = int(severity[i, j])
        if sev == 0 and touched[i, j]:
            continue  # a sliver of a lesion: neither normal nor lesion
        rec = {"x0": int(xs[i]), "y0": int(ys[j]), "label": CLASSES[sev], "breast_fraction": round(float(frac[i, j]), 4),
               "lesion_overlap": round(float(best[i, j]), 4), "rois": inside[i][j]}
        (out if sev else normals).append(rec)
    if spec.max_normal_per_image is not None and len(normals) > spec.max_normal_per_image:
        rng = rng if rng is not None else np.random.default_rng(spec.seed)
        pick = np.sort(rng.choice(len(normals), int(spec.max_normal_per_image), replace=False))
        normals = [normals[p] for p in pick]
    return normals + out


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """One mammogram to cut into patches. ``rois`` are callables ``(image_shape_wh) -> (mask (W, H) bool, label)``;
    ``problem`` (set while reading the annotations) makes the extractor skip the case with that reason."""

    case_id: str
    image: str
    split: str = "training"
    rois: list[Callable[[tuple[int, int]], tuple[np.ndarray, str]]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    problem: str | None = None


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "case"


def _read_mask(path: str | Path, shape: tuple[int, int], what: str = "mask") -> np.ndarray:
    arr, _ = load_image(path, modalities=None, allow_constant=True)
    arr = arr.mean(axis=-1) if arr.ndim == 3 else arr
    if tuple(arr.shape) != tuple(shape):
        raise BreastGenError(f"{what} size {arr.shape[0]} x {arr.shape[1]} differs from the image size "
                             f"{shape[0]} x {shape[1]} (W x H)", path)
    return arr > 0


def cases_from_datalist(path: str | os.PathLike, sections: Sequence[str] = SECTIONS, label_key: str = "label",
                        mask_key: str = "mask", image_key: str = "image") -> list[Case]:
    """Cases from a MONAI datalist: ``image``, ``label`` (normal / benign / malignant or a pathology) and, for
    lesions, ``mask`` (a binary image of the same size; several masks as a list). Paths relative to the datalist."""
    path = Path(path)
    data = read_datalist_json(path)
    cases = []
    for section in sections:
        for i, entry in enumerate(data.get(section) or []):
            where = f"{section}[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get(image_key), str):
                cases.append(Case(where, "", section, problem=f"{where}: entry has no '{image_key}' path"))
                continue
            image = entry[image_key] if os.path.isabs(entry[image_key]) else str(path.parent / entry[image_key])
            case = Case(_safe_id(Path(entry[image_key]).stem), image, section,
                        meta={k: entry[k] for k in ("view", "laterality", "density", "vendor") if k in entry})
            try:
                label = lesion_label(entry.get(label_key, "normal"), what="label")
            except BreastGenError as e:
                case.problem = f"{where}: {e.reason}"
                cases.append(case)
                continue
            masks = entry.get(mask_key)
            masks = [masks] if isinstance(masks, str) else list(masks or [])
            if label != "normal" and not masks:
                case.problem = f"{where}: {label} case without a '{mask_key}' (lesion mask file)"
            elif label == "normal" and masks:
                case.problem = f"{where}: label 'normal' but a lesion mask is given"
            for m in masks:
                mp = m if os.path.isabs(m) else str(path.parent / m)
                case.rois.append(lambda shape, mp=mp, label=label: (_read_mask(mp, shape, "lesion mask"), label))
            cases.append(case)
    return cases


# CBIS-DDSM --------------------------------------------------------------------------------------
_CBIS_REQUIRED = ("pathology", "image file path", "roi mask file path", "cropped image file path")


def _clean_path(value: Any) -> str:
    """CBIS-DDSM path strings carry stray newlines / carriage returns and surrounding blanks."""
    text = re.sub(r"[\r\n]+", "", str(value or "")).strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return text


def _cbis_files(root: Path, rel: str) -> list[Path]:
    """The file ``rel`` under ``root``; when absent (TCIA downloads rename the inner folders), the DICOMs under
    the case folder named by its first component."""
    if not rel:
        return []
    p = root / rel
    if p.is_file():
        return [p]
    top = root / rel.split("/")[0]
    return sorted(top.rglob("*.dcm")) if top.is_dir() else []


def _is_binary(a: np.ndarray) -> bool:
    lo, hi = a.min(), a.max()
    return bool(hi > lo and ((a == lo) | (a == hi)).all())


class _CbisRoi:
    """Finds the ROI mask of one abnormality among the declared ROI and crop files, by content: the ROI mask is
    binary and as large as the image; the cropped image is small and grey (CBIS-DDSM swaps them at times)."""

    def __init__(self, root: Path, roi_rel: str, crop_rel: str, label: str, row: str):
        self.root, self.roi_rel, self.crop_rel, self.label, self.row = root, roi_rel, crop_rel, label, row

    def __call__(self, shape: tuple[int, int]) -> tuple[np.ndarray, str]:
        candidates = list(dict.fromkeys(_cbis_files(self.root, self.roi_rel) + _cbis_files(self.root, self.crop_rel)))
        if not candidates:
            raise BreastGenError(f"{self.row}: ROI mask file not found: {self.roi_rel or '(empty path)'} "
                                 f"(nor the cropped image {self.crop_rel or '(empty path)'})", self.root)
        seen = []
        for p in candidates:
            arr, _ = load_image(p, modalities=None, allow_constant=True)
            arr = arr.mean(axis=-1) if arr.ndim == 3 else arr
            binary, same = _is_binary(arr), tuple(arr.shape) == tuple(shape)
            if binary and same:
                if p not in _cbis_files(self.root, self.roi_rel):
                    logger.info("%s: ROI mask found under the cropped-image path (files swapped): %s", self.row, p)
                return arr > arr.min(), self.label
            seen.append((p, arr.shape, binary))
        wrong = [s for s in seen if s[2]]
        if wrong:
            p, shp, _ = wrong[0]
            raise BreastGenError(f"{self.row}: ROI mask size {shp[0]} x {shp[1]} differs from the image size "
                                 f"{shape[0]} x {shape[1]} (W x H)", p)
        p, shp, _ = seen[0]
        raise BreastGenError(f"{self.row}: no ROI mask among the ROI / cropped-image files: {p.name} is a grey "
                             f"{shp[0]} x {shp[1]} cropped image, not a binary mask of the image size "
                             f"(ROI file missing?)", p)


def cases_from_cbis_ddsm(csv_files: Sequence[str | os.PathLike] | str | os.PathLike, root: str | os.PathLike,
                         val_fraction: float = 0.1) -> list[Case]:
    """Cases from CBIS-DDSM ``*_case_description_*.csv`` files; image / ROI / crop paths are relative to ``root``.

    Rows of one image (several abnormalities) form one case. Split: a file name with 'test' -> test, otherwise
    training, of which ``val_fraction`` of the patients (by a hash of the patient id) go to validation.
    """
    root = Path(root)
    files = [csv_files] if isinstance(csv_files, (str, os.PathLike)) else list(csv_files)
    cases: dict[str, Case] = {}
    for f in map(Path, files):
        if not f.is_file():
            raise BreastGenError("case description CSV not found", f)
        with open(f, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
            missing = [c for c in _CBIS_REQUIRED if c not in cols]
            if missing:
                raise BreastGenError(f"not a CBIS-DDSM case description CSV: missing column(s) "
                                     f"{', '.join(repr(m) for m in missing)}", f)
            test = "test" in f.name.lower()
            for n, row in enumerate(reader, start=2):
                get = {k: row.get(c) for k, c in cols.items()}
                image_rel = _clean_path(get["image file path"])
                patient = str(get.get("patient_id") or image_rel.split("/")[0]).strip()
                where = (f"{f.name} line {n} ({patient} {str(get.get('left or right breast') or '').strip()} "
                         f"{str(get.get('image view') or '').strip()} abnormality "
                         f"{str(get.get('abnormality id') or '?').strip()})")
                key = image_rel or f"{f.name}:{n}"
                if key not in cases:
                    split = "test" if test else (
                        "validation" if zlib.crc32(patient.encode()) % 1000 < val_fraction * 1000 else "training")
                    files_ = _cbis_files(root, image_rel)
                    image = str(max(files_, key=lambda p: p.stat().st_size)) if files_ else str(root / image_rel)
                    cases[key] = Case(_safe_id(image_rel.split("/")[0] or f"row{n}"), image, split,
                                      meta={"patient_id": patient})
                    if not image_rel:
                        cases[key].problem = f"{where}: empty 'image file path'"
                    elif not files_:
                        cases[key].problem = (f"{where}: image file not found: {image_rel} (looked for it and for "
                                              f"DICOMs under {root / image_rel.split('/')[0]})")
                case = cases[key]
                try:
                    label = lesion_label(get["pathology"], what="pathology")
                except BreastGenError as e:
                    case.problem = case.problem or f"{where}: {e.reason}"
                    continue
                case.rois.append(_CbisRoi(root, _clean_path(get["roi mask file path"]),
                                          _clean_path(get["cropped image file path"]), label, where))
    return list(cases.values())


# mini-MIAS --------------------------------------------------------------------------------------
_MIAS_LINE = re.compile(r"^(mdb\d+)\s+([FGD])\s+([A-Z]+)\s*(.*)$", re.IGNORECASE)


class _DiscRoi:
    def __init__(self, x: float, y_from_bottom: float, radius: float, label: str, where: str):
        self.x, self.y, self.r, self.label, self.where = x, y_from_bottom, radius, label, where

    def __call__(self, shape: tuple[int, int]) -> tuple[np.ndarray, str]:
        w, h = shape
        row = h - 1 - self.y  # mini-MIAS measures y from the bottom edge
        if not (0 <= self.x < w and 0 <= row < h):
            raise BreastGenError(f"{self.where}: abnormality centre ({self.x:g}, {self.y:g}) lies outside the "
                                 f"{w} x {h} image")
        xx, yy = np.ogrid[:w, :h]
        return (xx - self.x) ** 2 + (yy - row) ** 2 <= self.r ** 2, self.label


def cases_from_mias(info_file: str | os.PathLike, image_dir: str | os.PathLike | None = None,
                    val_fraction: float = 0.1, test_fraction: float = 0.2) -> list[Case]:
    """Cases from a mini-MIAS-style annotation file: ``ref tissue class [severity x y radius]`` per line, y measured
    from the bottom of the image; ``NORM`` images are normal. Images ``<ref>.pgm`` (or .png/.tif/.dcm) live in
    ``image_dir`` (default: the annotation file's folder). Split by a hash of ``ref``."""
    info_file = Path(info_file)
    if not info_file.is_file():
        raise BreastGenError("mini-MIAS annotation file not found", info_file)
    folder = Path(image_dir) if image_dir is not None else info_file.parent
    cases: dict[str, Case] = {}
    for n, line in enumerate(info_file.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        m = _MIAS_LINE.match(line.strip())
        if not m:
            continue  # headers, notes, blank lines
        ref, _tissue, cls, rest = m.group(1).lower(), m.group(2), m.group(3).upper(), m.group(4).split()
        where = f"{info_file.name} line {n} ({ref})"
        if ref not in cases:
            image = next((folder / f"{ref}{e}" for e in _IMAGE_EXTS if (folder / f"{ref}{e}").is_file()),
                         folder / f"{ref}.pgm")
            h = zlib.crc32(ref.encode()) % 1000
            split = "test" if h < test_fraction * 1000 else (
                "validation" if h < (test_fraction + val_fraction) * 1000 else "training")
            cases[ref] = Case(ref, str(image), split, meta={"class": cls})
            if not image.is_file():
                cases[ref].problem = f"{where}: image file not found: {image}"
        case = cases[ref]
        if cls == "NORM":
            continue
        try:
            label = lesion_label(rest[0] if rest else "", what="severity")
        except BreastGenError:
            case.problem = case.problem or (f"{where}: unknown severity {rest[0] if rest else '(none)'!r} for "
                                            f"{cls}; allowed: B, M")
            continue
        try:
            x, y, r = (float(v) for v in rest[1:4])
            if len(rest) < 4 or r <= 0:
                raise ValueError
        except ValueError:
            case.problem = case.problem or f"{where}: {cls} abnormality without centre x, y and radius"
            continue
        case.rois.append(_DiscRoi(x, y, r, label, where))
    return list(cases.values())


# ------------------------------------------------------------------------------------------------ extraction
def _to_grey(arr: np.ndarray, src: Any) -> np.ndarray:
    if arr.ndim == 3:
        raise BreastGenError(f"expected a grey mammogram, got an RGB image of shape {arr.shape}", src)
    return arr


def _write_png(img: np.ndarray, path: Path) -> None:
    """16-bit (float [0, 1]) or 8-bit PNG of a (W, H) patch, atomically, zlib level 1: 2-3x faster than
    breastgen.io.save_png16's default level for noisy 16-bit patches, files ~4 % larger (extraction is I/O bound)."""
    from PIL import Image

    from ..io.atomic import atomic_path
    from ..io.images import to_rows_cols, to_uint16

    a = to_rows_cols(img)
    a = a if a.dtype == np.uint8 else to_uint16(a)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(a)).save(tmp, format="PNG", compress_level=1)


def _extract_one(case: Case, spec: PatchSpec, out_dir: Path, rng: np.random.Generator, write: bool) -> list[dict]:
    if case.problem:
        raise BreastGenError(case.problem)
    img, meta = load_image(case.image, modalities=None)
    img = _to_grey(img, case.image)
    breast = breast_mask(img)
    rois = [roi(tuple(img.shape)) for roi in case.rois]
    for k, (roi, _label) in enumerate(rois):
        if not roi.any():
            raise BreastGenError(f"ROI {k + 1} is empty (no foreground pixel)", case.image)
        if not (roi & breast).any():
            raise BreastGenError(f"ROI {k + 1} ({_label}) touches no breast tissue", case.image)
    found = find_patches(breast, rois, spec, rng)
    if not found:
        return []
    scaled = ScaleIntensityMammo()(img.astype(np.float32, copy=False)).numpy()
    s = int(spec.size)
    entries = []
    for rec in found:
        x0, y0 = rec["x0"], rec["y0"]
        name = f"{case.case_id}_x{x0:05d}_y{y0:05d}"
        entry = {"image": f"images/{name}.png", "label": rec["label"], "source": str(case.image),
                 "box": [x0, y0, x0 + s, y0 + s], "breast_fraction": rec["breast_fraction"],
                 "lesion_overlap": rec["lesion_overlap"], **case.meta}
        if rec["breast_fraction"] < 1.0:  # no 'breast' file: the whole patch is breast
            entry["breast"] = f"breast/{name}.png"
        if write:
            _write_png(scaled[x0:x0 + s, y0:y0 + s], out_dir / entry["image"])
            if "breast" in entry:
                _write_png(breast[x0:x0 + s, y0:y0 + s].astype(np.uint8) * 255, out_dir / entry["breast"])
        if rec["label"] != "normal":
            lesion = np.zeros((s, s), dtype=bool)
            for k in rec["rois"]:
                lesion |= rois[k][0][x0:x0 + s, y0:y0 + s]
            entry["mask"] = f"masks/{name}.png"
            if write:
                _write_png(lesion.astype(np.uint8) * 255, out_dir / entry["mask"])
        entries.append(entry)
    return entries


def extract_cases(cases: Iterable[Case], out_dir: str | os.PathLike, spec: PatchSpec | None = None,
                  write: bool = True, source: str | None = None,
                  on_case: Callable[[Case, int, str | None], None] | None = None) -> dict:
    """Cut every case into patches under ``out_dir`` (images/, breast/, masks/, datalist.json, summary.json).

    A case that fails (unreadable file, unknown pathology, missing/swapped-and-unresolvable ROI, ROI off the
    breast ...) is skipped with its one-line reason; the others go on. Returns the summary: ``counts``
    (split -> label -> n), ``skipped`` ([{"case", "reason"}]), ``n_cases``, ``n_patches``, ``spec``, ``datalist``.
    Raises if no patch at all was extracted.
    """
    spec = spec or PatchSpec()
    out_dir = Path(out_dir)
    rng = np.random.default_rng(spec.seed)
    sections: dict[str, list[dict]] = {s: [] for s in SECTIONS}
    skipped, n_cases = [], 0
    for case in cases:
        n_cases += 1
        try:
            entries = _extract_one(case, spec, out_dir, rng, write)
            reason = None
        except BreastGenError as e:
            entries, reason = [], str(e)
            skipped.append({"case": case.case_id, "image": case.image, "reason": reason})
        sections.setdefault(case.split, []).extend(entries)
        if on_case is not None:
            on_case(case, len(entries), reason)
    counts = {s: {c: sum(e["label"] == c for e in es) for c in CLASSES} for s, es in sections.items()}
    n_patches = sum(len(es) for es in sections.values())
    summary = {"source": source, "spec": spec.as_dict(), "n_cases": n_cases, "n_skipped": len(skipped),
               "n_patches": n_patches, "counts": counts, "skipped": skipped,
               "datalist": str(out_dir / "datalist.json")}
    if n_patches == 0:
        why = "every case was skipped" if len(skipped) == n_cases else \
            f"no window of {spec.size} x {spec.size} is at least {spec.min_breast:.0%} breast"
        raise BreastGenError(f"no patches extracted from {n_cases} case(s): {why}", out_dir)
    if write:
        atomic_write_json(out_dir / "datalist.json", {s: sections.get(s, []) for s in SECTIONS})
        atomic_write_json(out_dir / "summary.json", summary)
    return summary


def ensure_patch_datalist(source_datalist: str | os.PathLike, out_dir: str | os.PathLike, size: int = 256,
                          stride: int = 128, min_breast: float = 0.75, min_lesion_overlap: float = 0.5,
                          max_normal_per_image: int | None = None, seed: int = 0) -> str:
    """Path of ``out_dir/datalist.json``, extracting patches from a mammogram datalist first unless a previous
    extraction with the same source and settings is there (bundle configs call this; re-runs are free)."""
    spec = PatchSpec(size, stride, min_breast, min_lesion_overlap, max_normal_per_image, seed)
    out_dir = Path(out_dir)
    summary_file = out_dir / "summary.json"
    if summary_file.is_file() and (out_dir / "datalist.json").is_file():
        try:
            old = json.loads(summary_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("spec") == spec.as_dict() and old.get("source") == str(Path(source_datalist).resolve()):
            return str(out_dir / "datalist.json")
    summary = extract_cases(cases_from_datalist(source_datalist), out_dir, spec,
                            source=str(Path(source_datalist).resolve()))
    for s in summary["skipped"]:
        logger.warning("skipped %s: %s", s["case"], s["reason"])
    logger.info("extracted %d patches from %d images into %s", summary["n_patches"], summary["n_cases"], out_dir)
    return str(out_dir / "datalist.json")


# ------------------------------------------------------------------------------------------------ synthesis
def check_mask_on_breast(mask: np.ndarray, breast: np.ndarray, src: Any = None, min_fraction: float = 0.9) -> float:
    """Fraction of the lesion mask on breast tissue; raises a one-line error if it touches none, or too little."""
    m = np.asarray(mask) > 0
    if not m.any():
        raise BreastGenError("lesion mask is empty (no foreground pixel)", src)
    on = float((m & (np.asarray(breast) > 0)).sum() / m.sum())
    if on == 0:
        raise BreastGenError("lesion mask touches no breast tissue (it lies on the background); place it inside "
                             "the breast", src)
    if on < min_fraction:
        raise BreastGenError(f"only {on:.0%} of the lesion mask lies on breast tissue (need at least "
                             f"{min_fraction:.0%}); move it inside the breast", src)
    return on


def place_lesion_mask(lesion: np.ndarray, breast: np.ndarray, rng: np.random.Generator,
                      zoom_range: Sequence[float] = (0.75, 1.25), tries: int = 100,
                      min_on_breast: float = 1.0) -> np.ndarray:
    """A lesion mask (any size; cropped to its bounding box) randomly zoomed and placed where at least
    ``min_on_breast`` of it lies on ``breast`` (W, H). Returns a (W, H) bool mask; raises if it cannot be placed."""
    m = np.asarray(lesion) > 0
    m = m[0] if m.ndim == 3 else m
    b = np.asarray(breast) > 0
    b = b[0] if b.ndim == 3 else b
    if not m.any():
        raise BreastGenError("lesion mask is empty (no foreground pixel)")
    xs, ys = np.nonzero(m)
    m = m[xs.min():xs.max() + 1, ys.min():ys.max() + 1]
    W, H = b.shape
    for _ in range(max(1, tries)):
        z = float(rng.uniform(*zoom_range))
        z = min(z, 0.95 * W / m.shape[0], 0.95 * H / m.shape[1])
        zm = ndimage.zoom(m.astype(np.uint8), z, order=0).astype(bool)
        if not zm.any() or zm.shape[0] > W or zm.shape[1] > H:
            continue
        x0, y0 = int(rng.integers(0, W - zm.shape[0] + 1)), int(rng.integers(0, H - zm.shape[1] + 1))
        on = (zm & b[x0:x0 + zm.shape[0], y0:y0 + zm.shape[1]]).sum() / zm.sum()
        if on >= min_on_breast:
            out = np.zeros((W, H), dtype=bool)
            out[x0:x0 + zm.shape[0], y0:y0 + zm.shape[1]] = zm
            return out
    raise BreastGenError(f"cannot place the lesion mask on breast tissue ({tries} tries): the breast part of the "
                         "patch is too small for it")


def corrupt_with_noise(image: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor,
                       rng: np.random.Generator | torch.Generator | None = None):
    """Replace the masked pixels by uniform noise in [0, 1] (the generator's input); numpy or torch."""
    if isinstance(image, torch.Tensor):
        noise = torch.rand(image.shape, generator=rng if isinstance(rng, torch.Generator) else None,
                           device=image.device, dtype=image.dtype)
        m = (torch.as_tensor(mask, device=image.device) > 0.5).to(image.dtype)
        return image * (1 - m) + noise * m
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng()
    m = np.asarray(mask) > 0.5
    return np.where(m, rng.uniform(0, 1, np.shape(image)).astype(np.float32), np.asarray(image, dtype=np.float32))


def load_mask_pool(entries: Sequence[Mapping], mask_key: str = "mask", limit: int | None = None) -> list[np.ndarray]:
    """Lesion masks (bool, cropped to their bounding box) of the entries that have one; masks cut by the patch
    border are left out unless no other is available."""
    whole, cut = [], []
    for e in entries:
        if not e.get(mask_key):
            continue
        m = load_image(e[mask_key], modalities=None, allow_constant=True)[0] > 0
        if not m.any():
            continue
        xs, ys = np.nonzero(m)
        touches = xs.min() == 0 or ys.min() == 0 or xs.max() == m.shape[0] - 1 or ys.max() == m.shape[1] - 1
        (cut if touches else whole).append(m[xs.min():xs.max() + 1, ys.min():ys.max() + 1])
        if limit is not None and len(whole) >= limit:
            break
    pool = whole or cut
    if not pool:
        raise BreastGenError("no lesion masks in the datalist: lesion patches ('mask' key) are needed to place "
                             "synthetic lesions")
    return pool


class RandLesionMaskd(Randomizable, MapTransform):
    """Give entries without a lesion mask (normal patches) one from ``pool``, randomly zoomed and placed on
    breast tissue (``breast_key``; absent = the whole patch, sized like ``ref_key``); entries with a mask keep it.
    Output (1, W, H) float32 0/1 under ``keys``."""

    def __init__(self, keys: KeysCollection = "mask", breast_key: str = "breast", pool: Sequence[np.ndarray] = (),
                 zoom_range: Sequence[float] = (0.75, 1.25), ref_key: str = "image", allow_missing_keys: bool = True):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.breast_key, self.pool, self.zoom_range = breast_key, list(pool), tuple(zoom_range)
        self.ref_key = ref_key
        self.R = np.random.RandomState()
        self._rng = np.random.default_rng()

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self._rng = np.random.default_rng(self.R.randint(0, 2**31 - 1))
        return self

    def randomize(self, data: Any = None) -> None:
        self._rng = np.random.default_rng(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        self.randomize()
        for key in self.keys:
            if d.get(key) is not None and not isinstance(d[key], str):
                d[key] = (torch.as_tensor(d[key]).as_subclass(torch.Tensor) > 0).float()  # plain: collates with placed
                continue
            if not self.pool:
                raise BreastGenError("RandLesionMaskd has an empty mask pool")
            if isinstance(d.get(self.breast_key), (np.ndarray, torch.Tensor)):
                breast = np.asarray(d[self.breast_key])
                breast = breast[0] if breast.ndim == 3 else breast
            else:  # no breast mask: the whole patch is breast
                breast = np.ones(tuple(np.shape(d[self.ref_key])[-2:]), bool)
            lesion = self.pool[int(self._rng.integers(len(self.pool)))]
            placed = place_lesion_mask(lesion, breast > 0, self._rng, self.zoom_range, min_on_breast=0.9)
            d[key] = torch.from_numpy(placed[None].astype(np.float32))
        return d


# ------------------------------------------------------------------------------------------------ sampling
def class_counts(entries: Sequence[Mapping], label_key: str = "label",
                 class_map: Mapping[str, int] | None = None) -> dict:
    out: dict = {}
    for e in entries:
        c = class_map[e[label_key]] if class_map else e[label_key]
        out[c] = out.get(c, 0) + 1
    return out


def balanced_sampler(entries: Sequence[Mapping], label_key: str = "label", class_map: Mapping[str, int] | None = None,
                     num_samples: int | None = None, seed: int = 0) -> torch.utils.data.WeightedRandomSampler:
    """Class-balanced sampling (each class drawn equally often, with replacement). MONAI has no class-balanced
    sampler for classification datalists, hence this helper around torch's WeightedRandomSampler."""
    labels = [class_map[e[label_key]] if class_map else e[label_key] for e in entries]
    counts = class_counts(entries, label_key, class_map)
    weights = torch.tensor([1.0 / counts[c] for c in labels], dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(weights, num_samples or len(labels), replacement=True,
                                                  generator=torch.Generator().manual_seed(int(seed)))
