"""Mammogram-histology pairs matched by pathology (benign with benign, malignant with malignant).

No public dataset images the same lesion in both modalities, so (as in the seed paper: BCDR mammograms and
BreaKHis histology, 441 pairs) pairs are formed by **label**: every lesion mammogram gets
``pairs_per_mammogram`` histology images of its pathology, drawn at random with a fixed seed. Splits are
**patient-disjoint on both sides**: mammogram patients and histology patients are each split into training /
validation / test (stratified by pathology, :func:`breastgen.data.atypia.split_groups`), and a mammogram is only
paired with histology of its own section, so no test pair shares a patient with a training pair.

Inputs:

* BCDR (:func:`read_bcdr`): TIFF mammograms below a root folder and CSV file(s) with one row per lesion outline:
  ``patient_id``, ``image_filename`` (relative to the root), ``classification`` (Benign / Malignant), optional
  ``lesion_id``, ``study_id``, ``image_view`` and the outline ``lw_x_points`` / ``lw_y_points`` (space-separated
  pixel coordinates, giving the lesion box). Column names can be changed.
* BreaKHis (:func:`scan_breakhis`): ``BreaKHis_v1/histology_slides/breast/{benign,malignant}/SOB/<subtype>/<slide>/
  <mag>X/*.png``; class, subtype, patient and magnification are parsed from names such as
  ``SOB_B_A-14-22549AB-40-001.png`` (:func:`parse_breakhis_name`) and checked against the folders.
* Any MONAI datalist (:func:`items_from_datalist`), e.g. the demo phantoms.

Outputs (:func:`write_pairs`): ``pairs.json`` (a datalist of pairs ``{"mammo", "histo", "label", "class",
"mammo_id", "histo_id", "patient", "histo_patient", ...}``), ``histology.json`` (every histology image by the same
patient-disjoint split, for the histology autoencoder and classifier) and ``summary.json``. Paths are relative to
the output folder when they lie below it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.atypia import _listing, split_groups
from ..data.datalists import SECTIONS, load_datalist, write_datalist
from ..errors import BreastGenError
from ..io.atomic import atomic_write_json

__all__ = ["LABELS", "BREAKHIS_SUBTYPES", "Item", "normalise_label", "parse_breakhis_name", "scan_breakhis",
           "read_bcdr", "items_from_datalist", "make_pairs", "write_pairs", "ensure_pairs", "unique_mammograms"]
logger = logging.getLogger(__name__)

LABELS = ("benign", "malignant")
BREAKHIS_SUBTYPES = {"A": "adenosis", "F": "fibroadenoma", "PT": "phyllodes_tumor", "TA": "tubular_adenoma",
                     "DC": "ductal_carcinoma", "LC": "lobular_carcinoma", "MC": "mucinous_carcinoma",
                     "PC": "papillary_carcinoma"}
_BREAKHIS_NAME = re.compile(r"^SOB_(?P<cls>[BM])_(?P<subtype>[A-Z]+)-(?P<patient>\d+-[0-9A-Z]+)-(?P<mag>\d+)-"
                            r"(?P<seq>\d+)\.png$", re.IGNORECASE)


@dataclass
class Item:
    """One image of one modality: ``label`` is 'benign' or 'malignant'; ``patient`` groups the split."""

    id: str
    path: Path
    label: str
    patient: str
    extra: dict[str, Any] = field(default_factory=dict)


def normalise_label(value: Any) -> str | None:
    """'Benign' / ' MALIGNANT ' / 'B' / 'M' -> 'benign' / 'malignant'; anything else -> None."""
    text = str(value if value is not None else "").strip().lower()
    return {"b": "benign", "benign": "benign", "m": "malignant", "malignant": "malignant"}.get(text)


# ---------------------------------------------------------------------------------------------- BreaKHis
def parse_breakhis_name(name: str) -> dict[str, Any]:
    """Fields of a BreaKHis file name (``SOB_B_A-14-22549AB-40-001.png``): label, subtype, patient (the slide
    id ``14-22549AB``), magnification (40, 100, 200 or 400) and sequence number."""
    m = _BREAKHIS_NAME.match(Path(name).name)
    if not m:
        raise BreastGenError("not a BreaKHis file name (expected e.g. SOB_B_A-14-22549AB-40-001.png)", name)
    sub = m["subtype"].upper()
    if sub not in BREAKHIS_SUBTYPES:
        raise BreastGenError(f"unknown BreaKHis tumour type {sub!r}; known: {', '.join(BREAKHIS_SUBTYPES)}", name)
    return {"label": "benign" if m["cls"].upper() == "B" else "malignant", "subtype": BREAKHIS_SUBTYPES[sub],
            "patient": m["patient"].upper(), "magnification": int(m["mag"]), "seq": int(m["seq"])}


def _breakhis_base(root: Path) -> Path:
    for base in (root / "BreaKHis_v1" / "histology_slides" / "breast", root / "histology_slides" / "breast", root):
        if (base / "benign").is_dir() or (base / "malignant").is_dir():
            return base
    raise BreastGenError("no BreaKHis layout here (expected BreaKHis_v1/histology_slides/breast/{benign,malignant}/"
                         "SOB/...)", root)


def scan_breakhis(root: str | os.PathLike, magnifications: Iterable[int] | None = None) -> list[Item]:
    """Every BreaKHis PNG below ``root`` (the folder holding ``BreaKHis_v1``, ``BreaKHis_v1`` itself or its
    ``histology_slides/breast``), optionally only some magnifications. A name that does not parse, or whose
    class or magnification disagrees with its folders, is an error listing the files."""
    root = Path(root)
    if not root.is_dir():
        raise BreastGenError("BreaKHis folder not found", root)
    base = _breakhis_base(root)
    mags = None if magnifications is None else {int(m) for m in magnifications}
    items, bad = [], []
    for folder in LABELS:
        for p in sorted((base / folder).rglob("*")) if (base / folder).is_dir() else []:
            if not p.is_file() or p.suffix.lower() != ".png" or p.name.startswith("."):
                continue
            try:
                f = parse_breakhis_name(p.name)
            except BreastGenError as e:
                bad.append(f"{p.relative_to(base)} ({e.reason})")
                continue
            mag_dir = next((d.name for d in p.parents if re.fullmatch(r"\d+X", d.name, re.IGNORECASE)), None)
            if f["label"] != folder:
                bad.append(f"{p.relative_to(base)} (a {f['label']} name in the {folder} folder)")
                continue
            if mag_dir is not None and int(mag_dir[:-1]) != f["magnification"]:
                bad.append(f"{p.relative_to(base)} (magnification {f['magnification']} in folder {mag_dir})")
                continue
            if mags is not None and f["magnification"] not in mags:
                continue
            items.append(Item(id=p.stem, path=p, label=f["label"], patient=f["patient"],
                              extra={"subtype": f["subtype"], "magnification": f["magnification"]}))
    if bad:
        raise BreastGenError(f"{len(bad)} BreaKHis file(s) do not fit the layout: {_listing(bad)}", base)
    if not items:
        what = "" if mags is None else f" at magnification {', '.join(map(str, sorted(mags)))}"
        raise BreastGenError(f"no BreaKHis PNG found{what}", base)
    return items


# ---------------------------------------------------------------------------------------------- BCDR
def _outline_box(xs: str, ys: str) -> list[int] | None:
    """[x0, y0, x1, y1] (half-open) of an outline given as space/comma-separated coordinates; None if absent."""
    px, py = re.findall(r"-?\d+(?:\.\d+)?", xs or ""), re.findall(r"-?\d+(?:\.\d+)?", ys or "")
    if not px and not py:
        return None
    if len(px) != len(py):
        raise ValueError(f"outline has {len(px)} x and {len(py)} y coordinates")
    x, y = np.asarray(px, float), np.asarray(py, float)
    if (x < 0).any() or (y < 0).any():
        raise ValueError("outline has negative coordinates")
    return [int(np.floor(x.min())), int(np.floor(y.min())), int(np.floor(x.max())) + 1, int(np.floor(y.max())) + 1]


def read_bcdr(root: str | os.PathLike, csv_files: Sequence[str | os.PathLike], image_column: str = "image_filename",
              patient_column: str = "patient_id", label_column: str = "classification",
              lesion_column: str = "lesion_id", x_column: str = "lw_x_points", y_column: str = "lw_y_points",
              ) -> tuple[list[Item], list[dict]]:
    """(lesion mammograms, skipped rows) of BCDR outline CSV(s). Rows whose classification is neither benign nor
    malignant are skipped (returned with the reason); a missing image file, a malformed outline or an image+lesion
    listed with two classifications is an error listing the rows. Several outlines of one lesion on one image
    (segmentation ids) give one item."""
    from ..data.prepare import read_csv_rows

    root = Path(root)
    if not root.is_dir():
        raise BreastGenError("BCDR folder not found", root)
    if not csv_files:
        raise BreastGenError("no BCDR CSV file given", root)
    items: dict[str, Item] = {}
    skipped, missing, bad, conflicts = [], [], [], []
    for csv_file in csv_files:
        columns, rows = read_csv_rows(csv_file, [c.lower() for c in (image_column, patient_column, label_column)])
        if not rows:
            raise BreastGenError("the BCDR CSV has no rows", csv_file)
        for line, row in enumerate(rows, start=2):
            where = f"{Path(csv_file).name}:{line}"
            rel = (row.get(image_column.lower()) or "").strip()
            raw = row.get(label_column.lower())
            label = normalise_label(raw)
            if label is None:
                skipped.append({"row": where, "image": rel, "reason": f"classification {str(raw).strip()!r} is "
                                                                        "neither benign nor malignant"})
                continue
            path = Path(rel) if os.path.isabs(rel) else root / rel
            if not rel or not path.is_file():
                if not any(m.startswith(f"{rel or '<empty>'} (") for m in missing):  # each file once
                    missing.append(f"{rel or '<empty>'} ({where})")
                continue
            try:
                box = _outline_box(row.get(x_column.lower(), ""), row.get(y_column.lower(), ""))
            except ValueError as e:
                bad.append(f"{where} ({e})")
                continue
            patient = (row.get(patient_column.lower()) or "").strip() or f"image:{rel}"
            lesion = (row.get(lesion_column.lower()) or "").strip()
            key = f"{patient}/{Path(rel).with_suffix('').as_posix()}" + (f"#lesion{lesion}" if lesion else "")
            if key in items:
                if items[key].label != label:
                    conflicts.append(f"{key} ({where})")
                continue
            extra = {"bbox": box} if box else {}
            if (row.get("image_view") or "").strip():
                extra["view"] = row["image_view"].strip()
            items[key] = Item(id=key, path=path, label=label, patient=patient, extra=extra)
    problems = []
    if missing:
        problems.append(f"{len(missing)} image file(s) not found below {root}: {_listing(missing)}")
    if bad:
        problems.append(f"{len(bad)} malformed outline(s): {_listing(bad)}")
    if conflicts:
        problems.append(f"{len(conflicts)} lesion(s) listed as both benign and malignant: {_listing(conflicts)}")
    if problems:
        raise BreastGenError("; ".join(problems), csv_files[0] if len(csv_files) == 1 else root)
    if not items:
        raise BreastGenError(f"no benign or malignant lesion in the BCDR CSV(s) ({len(skipped)} rows skipped)",
                             csv_files[0])
    return list(items.values()), skipped


# ---------------------------------------------------------------------------------------------- datalists
def items_from_datalist(path: str | os.PathLike, image_key: str = "image", label_key: str = "label",
                        sections: Sequence[str] = SECTIONS) -> list[Item]:
    """Benign / malignant entries of a MONAI datalist (other labels, e.g. 'normal', are left out). The patient
    is the entry's ``patient`` field, else the image itself; ``bbox`` is kept."""
    from ..data.datalists import read_datalist_json

    present = [s for s in sections if s in read_datalist_json(path)]
    items = []
    for section in present:
        for e in load_datalist(path, section, path_keys=(image_key,)):
            label = normalise_label(e.get(label_key))
            if label is None:
                continue
            p = Path(e[image_key])
            rel = os.path.relpath(p, Path(path).parent)
            extra = {"bbox": e["bbox"]} if e.get("bbox") else {}
            items.append(Item(id=rel, path=p, label=label, patient=str(e.get("patient") or f"image:{rel}"),
                              extra=extra))
    if not items:
        raise BreastGenError(f"no benign or malignant entry (field {label_key!r}) in the datalist", path)
    return items


