"""Turn mammography records (file + attributes) into a MONAI datalist with MAM-E prompts.

Shared by ``scripts/prepare_vindr.py`` and ``scripts/prepare_mammo_csv.py``. For each :class:`Record` the image
is read with :func:`~breastgen.data.readers.load_image`; attributes the record leaves empty come from the header
(laterality: ImageLaterality / file name / image; view: ViewPosition; vendor: Manufacturer -- a record value
always wins). The breast-area ratio is measured as the bundles see the image: flipped to a left breast,
:class:`~breastgen.data.transforms.ResizeToSquare` (``image_size``, ``fit``, chest wall kept), intensity-scaled,
then :func:`~breastgen.data.transforms.breast_mask`; it gives MAM-E's ``area`` word (small / medium / big).

Each datalist entry is::

    {"image": path, "patient": id, "laterality": "L"|"R", "view": "CC"|"MLO"|null, "density": "A".."D"|null,
     "vendor": word|null, "area": word, "breast_area_ratio": float, "prompt": "a hologic mammogram in CC view
     with low density and medium area", ...record extras (e.g. "bbox", "label")}

Unknown attributes are null and left out of the prompt. ``image`` is relative to the datalist's folder when
the file lies below it, absolute otherwise. Records without a split go to ``training``; unless some record is
explicitly ``validation``, a seeded, patient-disjoint ``val_fraction`` of the training images becomes the
validation section (images without a patient id count as their own patient). Bad records are skipped with one
reason each (printed as counts and written to ``<out>/skipped.csv``); the run fails with
:class:`~breastgen.errors.BreastGenError` only when no usable image remains, before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import io
import multiprocessing
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BreastGenError
from ..prompts import BIRADS_TO_DENSITY, DEFAULT_VENDORS, VIEWS, area_class, build_prompt, density_word, vendor_word
from .datalists import SECTIONS, write_datalist

__all__ = ["Record", "PrepareOptions", "PrepareResult", "SPLIT_NAMES", "prepare_datalist", "breast_area_ratio",
           "patient_split", "normalise_split", "parse_view_map", "read_csv_rows", "add_arguments", "run_from_args"]

SPLIT_NAMES = {"training": "training", "train": "training", "validation": "validation", "val": "validation",
               "valid": "validation", "test": "test", "testing": "test"}
_LETTER = {word: letter for letter, word in BIRADS_TO_DENSITY.items()}
_SKIPPED_COLUMNS = ("id", "path", "reason", "detail")


@dataclass
class Record:
    """One image to prepare. Empty (None / '') attributes are taken from the header or left unknown.

    ``healthy`` is used by ``healthy_only`` (None = unknown, excluded then); ``extra`` is copied into the entry
    (``bbox`` -- a list of [x0, y0, x1, y1] in file pixels -- is checked against the image);
    ``expected_size`` (width, height) is checked against the image when given; a record with ``problem``
    (reason, detail) -- found while reading the annotations -- is skipped with it.
    """

    path: str | os.PathLike
    id: str | None = None
    laterality: str | None = None
    view: str | None = None
    density: str | None = None
    vendor: str | None = None
    split: str | None = None
    patient: str | None = None
    healthy: bool | None = None
    expected_size: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    problem: tuple[str, str] | None = None


@dataclass(frozen=True)
class PrepareOptions:
    image_size: int = 512
    fit: str = "crop"
    mask_threshold: float | None = None  # None: Otsu (breast_mask's default)
    view_map: Mapping[str, str] = field(default_factory=dict)  # e.g. {"XCCL": "CC"}; CC and MLO map to themselves
    vendors: tuple[str, ...] = DEFAULT_VENDORS
    patient_from_header: bool = True  # DICOM PatientID, else StudyInstanceUID, for records without a patient
    base_dir: str | None = None  # the datalist's folder (for relative image paths)


@dataclass
class PrepareResult:
    datalist: Path
    skipped_csv: Path
    counts: dict[str, int]
    skipped: list[dict[str, str]]
    excluded_unhealthy: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"wrote {self.datalist}: " + ", ".join(f"{self.counts[s]} {s}" for s in SECTIONS)]
        lines += _skip_lines(self.skipped, self.skipped_csv)
        if self.excluded_unhealthy:
            lines.append(f"excluded by --healthy-only: {self.excluded_unhealthy} image(s) with findings or no label")
        return "\n".join(lines + self.notes)


# ---------------------------------------------------------------------------------------------------- helpers
def _clean(value: Any) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


def normalise_split(value: Any) -> str:
    """'train' / 'training' / 'val' / 'test' ... -> a datalist section; empty -> 'training'."""
    text = (_clean(value) or "training").lower()
    if text not in SPLIT_NAMES:
        raise BreastGenError(f"unknown split {value!r}; allowed: {', '.join(sorted(SPLIT_NAMES))}")
    return SPLIT_NAMES[text]


def parse_view_map(items: Iterable[str]) -> dict[str, str]:
    """``["XCCL=CC", "ML=MLO"]`` -> ``{"XCCL": "CC", "ML": "MLO"}`` (targets must be CC or MLO)."""
    out = {}
    for item in items:
        src, sep, dst = str(item).partition("=")
        src, dst = src.strip().upper(), dst.strip().upper()
        if not sep or not src or dst not in VIEWS:
            raise BreastGenError(f"bad view mapping {item!r}: expected VIEW=CC or VIEW=MLO, e.g. XCCL=CC")
        out[src] = dst
    return out


def read_csv_rows(path: str | os.PathLike, required: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a CSV file with lower-cased, stripped column names; a missing file or required column
    is a BreastGenError naming it."""
    path = Path(path)
    if not path.is_file():
        raise BreastGenError("CSV file not found", path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [(c or "").strip().lower() for c in reader.fieldnames or ()]
            rows = [{(k or "").strip().lower(): (v if isinstance(v, str) else "") for k, v in row.items()}
                    for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BreastGenError(f"cannot read CSV ({type(e).__name__}: {e})", path) from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise BreastGenError(f"missing required column(s) {', '.join(missing)} (found: {', '.join(columns) or 'none'})",
                             path)
    return columns, rows


def breast_area_ratio(array: np.ndarray, laterality: str | None = None, image_size: int = 512, fit: str = "crop",
                      meta: Mapping | None = None, threshold: float | None = None) -> tuple[float, str]:
    """(breast-pixel ratio, laterality) of a (W, H) image as the bundles preprocess it: flipped to 'L' (laterality
    from the argument, else ``meta``, file name or the image), resized to a square with the chest wall kept,
    intensity-scaled to [0, 1], then :func:`breast_mask` (Otsu, or the fixed ``threshold``)."""
    import torch
    from monai.data import MetaTensor

    from .transforms import FlipToLaterality, ResizeToSquare, ScaleIntensityMammo, breast_mask

    img = MetaTensor(torch.from_numpy(np.asarray(array, dtype=np.float32))[None], meta=dict(meta or {}))
    flip = FlipToLaterality("L")
    lat, _ = flip.resolve(img, laterality)
    img = ScaleIntensityMammo()(ResizeToSquare(image_size, fit, anchor_x="start")(flip(img, flip=lat != "L")))
    return float(breast_mask(img.numpy(), threshold).mean()), lat


def _header_patient(path: Path) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"])
        return _clean(ds.get("PatientID")) or _clean(ds.get("StudyInstanceUID"))
    except Exception:  # noqa: BLE001 - the image itself was readable; the patient stays unknown
        return None


def _map_view(view: str | None, opts: PrepareOptions) -> str | None:
    """CC / MLO (after ``view_map``), None when no view is given; raises for any other view."""
    if view is None:
        return None
    v = view.strip().upper()
    mapped = opts.view_map.get(v, v)
    if mapped not in VIEWS:
        raise BreastGenError(f"unknown view {view!r}; allowed: CC, MLO (map others, e.g. --map-view {v}=CC)")
    return mapped


def _reader_reason(err: BreastGenError) -> str:
    if err.reason.startswith("file not found"):
        return "missing file"
    if err.reason.startswith(("modality", "no Modality")):
        return "wrong modality"
    return "unreadable image"


# -------------------------------------------------------------------------------------------------- per image
def _check_record(rec: Record, opts: PrepareOptions) -> tuple[str, str] | None:
    """Cheap checks before reading the image: (reason, detail) or None."""
    for reason, check in (("unknown split", lambda: normalise_split(rec.split)),
                          ("unknown density", lambda: _clean(rec.density) and density_word(rec.density)),
                          ("unknown view", lambda: _map_view(_clean(rec.view), opts))):
        try:
            check()
        except BreastGenError as e:
            return reason, e.reason
    lat = _clean(rec.laterality)
    if lat is not None and lat.upper() not in ("L", "R", "LEFT", "RIGHT"):
        return "unknown laterality", f"unknown laterality {rec.laterality!r}; allowed: L, R"
    return None


def _process(rec: Record, opts: PrepareOptions) -> tuple[dict | None, str | None, tuple[str, str] | None]:
    """(entry, unrecognised vendor text or None, None) or (None, None, (reason, detail)) for one record (runs in
    worker processes)."""
    from .readers import load_image

    def bad(reason: str, detail: str) -> tuple[None, None, tuple[str, str]]:
        return None, None, (reason, detail)

    path = Path(rec.path)
    try:
        array, meta = load_image(path)
    except BreastGenError as e:
        return bad(_reader_reason(e), e.reason)
    if array.ndim != 2:
        return bad("not greyscale", f"image has shape {array.shape}, expected one grey channel")
    width, height = array.shape
    if rec.expected_size and tuple(int(v) for v in rec.expected_size) != (width, height):
        return bad("size mismatch", f"image is {width} x {height} (W x H), the annotations say "
                                    f"{rec.expected_size[0]} x {rec.expected_size[1]}")
    try:
        view = _map_view(_clean(rec.view) or meta.get("ViewPosition"), opts)
    except BreastGenError as e:
        return bad("unknown view", f"{e.reason} (from {meta.get('view_source') or 'the header'})")
    boxes = rec.extra.get("bbox")
    if boxes:
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if not np.isfinite(b).all() or (b[:, :2] < 0).any() or (b[:, 2] > width).any() or (b[:, 3] > height).any() \
                or (b[:, 2:] <= b[:, :2]).any():
            return bad("invalid bbox", f"bbox {b.tolist()} is empty or outside the image ({width} x {height})")
    lat = _clean(rec.laterality)
    lat = {"LEFT": "L", "RIGHT": "R"}.get(lat.upper(), lat.upper()) if lat else None
    try:
        ratio, lat = breast_area_ratio(array, lat, opts.image_size, opts.fit, meta, opts.mask_threshold)
    except BreastGenError as e:
        return bad("unreadable image", e.reason)
    vendor = vendor_word(_clean(rec.vendor) or meta.get("Manufacturer"), opts.vendors)
    density = _clean(rec.density) and density_word(rec.density)
    area = area_class(ratio)
    patient = _clean(rec.patient)
    if patient is None and opts.patient_from_header and meta.get("format") == "DICOM":
        patient = _header_patient(path)
    image = path.resolve()
    if opts.base_dir and image.is_relative_to(opts.base_dir):
        image = image.relative_to(opts.base_dir)
    entry = {"image": image.as_posix(), "patient": patient, "laterality": lat, "view": view,
             "density": _LETTER.get(density) if density else None, "vendor": vendor, "area": area,
             "breast_area_ratio": round(ratio, 4),
             "prompt": build_prompt(vendor, view, density, area, vendors=opts.vendors), **rec.extra}
    raw_vendor = _clean(rec.vendor) or _clean(meta.get("Manufacturer"))
    return entry, raw_vendor if vendor is None else None, None


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------- the split
def patient_split(entries: Sequence[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training, validation): whole patients, in a seeded random order, move to validation until it holds
    ``round(fraction * n)`` images (at least one when fraction > 0 and n >= 2); training never becomes empty.
    Entries without a ``patient`` are their own patient. Both lists keep the input order."""
    if not 0.0 <= fraction < 1.0:
        raise BreastGenError(f"validation fraction must be in [0, 1), not {fraction}")
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, e in enumerate(entries):
        groups[("patient", e["patient"]) if e.get("patient") else ("image", e["image"])].append(i)
    n = len(entries)
    target = round(fraction * n)
    target = 1 if fraction > 0 and target == 0 and n >= 2 else target
    keys = sorted(groups, key=str)
    chosen: set[int] = set()
    for k in np.random.default_rng(seed).permutation(len(keys)):
        if len(chosen) >= target:
            break
        if len(chosen) + len(groups[keys[k]]) < n:
            chosen.update(groups[keys[k]])
    return ([e for i, e in enumerate(entries) if i not in chosen], [e for i, e in enumerate(entries) if i in chosen])


# ---------------------------------------------------------------------------------------------------- driver
def _skip_lines(skipped: Sequence[dict], where: Path | None) -> list[str]:
    if not skipped:
        return ["skipped: none"]
    counts = Counter(s["reason"] for s in skipped)
    head = f"skipped {len(skipped)} record(s)" + (f" (listed in {where})" if where else "") + ":"
    return [head] + [f"  {reason}: {n}" for reason, n in counts.most_common()]


def prepare_datalist(records: Sequence[Record], out_dir: str | os.PathLike, *, image_size: int = 512,
                     fit: str = "crop", mask_threshold: float | None = None, val_fraction: float = 0.1, seed: int = 0,
                     healthy_only: bool = False, workers: int = 1, view_map: Mapping[str, str] | None = None,
                     vendors: Sequence[str] = DEFAULT_VENDORS, datalist_name: str = "datalist.json",
                     progress: bool = True) -> PrepareResult:
    """Read, measure and describe ``records``; write ``<out_dir>/<datalist_name>`` and ``<out_dir>/skipped.csv``.

    Raises BreastGenError for bad options, or when no record is usable (nothing is written then).
    """
    from .transforms import ResizeToSquare

    ResizeToSquare(image_size, fit)  # validates fit
    if int(image_size) < 8:
        raise BreastGenError(f"image size must be at least 8, not {image_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise BreastGenError(f"validation fraction must be in [0, 1), not {val_fraction}")
    if mask_threshold is not None and not 0.0 < mask_threshold < 1.0:
        raise BreastGenError(f"mask threshold must be in (0, 1), not {mask_threshold}")
    if int(workers) < 1:
        raise BreastGenError(f"workers must be at least 1, not {workers}")
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise BreastGenError("output exists and is not a folder", out_dir)
    views = parse_view_map(f"{k}={v}" for k, v in (view_map or {}).items())
    opts = PrepareOptions(int(image_size), fit, mask_threshold, views, tuple(v.lower() for v in vendors),
                          base_dir=str(out_dir))

    skipped: list[dict[str, str]] = []
    todo: list[Record] = []
    seen: set[Path] = set()
    excluded = 0

    def skip(rec: Record, reason: str, detail: str) -> None:
        skipped.append({"id": rec.id or str(rec.path), "path": str(rec.path), "reason": reason, "detail": detail})

    for rec in records:
        if healthy_only and rec.healthy is not True:
            excluded += 1
            continue
        key = Path(rec.path).resolve()
        problem = rec.problem or (("duplicate", "the same file is listed more than once") if key in seen
                                  else _check_record(rec, opts))
        seen.add(key)
        if problem:
            skip(rec, *problem)
        else:
            todo.append(rec)

    work = partial(_process, opts=opts)
    results: Iterable[tuple]
    pool = None
    if workers > 1 and len(todo) > 1:
        # fork (Linux) starts workers without re-importing torch/MONAI, as torch's DataLoader does
        method = "fork" if sys.platform == "linux" else "spawn"
        pool = multiprocessing.get_context(method).Pool(min(int(workers), len(todo)), initializer=_init_worker)
        results = pool.imap(work, todo, chunksize=max(1, min(16, len(todo) // (4 * workers))))
    else:
        results = map(work, todo)
    try:
        from tqdm import tqdm

        results = list(tqdm(results, total=len(todo), desc="preparing", unit="img", disable=not progress,
                            file=sys.stderr))
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    sections: dict[str, list[dict]] = {s: [] for s in SECTIONS}
    unknown_vendors: Counter = Counter()
    for rec, (entry, raw_vendor, problem) in zip(todo, results):
        if problem:
            skip(rec, *problem)
            continue
        if raw_vendor:
            unknown_vendors[raw_vendor] += 1
        sections[normalise_split(rec.split)].append(entry)

    n_ok = sum(len(v) for v in sections.values())
    if n_ok == 0:
        print("\n".join(_skip_lines(skipped, None)), file=sys.stderr)
        what = f"all {len(skipped)} record(s) were skipped" if skipped else "no records"
        raise BreastGenError(f"no usable image: {what}" + (" (--healthy-only excluded "
                             f"{excluded})" if excluded else "") + "; nothing written", out_dir)

    notes = []
    if not sections["validation"]:
        train, val = patient_split(sections["training"], val_fraction, seed)
        sections["training"], sections["validation"] = train, val
        n_pat = len({e["patient"] or e["image"] for e in val})
        notes.append(f"validation: {len(val)} image(s) of {n_pat} patient(s) carved from training "
                     f"(fraction {val_fraction}, seed {seed}, patient-disjoint)")
    if not sections["training"]:
        notes.append("warning: the training section is empty")
    patients = {s: {e["patient"] for e in sections[s] if e["patient"]} for s in SECTIONS}
    for a, b in (("training", "validation"), ("training", "test"), ("validation", "test")):
        if shared := patients[a] & patients[b]:
            notes.append(f"warning: {len(shared)} patient(s) appear in both {a} and {b} (as given by the split)")
    no_patient = sum(1 for s in SECTIONS for e in sections[s] if not e["patient"])
    if no_patient:
        notes.append(f"note: {no_patient} image(s) have no patient id; each counts as its own patient")
    if unknown_vendors:
        listed = ", ".join(f"{v!r} x{n}" for v, n in unknown_vendors.most_common(5))
        notes.append(f"note: vendor not recognised, left out of the prompt: {listed}")

    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=_SKIPPED_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(skipped)
    from ..io.atomic import atomic_write_text

    datalist = write_datalist(out_dir / datalist_name, sections)
    skipped_csv = atomic_write_text(out_dir / "skipped.csv", text.getvalue())
    return PrepareResult(Path(datalist), Path(skipped_csv), {s: len(sections[s]) for s in SECTIONS}, skipped,
                         excluded, notes)


# ----------------------------------------------------------------------------------------------- the scripts
def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options both preparation scripts share (besides their input)."""
    ap.add_argument("--out", required=True, type=Path, help="output folder: datalist.json and skipped.csv")
    ap.add_argument("--healthy-only", action="store_true", help="keep only images without findings")
    ap.add_argument("--val-fraction", type=float, default=0.1,
                    help="share of the training images moved, whole patients at a time, to validation (0.1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the validation split (0)")
    ap.add_argument("--image-size", type=int, default=512,
                    help="square size the bundle trains at; the breast area is measured at it (512)")
    ap.add_argument("--fit", choices=("crop", "pad"), default="crop", help="the bundle's resize fit (crop)")
    ap.add_argument("--mask-threshold", type=float, default=None,
                    help="breast mask: fixed threshold on the [0, 1]-scaled image instead of Otsu (e.g. 0.05); "
                         "give the bundle's BreastMaskd the same threshold")
    ap.add_argument("--map-view", action="append", default=[], metavar="VIEW=CC|MLO",
                    help="use images of another view as CC or MLO, e.g. XCCL=CC (repeatable); others are skipped")
    ap.add_argument("--workers", type=int, default=1, help="processes reading images in parallel (1)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(records: Sequence[Record], args: argparse.Namespace) -> PrepareResult:
    """``prepare_datalist`` with the options of :func:`add_arguments`; prints the summary."""
    result = prepare_datalist(records, args.out, image_size=args.image_size, fit=args.fit,
                              mask_threshold=args.mask_threshold,
                              val_fraction=args.val_fraction, seed=args.seed, healthy_only=args.healthy_only,
                              workers=args.workers, view_map=parse_view_map(args.map_view),
                              progress=not args.no_progress)
    print(result.summary())
    return result
