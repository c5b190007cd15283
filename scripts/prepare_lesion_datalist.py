#!/usr/bin/env python
"""Build the lesion-inpainting datalist of mammo_ldm_inpainting from CBIS-DDSM, mini-MIAS or a datalist with boxes.

    # CBIS-DDSM: case description CSVs + the folder holding the DICOM folders (lesion outlines = ROI masks)
    python scripts/prepare_lesion_datalist.py --out /data/cbis_inpaint --cbis-root /data/CBIS-DDSM \\
        --cbis-csv /data/mass_case_description_train_set.csv /data/mass_case_description_test_set.csv
    # mini-MIAS: Info.txt (centre + radius, y from the bottom) -> filled circles
    python scripts/prepare_lesion_datalist.py --out /data/mias_inpaint --mias /data/mias/Info.txt
    # any datalist with image + label + lesion mask (e.g. the demo phantoms)
    python scripts/prepare_lesion_datalist.py --out /tmp/inpaint --datalist demo_data/mammo/datalist.json

VinDr-Mammo needs no conversion: the datalist of ``scripts/prepare_vindr.py`` already holds ``bbox`` and
``label``, which the bundle turns into filled-box masks.

One entry per lesion: ``image`` (absolute path), ``mask`` (``masks/<case>_<k>.png``, 0/255, the image's size),
``bbox`` ([x0, y0, x1, y1] of the mask), ``label`` (benign / malignant); lesion-free images as
``{"image", "label": "normal"}``. Cases that cannot be used are skipped with a one-line reason (printed and in
``<out>/skipped.csv``).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from breastgen.data.datalists import write_datalist  # noqa: E402
from breastgen.data.patches import cases_from_cbis_ddsm, cases_from_datalist, cases_from_mias  # noqa: E402
from breastgen.data.readers import load_image  # noqa: E402
from breastgen.data.transforms import box_from_mask  # noqa: E402
from breastgen.errors import BreastGenError, main_guard  # noqa: E402
from breastgen.io import save_png  # noqa: E402
from breastgen.io.atomic import atomic_path  # noqa: E402


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--cbis-csv", type=Path, nargs="+", help="CBIS-DDSM *_case_description_*.csv file(s)")
    src.add_argument("--mias", type=Path, help="mini-MIAS annotation file (Info.txt layout)")
    src.add_argument("--datalist", type=Path, help="datalist with image / label / mask")
    ap.add_argument("--cbis-root", type=Path, help="CBIS-DDSM image folder (with --cbis-csv)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    return ap.parse_args(argv)


@main_guard
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cbis_csv:
        if args.cbis_root is None:
            raise BreastGenError("--cbis-csv needs --cbis-root (the folder holding the CBIS-DDSM DICOM folders)")
        cases = cases_from_cbis_ddsm(args.cbis_csv, args.cbis_root, args.val_fraction)
    elif args.mias:
        cases = cases_from_mias(args.mias, val_fraction=args.val_fraction)
    else:
        cases = cases_from_datalist(args.datalist)
    sections: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    skipped = []
    for case in cases:
        if case.problem:
            skipped.append((case.case_id, case.problem))
            continue
        try:
            arr, _ = load_image(case.image)
            shape = tuple(np.asarray(arr).shape[:2])
            entries = []
            for k, roi in enumerate(case.rois):
                mask, label = roi(shape)
                box = box_from_mask(mask)
                if box is None:
                    raise BreastGenError(f"lesion {k} has an empty mask", case.image)
                entries.append((mask, {"image": str(Path(case.image).resolve()),
                                       "mask": f"masks/{case.case_id}_{k}.png",
                                       "bbox": [int(v) for v in box], "label": label, **case.meta}))
        except BreastGenError as e:
            skipped.append((case.case_id, str(e)))
            print(f"skipped {case.case_id}: {e}", file=sys.stderr)
            continue
        for mask, entry in entries:
            save_png(mask.astype(np.float32), args.out / entry["mask"])
        sections[case.split] += [e for _, e in entries] or [
            {"image": str(Path(case.image).resolve()), "label": "normal", **case.meta}]
    if not any(sections.values()):
        raise BreastGenError(f"no usable case ({len(skipped)} skipped)", args.out)
    write_datalist(args.out / "datalist.json", sections)
    with atomic_path(args.out / "skipped.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "reason"])
        w.writerows(skipped)
    counts = {k: len(v) for k, v in sections.items()}
    lesions = sum(e["label"] != "normal" for v in sections.values() for e in v)
    print(f"wrote {args.out / 'datalist.json'}: {counts}, {lesions} lesions, {len(skipped)} case(s) skipped")
    return 0


if __name__ == "__main__":
    main()
