#!/usr/bin/env python
"""Prepare VinDr-Mammo for the mammography bundles: a MONAI datalist with MAM-E prompts and finding boxes.

Usage::

    python scripts/prepare_vindr.py --root /data/vindr-mammo --out /data/vindr_prepared [--healthy-only]
        [--val-fraction 0.1] [--seed 0] [--image-size 512] [--fit crop] [--map-view XCCL=CC] [--workers 8]

Expected layout (the PhysioNet release)::

    <root>/breast-level_annotations.csv   study_id, series_id, image_id, laterality (L/R), view_position (CC/MLO),
                                          height, width, breast_birads ("BI-RADS 1"), breast_density
                                          ("DENSITY A".."DENSITY D"), split ("training"/"test")
    <root>/finding_annotations.csv        study_id, image_id, finding_categories ("['No Finding']",
                                          "['Mass', 'Suspicious Calcification']"), finding_birads,
                                          xmin, ymin, xmax, ymax (pixels of the DICOM image)
    <root>/images/<study_id>/<image_id>.dicom

VinDr's split becomes the ``training`` / ``test`` sections; a seeded ``--val-fraction`` of the training studies
(all images of a study together) becomes ``validation``. An image is healthy when all its findings are
"No Finding" (``--healthy-only`` keeps only those). Entries carry, besides the fields every prepared datalist
has (see ``breastgen.data.prepare``), ``label`` ("normal" / "lesion"), ``birads`` and, for images with boxed
findings, ``bbox`` (list of [x0, y0, x1, y1] in file pixels) and ``findings`` (the categories of each box).
Bad images are skipped (see ``<out>/skipped.csv``); a missing CSV or column is a one-line error (exit code 2).
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
from collections import defaultdict
from pathlib import Path

from breastgen.data.prepare import Record, add_arguments, read_csv_rows, run_from_args
from breastgen.errors import BreastGenError, main_guard

BREAST_CSV = "breast-level_annotations.csv"
FINDING_CSV = "finding_annotations.csv"
BREAST_COLUMNS = ("study_id", "image_id", "laterality", "view_position", "breast_density", "split")
FINDING_COLUMNS = ("image_id", "finding_categories", "xmin", "ymin", "xmax", "ymax")
NO_FINDING = "No Finding"


def parse_categories(text: str) -> list[str]:
    """"['Mass', 'Suspicious Calcification']" -> ['Mass', 'Suspicious Calcification'] (also plain comma lists)."""
    try:
        value = ast.literal_eval(text)
        items = [value] if isinstance(value, str) else list(value)
    except (ValueError, SyntaxError, TypeError):
        items = text.strip().strip("[]").split(",")
    return [c for c in (str(i).strip().strip("'\"").strip() for i in items) if c]


def _number(text: str) -> float | None:
    """A coordinate: None when empty, NaN when not a number (the box is then reported as invalid)."""
    if not (text or "").strip():
        return None
    try:
        return float(text)
    except ValueError:
        return math.nan


def vindr_records(root: str | Path) -> list[Record]:
    """One :class:`Record` per row of ``breast-level_annotations.csv``, with its findings attached."""
    root = Path(root)
    if not root.is_dir():
        raise BreastGenError("VinDr-Mammo root folder not found", root)
    _, breast_rows = read_csv_rows(root / BREAST_CSV, BREAST_COLUMNS)
    _, finding_rows = read_csv_rows(root / FINDING_CSV, FINDING_COLUMNS)
    if not (root / "images").is_dir():
        raise BreastGenError("no images/ folder (expected images/<study_id>/<image_id>.dicom)", root)
    findings: dict[str, list[dict]] = defaultdict(list)
    for row in finding_rows:
        findings[row["image_id"].strip()].append(row)

    records = []
    for row in breast_rows:
        study, image = row["study_id"].strip(), row["image_id"].strip()
        rec = Record(root / "images" / study / f"{image}.dicom", id=f"{study}/{image}", laterality=row["laterality"],
                     view=row["view_position"], density=row["breast_density"], split=row["split"], patient=study)
        try:
            rec.expected_size = (int(row["width"]), int(row["height"]))
        except (KeyError, ValueError):
            pass
        birads = (row.get("breast_birads") or "").upper().replace("BI-RADS", "").strip()
        boxes, box_findings, categories = [], [], set()
        for f in findings.get(image, ()):
            cats = parse_categories(f["finding_categories"])
            categories.update(cats)
            coords = [_number(f[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
            if set(cats) != {NO_FINDING} and any(c is not None for c in coords):
                boxes.append([math.nan if c is None else c for c in coords])
                box_findings.append([c for c in cats if c != NO_FINDING])
        if not categories:
            rec.problem = ("no findings row", f"image {image} has no row in {FINDING_CSV}")
        rec.healthy = categories == {NO_FINDING}
        rec.extra = {"label": "normal" if rec.healthy else "lesion", "birads": birads or None}
        if boxes:
            rec.extra.update(bbox=boxes, findings=box_findings)
        records.append(rec)
    if not records:
        raise BreastGenError("no rows", root / BREAST_CSV)
    return records


@main_guard
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, type=Path, help="VinDr-Mammo folder (CSV files and images/)")
    add_arguments(ap)
    args = ap.parse_args(argv)
    run_from_args(vindr_records(args.root), args)


if __name__ == "__main__":
    sys.exit(main())
