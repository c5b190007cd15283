#!/usr/bin/env python
"""Pair lesion mammograms with histology of the same pathology for bundles/mammo2histo_link.

Two inputs::

    # BCDR mammograms (TIFF below --bcdr, one CSV row per lesion outline) + BreaKHis histology
    python scripts/prepare_mammo2histo.py bcdr-breakhis --bcdr /data/BCDR-D01_dataset \\
        --bcdr-csv /data/BCDR-D01_dataset/bcdr_d01_outlines.csv --breakhis /data/BreaKHis_v1 \\
        --out /data/mammo2histo [--magnification 40] [--pairs-per-mammogram 1]

    # any two MONAI datalists (e.g. the demo phantoms): mammograms labelled benign / malignant in --mammo-label,
    # histology in --histo-label
    python scripts/prepare_mammo2histo.py datalists --mammo demo_data/mammo/datalist.json \\
        --histo demo_data/histo/breakhis_like/datalist.json --histo-label class --out /data/mammo2histo_demo

Output: ``<out>/pairs.json`` (pairs datalist), ``<out>/histology.json`` (every histology image, same split) and
``<out>/summary.json``. Pairs match pathology (benign with benign, malignant with malignant), are drawn with a fixed
seed, and the split is patient-disjoint for both modalities (see ``breastgen.linking.pairs``). BCDR rows whose
classification is neither benign nor malignant are skipped (counted in the summary); every other problem (missing
file, malformed outline, a BreaKHis name that does not fit its folder, a label without histology) is one error
line and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from breastgen.errors import main_guard  # noqa: E402


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="layout", required=True)
    b = sub.add_parser("bcdr-breakhis", help="BCDR TIFFs + outline CSV(s) and the BreaKHis folder tree")
    b.add_argument("--bcdr", required=True, type=Path, help="folder the CSV's image_filename paths are relative to")
    b.add_argument("--bcdr-csv", required=True, type=Path, nargs="+", help="BCDR outline CSV file(s)")
    b.add_argument("--breakhis", required=True, type=Path, help="BreaKHis_v1 (or the folder holding it)")
    b.add_argument("--magnification", type=int, nargs="+", default=None, choices=(40, 100, 200, 400),
                   help="BreaKHis magnification(s) to use (default: all)")
    for name, default in (("image", "image_filename"), ("patient", "patient_id"), ("label", "classification"),
                          ("lesion", "lesion_id"), ("x", "lw_x_points"), ("y", "lw_y_points")):
        b.add_argument(f"--{name}-column", default=default, help=f"BCDR CSV column (default {default})")
    d = sub.add_parser("datalists", help="two MONAI datalists with benign / malignant labels")
    d.add_argument("--mammo", required=True, type=Path, help="mammogram datalist (key 'image')")
    d.add_argument("--histo", required=True, type=Path, help="histology datalist (key 'image')")
    d.add_argument("--mammo-label", default="label", help="field holding benign / malignant (default label)")
    d.add_argument("--histo-label", default="label", help="field holding benign / malignant (default label)")
    for p in (b, d):
        p.add_argument("--out", required=True, type=Path)
        p.add_argument("--pairs-per-mammogram", type=int, default=1)
        p.add_argument("--val-fraction", type=float, default=0.1)
        p.add_argument("--test-fraction", type=float, default=0.2)
        p.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


@main_guard
def main(argv: list[str] | None = None) -> dict:
    from breastgen.linking.pairs import items_from_datalist, make_pairs, read_bcdr, scan_breakhis, write_pairs

    args = parse_args(argv)
    skipped: list[dict] = []
    if args.layout == "bcdr-breakhis":
        mammos, skipped = read_bcdr(args.bcdr, args.bcdr_csv, image_column=args.image_column,
                                    patient_column=args.patient_column, label_column=args.label_column,
                                    lesion_column=args.lesion_column, x_column=args.x_column, y_column=args.y_column)
        histos = scan_breakhis(args.breakhis, args.magnification)
        sources = {"bcdr": str(args.bcdr.resolve()), "bcdr_csv": [str(p.resolve()) for p in args.bcdr_csv],
                   "breakhis": str(args.breakhis.resolve()), "magnification": args.magnification}
    else:
        mammos = items_from_datalist(args.mammo, "image", args.mammo_label)
        histos = items_from_datalist(args.histo, "image", args.histo_label)
        sources = {"mammo_datalist": str(args.mammo.resolve()), "histo_datalist": str(args.histo.resolve())}
    pairs, histology = make_pairs(mammos, histos, args.pairs_per_mammogram, args.val_fraction, args.test_fraction,
                                  args.seed)
    summary = write_pairs(args.out, pairs, histology, {
        "layout": args.layout, "sources": sources, "pairs_per_mammogram": args.pairs_per_mammogram,
        "val_fraction": args.val_fraction, "test_fraction": args.test_fraction, "seed": args.seed,
        "mammograms": len(mammos), "histology": len(histos), "skipped": skipped})
    counts = summary["counts"]
    print(f"wrote {args.out / 'pairs.json'}: " + ", ".join(
        f"{s} {counts[s]['pairs']} pairs ({counts[s]['mammograms']} mammograms, {counts[s]['histology']} histology)"
        for s in ("training", "validation", "test")) + (f"; {len(skipped)} CSV row(s) skipped (see summary.json)"
                                                        if skipped else ""))
    return summary


if __name__ == "__main__":
    main()
