#!/usr/bin/env python
"""Prepare a folder of mammograms described by a CSV file (OPTIMAM-like data) for the mammography bundles.

Usage::

    python scripts/prepare_mammo_csv.py --csv cases.csv --root /data/dicoms --out /data/mammo_prepared
        [--healthy-only] [--val-fraction 0.1] [--seed 0] [--image-size 512] [--fit crop] [--map-view XCCL=CC]
        [--workers 8]

The CSV (comma separated, UTF-8, a header row; column names are case-insensitive, other columns are ignored)::

    path,laterality,view,density,vendor,patient_id,split,label
    P001/1.2.3.dcm,L,CC,B,,P001,,normal
    P001/1.2.4.dcm,,,C,,P001,test,
    P002/img.dcm,R,MLO,DENSITY D,HOLOGIC,,,lesion

- ``path`` (required): image file (DICOM, TIFF or PNG), relative to ``--root`` or absolute.
- ``laterality``: L / R (LEFT / RIGHT); else the DICOM ImageLaterality, the file name, or the image itself.
- ``view``: CC / MLO (other views only with ``--map-view``, e.g. XCCL=CC, else skipped); else the DICOM
  ViewPosition; unknown -> left out of the prompt.
- ``density``: BI-RADS density A-D, 1-4, "DENSITY C" or a word ("very low" .. "very high"); empty -> left out
  of the prompt; anything else -> skipped.
- ``vendor``: manufacturer or vendor word (hologic, siemens, ge ...); else the DICOM Manufacturer.
- ``patient_id``: all images of a patient land in one split; else the DICOM PatientID (or StudyInstanceUID);
  without any, an image counts as its own patient.
- ``split``: training / validation / test (or train, val, test); empty -> training. Without any validation
  row, ``--val-fraction`` of the training images (whole patients) become validation.
- ``label`` (required by ``--healthy-only``): normal / healthy / negative / no finding / 0 = healthy, anything
  else = with findings; copied into the entries.

An empty cell or a missing optional column means "not given"; other columns are ignored.

Writes ``<out>/datalist.json`` (see ``breastgen.data.prepare`` for the entries) and ``<out>/skipped.csv`` (one
line per skipped image and why: missing or unreadable file, wrong modality, unknown view or density ...). A
missing CSV, ``--root`` or required column is a one-line error (exit code 2) and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from breastgen.data.prepare import Record, add_arguments, read_csv_rows, run_from_args
from breastgen.errors import BreastGenError, main_guard

HEALTHY = {"normal", "healthy", "negative", "no finding", "0"}


def csv_records(csv_path: str | Path, root: str | Path, need_label: bool = False) -> list[Record]:
    """One :class:`Record` per CSV row; header values fill what the CSV leaves empty when the images are read."""
    root = Path(root)
    if not root.is_dir():
        raise BreastGenError("image root folder not found", root)
    columns, rows = read_csv_rows(csv_path, ("path", "label") if need_label else ("path",))
    records = []
    for i, row in enumerate(rows, start=2):  # line numbers as an editor shows them (header = line 1)
        rel = (row.get("path") or "").strip()
        label = (row.get("label") or "").strip()
        rec = Record(root / rel, id=f"line {i}: {rel}", laterality=row.get("laterality"), view=row.get("view"),
                     density=row.get("density"), vendor=row.get("vendor"), split=row.get("split"),
                     patient=row.get("patient_id"), healthy=label.lower() in HEALTHY if label else None,
                     extra={"label": label} if label else {})
        if not rel:
            rec.problem = ("missing path", "empty path cell")
        records.append(rec)
    if not records:
        raise BreastGenError("no rows", csv_path)
    return records


@main_guard
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", required=True, type=Path, help="CSV describing the images (format above)")
    ap.add_argument("--root", required=True, type=Path, help="folder the CSV's paths are relative to")
    add_arguments(ap)
    args = ap.parse_args(argv)
    run_from_args(csv_records(args.csv, args.root, need_label=args.healthy_only), args)


if __name__ == "__main__":
    sys.exit(main())
