#!/usr/bin/env python
"""Cut mammograms into labelled patches (normal / benign / malignant) for mammo_cigan_infill and
mammo_patch_classifier: a sliding window (paper: 256 x 256, stride 128) kept when mostly breast, labelled by its
overlap with the ROI masks.

    # CBIS-DDSM: case description CSVs + the folder holding the DICOM folders
    python scripts/extract_patches.py --out /data/cbis_patches --cbis-root /data/CBIS-DDSM \\
        --cbis-csv /data/mass_case_description_train_set.csv /data/mass_case_description_test_set.csv
    # mini-MIAS: the Info.txt annotation file (y measured from the bottom) and the .pgm images beside it
    python scripts/extract_patches.py --out /data/mias_patches --mias /data/mias/Info.txt
    # any datalist with image, label (normal/benign/malignant) and lesion mask
    python scripts/extract_patches.py --out demo_out/patches --datalist demo_data/mammo/datalist.json --size 64 --stride 16

CBIS-DDSM quirks handled: path strings with stray newlines; TCIA folder names that differ from the CSV paths
(the DICOMs of the case folder are used); ROI mask and cropped image swapped (told apart by content: the mask is
binary and as large as the image). A case that cannot be used (unknown pathology, ROI file missing, ROI of the
wrong size or off the breast, unreadable image) is skipped with a one-line reason -- together with the rest of
its image, whose other windows could not be called normal -- and the extraction goes on; the end prints a
summary of what was skipped. Writes ``<out>/datalist.json``, ``<out>/summary.json`` and the patch PNGs.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from breastgen.data.patches import (PatchSpec, cases_from_cbis_ddsm, cases_from_datalist,  # noqa: E402
                                    cases_from_mias, extract_cases)
from breastgen.errors import BreastGenError, main_guard  # noqa: E402

_KINDS = (  # reason pattern -> summary category
    (r"unknown pathology|unknown severity|unknown label", "unknown pathology / severity"),
    (r"ROI mask file not found", "ROI files missing"),
    (r"no ROI mask among", "ROI mask missing (only a cropped image)"),
    (r"ROI mask size .* differs|mask size .* differs", "ROI mask of the wrong size"),
    (r"touches no breast tissue", "ROI off the breast"),
    (r"image file not found|file not found", "image file missing"),
    (r"without centre|without a 'mask'|but a lesion mask", "incomplete annotation"),
)


def kind_of(reason: str) -> str:
    return next((k for pattern, k in _KINDS if re.search(pattern, reason)), "unreadable or invalid input")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--cbis-csv", type=Path, nargs="+", help="CBIS-DDSM *_case_description_*.csv file(s)")
    src.add_argument("--mias", type=Path, help="mini-MIAS annotation file (Info.txt layout)")
    src.add_argument("--datalist", type=Path, help="datalist with image / label / mask")
    ap.add_argument("--cbis-root", type=Path, help="folder the CSV paths are relative to (default: the CSV's folder)")
    ap.add_argument("--mias-images", type=Path, help="folder of the mini-MIAS images (default: beside Info.txt)")
    ap.add_argument("--size", type=int, default=256, help="patch side in pixels (256)")
    ap.add_argument("--stride", type=int, default=128, help="window stride (128)")
    ap.add_argument("--min-breast", type=float, default=0.75, help="least breast fraction of a kept window (0.75)")
    ap.add_argument("--min-lesion-overlap", type=float, default=0.5,
                    help="least ROI overlap / min(ROI area, window area) of a lesion patch (0.5)")
    ap.add_argument("--max-normal-per-image", type=int, default=None, help="random subset of normal windows")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="validation share of training patients (0.1)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


@main_guard
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    spec = PatchSpec(args.size, args.stride, args.min_breast, args.min_lesion_overlap, args.max_normal_per_image,
                     args.seed)
    if args.out.exists() and not args.out.is_dir():
        raise BreastGenError("--out exists and is not a folder", args.out)
    if args.cbis_csv:
        root = args.cbis_root or args.cbis_csv[0].parent
        if not root.is_dir():
            raise BreastGenError("--cbis-root is not a folder", root)
        cases, source = cases_from_cbis_ddsm(args.cbis_csv, root, args.val_fraction), "CBIS-DDSM"
    elif args.mias:
        cases, source = cases_from_mias(args.mias, args.mias_images, args.val_fraction), "mini-MIAS"
    else:
        cases, source = cases_from_datalist(args.datalist), "datalist"
    start = time.perf_counter()

    def report(case, n, reason):
        if reason:
            print(f"skipped {case.case_id}: {reason}", file=sys.stderr, flush=True)

    try:
        summary = extract_cases(cases, args.out, spec, source=source, on_case=report)
    except BreastGenError as e:
        print(f"skipped all {len(cases)} case(s)", file=sys.stderr)
        raise e
    counts = summary["counts"]
    per_split = "; ".join(f"{s}: " + ", ".join(f"{c} {n}" for c, n in cs.items()) for s, cs in counts.items() if any(cs.values()))
    print(f"extracted {summary['n_patches']} patches of {spec.size} x {spec.size} (stride {spec.stride}) from "
          f"{summary['n_cases'] - summary['n_skipped']} of {summary['n_cases']} {source} images in "
          f"{time.perf_counter() - start:.1f} s ({per_split}) -> {summary['datalist']}")
    if summary["skipped"]:
        kinds = Counter(kind_of(s["reason"]) for s in summary["skipped"])
        print(f"skipped {summary['n_skipped']} of {summary['n_cases']} images: "
              + ", ".join(f"{k} ({n})" for k, n in kinds.most_common()) + " -- reasons above and in summary.json")
    return summary


if __name__ == "__main__":
    main()