def unique_mammograms(pairs: Sequence[dict]) -> list[dict]:
    """One entry per mammogram of a pairs section (for the mammogram autoencoder and the embedding index)."""
    seen, out = set(), []
    for e in pairs:
        if e["mammo_id"] not in seen:
            seen.add(e["mammo_id"])
            out.append({k: v for k, v in e.items() if k not in ("histo", "histo_id", "histo_patient", "subtype",
                                                                 "magnification")})
    return out


# ---------------------------------------------------------------------------------------------- pairing
def _sections_of(items: Sequence[Item], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    groups = [it.patient for it in items]
    return split_groups(groups, [it.label for it in items], val_fraction, test_fraction, seed)


def make_pairs(mammograms: Sequence[Item], histology: Sequence[Item], pairs_per_mammogram: int = 1,
               val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
               ) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(pairs, histology) datalist sections.

    Patients of each modality are split (stratified by their first lesion's label; seeded); within a section every
    mammogram gets ``pairs_per_mammogram`` histology images of its label, dealt from a seeded shuffle of that
    section's images of that label (cycling when there are fewer), so every image is used about equally. A label
    with mammograms but no histology in a section is an error ("unmatched labels")."""
    if isinstance(pairs_per_mammogram, bool) or int(pairs_per_mammogram) != pairs_per_mammogram or \
            pairs_per_mammogram < 1:
        raise BreastGenError(f"pairs_per_mammogram must be an integer >= 1, got {pairs_per_mammogram!r}")
    if not mammograms:
        raise BreastGenError("no lesion mammogram to pair")
    if not histology:
        raise BreastGenError("no histology image to pair")
    for what, items in (("mammogram", mammograms), ("histology", histology)):
        ids = Counter(it.id for it in items)
        dup = [i for i, n in ids.items() if n > 1]
        if dup:
            raise BreastGenError(f"{what} ids repeat: {_listing(dup)}")
        odd = sorted({str(it.label) for it in items} - set(LABELS))
        if odd:
            raise BreastGenError(f"{what} labels must be {' / '.join(LABELS)}, got {odd}")
    have = Counter(it.label for it in histology)
    need = Counter(it.label for it in mammograms)
    lacking = [f"{need[lab]} {lab} mammogram(s) but no {lab} histology image" for lab in LABELS
               if need[lab] and not have[lab]]
    if lacking:
        raise BreastGenError("unmatched labels: " + "; ".join(lacking))
    m_sec = _sections_of(mammograms, val_fraction, test_fraction, seed)
    h_sec = _sections_of(histology, val_fraction, test_fraction, seed + 1)
    rng = np.random.default_rng(seed)
    pairs: dict[str, list[dict]] = {s: [] for s in SECTIONS}
    histo_out: dict[str, list[dict]] = {s: [] for s in SECTIONS}
    pools: dict[tuple[str, str], list[Item]] = defaultdict(list)
    for it in histology:
        pools[(h_sec[it.patient], it.label)].append(it)
        histo_out[h_sec[it.patient]].append(_histo_entry(it))
    by_group: dict[tuple[str, str], list[Item]] = defaultdict(list)
    for it in mammograms:
        by_group[(m_sec[it.patient], it.label)].append(it)
    unmatched = [f"{len(ms)} {lab} mammogram(s) in {sec} but no {lab} histology image there"
                 for (sec, lab), ms in sorted(by_group.items()) if not pools.get((sec, lab))]
    if unmatched:
        raise BreastGenError("unmatched labels after the patient split (add data or change the fractions): "
                             + "; ".join(unmatched))
    for (sec, lab), ms in sorted(by_group.items()):
        pool = pools[(sec, lab)]
        order = [pool[i] for i in rng.permutation(len(pool))]
        for i, m in enumerate(ms):
            for j in range(int(pairs_per_mammogram)):
                h = order[(i * int(pairs_per_mammogram) + j) % len(order)]
                pairs[sec].append({"mammo": m.path, "histo": h.path, "label": LABELS.index(lab), "class": lab,
                                   "mammo_id": m.id, "histo_id": h.id, "patient": m.patient,
                                   "histo_patient": h.patient, **m.extra, **h.extra})
    for sec in SECTIONS:  # deterministic order, independent of the grouping above
        pairs[sec].sort(key=lambda e: (e["mammo_id"], e["histo_id"]))
        histo_out[sec].sort(key=lambda e: e["histo_id"])
    return pairs, histo_out


def _histo_entry(it: Item) -> dict:
    return {"histo": it.path, "label": LABELS.index(it.label), "class": it.label, "histo_id": it.id,
            "histo_patient": it.patient, **it.extra}


def _relative(sections: dict[str, list[dict]], out_dir: Path) -> dict[str, list[dict]]:
    base = out_dir.resolve()
    out = {}
    for sec, entries in sections.items():
        rows = []
        for e in entries:
            e = dict(e)
            for key in ("mammo", "histo"):
                if key in e:
                    p = Path(e[key]).resolve()
                    e[key] = p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p)
            rows.append(e)
        out[sec] = rows
    return out


def write_pairs(out_dir: str | os.PathLike, pairs: dict[str, list[dict]], histology: dict[str, list[dict]],
                summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``pairs.json``, ``histology.json`` and ``summary.json`` (counts per section and label, settings)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BreastGenError("output exists and is not a folder", out_dir)
    counts = {sec: {"pairs": len(pairs.get(sec, [])),
                    "mammograms": len({e["mammo_id"] for e in pairs.get(sec, [])}),
                    "histology": len(histology.get(sec, [])),
                    **{f"pairs_{lab}": sum(e["class"] == lab for e in pairs.get(sec, [])) for lab in LABELS}}
              for sec in SECTIONS}
    write_datalist(out_dir / "histology.json", _relative(histology, out_dir))
    write_datalist(out_dir / "pairs.json", _relative(pairs, out_dir))
    full = {**(summary or {}), "counts": counts}
    atomic_write_json(out_dir / "summary.json", full)
    return full


def ensure_pairs(mammo_datalist: str | os.PathLike, histo_datalist: str | os.PathLike, out_dir: str | os.PathLike,
                 pairs_per_mammogram: int = 1, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                 mammo_label_key: str = "label", histo_label_key: str = "class") -> str:
    """Path of ``<out_dir>/pairs.json`` built from two datalists (e.g. the demo phantoms), unless an earlier
    call with the same inputs and settings wrote it (bundle configs call this in every stage; re-runs are free)."""
    out_dir = Path(out_dir)
    settings = {"mammo_datalist": str(Path(mammo_datalist).resolve()), "histo_datalist": str(Path(histo_datalist).resolve()),
                "pairs_per_mammogram": int(pairs_per_mammogram), "val_fraction": float(val_fraction),
                "test_fraction": float(test_fraction), "seed": int(seed), "mammo_label_key": mammo_label_key,
                "histo_label_key": histo_label_key}
    done = out_dir / "summary.json"
    if done.is_file() and (out_dir / "pairs.json").is_file() and (out_dir / "histology.json").is_file():
        try:
            if json.loads(done.read_text(encoding="utf-8")).get("settings") == settings:
                return str(out_dir / "pairs.json")
        except (OSError, json.JSONDecodeError):
            pass
    pairs, histo = make_pairs(items_from_datalist(mammo_datalist, "image", mammo_label_key),
                              items_from_datalist(histo_datalist, "image", histo_label_key),
                              pairs_per_mammogram, val_fraction, test_fraction, seed)
    write_pairs(out_dir, pairs, histo, {"settings": settings})
    return str(out_dir / "pairs.json")
