#!/usr/bin/env python
"""Build the small deterministic demo dataset: phantoms (NOT real images) for every bundle and demo.

Usage::

    python scripts/make_demo_data.py --out demo_data [--seed 0] [--small]

Re-running overwrites the dataset in place (and removes files of an earlier, larger run), so the same seed
always gives the same images. ``--small`` builds a reduced set with every class present (for tests). Every
``datalist.json`` is MONAI style, ``{"training": [...], "validation": [...], "test": [...]}``, and its paths are
relative to the folder holding that datalist. Layout::

    demo_data/README.md
    demo_data/mammo/datalist.json                  dicom/<id>.dcm  tiff/<id>.tif  png/<id>.png  masks/<id>.png
    demo_data/histo/atypia/datalist.json           images/g<grade>_<nnn>.png  masks/g<grade>_<nnn>.png
    demo_data/histo/bci/{HE,IHC}/{train,test}/<nnnnn>_<split>_<score>.png   (+ datalist.json)
    demo_data/histo/breakhis_like/datalist.json    {benign,malignant}/<label>_<nnn>.png
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from breastgen.data.datalists import write_datalist
from breastgen.data.phantoms import (AREAS, DENSITIES, HER2_SCORES, LATERALITIES, VIEWS, make_benign_malignant_tile,
                                     make_he_tile, make_ihc_pair, make_mammogram)
from breastgen.errors import BreastGenError, main_guard
from breastgen.io.atomic import atomic_path, atomic_write_text
from breastgen.io.dicom import write_mg_dicom
from breastgen.prompts import build_prompt

MAMMO_SIZE = (256, 208)  # rows x cols: small enough for the demo to train in minutes on a CPU
TILE = 128
MANUFACTURER = {"siemens": "SIEMENS", "hologic": "HOLOGIC, Inc."}  # as real headers spell them
FULL = dict(mammo=48, atypia=30, bci=(24, 8), breakhis=20)  # atypia/breakhis: per class; bci: train, test pairs
SMALL = dict(mammo=12, atypia=6, bci=(8, 4), breakhis=6)

README = """# breastgen demo data: phantoms, not real images

Everything here was drawn by `breastgen.data.phantoms` (`python scripts/make_demo_data.py --out {out} --seed {seed}`).
No image comes from, or represents, a patient or a real acquisition. The phantoms exist so that every bundle runs
out of the box and so that demos can show that conditioning works; do not use them to judge image quality.

- `mammo/`: {mammo} 16-bit mammogram phantoms ({rows} rows x {cols} cols), each as DICOM (Digital Mammography
  X-Ray For Presentation, marked synthetic, no patient data), 16-bit TIFF and 16-bit PNG; lesion masks are
  uint8 PNG (0/255), bounding boxes `[x0, y0, x1, y1]` half-open with x = column. Left breasts have their chest
  wall on the image's left edge, right breasts on the right.
- `histo/atypia/`: H&E-like tiles by nuclear grade (label 0, 1, 2 = grade 1, 2, 3) with nuclei masks (0/255).
- `histo/bci/`: H&E / HER2-IHC tile pairs in the BCI layout `{{HE,IHC}}/{{train,test}}/<n>_<split>_<score>.png`.
- `histo/breakhis_like/`: benign (glands) and malignant (sheets of pleomorphic nuclei) tiles.

Each `datalist.json` has the sections `training`, `validation`, `test`; its paths are relative to its own folder.
"""


def _png(path: Path, array: np.ndarray) -> None:
    """Write uint8 (gray or RGB) or uint16 (mode "I;16") PNG atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _tiff(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array)


def _prune(folder: Path, pattern: str, keep: set[str]) -> None:
    """Remove files of an earlier run (our naming ``pattern`` only) that this run did not write."""
    if folder.is_dir():
        for f in folder.iterdir():
            if f.is_file() and re.fullmatch(pattern, f.name) and f.name not in keep:
                f.unlink()


def _split(i: int) -> str:
    """Deterministic 4:1:1 split of the i-th item of a class."""
    return "training" if i % 6 < 4 else "validation" if i % 6 == 4 else "test"


def _sections(entries: list[tuple[str, dict]]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for split, entry in entries:
        out[split].append(entry)
    return out


def build_mammo(out: Path, seed: int, n: int) -> int:
    """Mammograms over a balanced design: i -> (area i%3, density i%4, view, laterality) is a full 3x4x2x2
    factorial over 48 images, vendors alternate so each is balanced against every other factor, and every
    7th image (offset 3) is benign, every 7th (offset 6) malignant."""
    entries, written = [], set()
    for i in range(n):
        d, v, lat = i % 4, (i // 4) % 2, (i // 8) % 2
        vendor = ("siemens", "hologic")[(d + v + lat) % 2]
        lesion = {3: "benign", 6: "malignant"}.get(i % 7)
        m = make_mammogram(np.random.default_rng([seed, 0, i]), MAMMO_SIZE, view=VIEWS[v], laterality=LATERALITIES[lat],
                           density=DENSITIES[d], vendor=vendor, lesion=lesion, breast_area=AREAS[i % 3])
        name = f"mg{i:03d}"
        write_mg_dicom(out / "dicom" / f"{name}.dcm", m.image, laterality=m.laterality, view=m.view,
                       manufacturer=MANUFACTURER[vendor], synthetic=True, bits_stored=m.bits_stored,
                       extra={"SeriesDescription": f"breastgen phantom {m.laterality}{m.view}",
                              "ImageComments": f"PHANTOM drawn by breastgen.data.phantoms, not a real image "
                                               f"(seed {seed}, item {i}, density {m.density}, {m.label})"})
        _tiff(out / "tiff" / f"{name}.tif", m.image)
        _png(out / "png" / f"{name}.png", m.image)
        entry = {"image": f"dicom/{name}.dcm", "tiff": f"tiff/{name}.tif", "png": f"png/{name}.png"}
        if m.lesion:
            _png(out / "masks" / f"{name}.png", m.lesion_mask.astype(np.uint8) * 255)
            entry.update(mask=f"masks/{name}.png", bbox=m.bbox)
        entry.update(label=m.label, view=m.view, laterality=m.laterality, density=m.density, vendor=m.vendor,
                     area=m.area, prompt=build_prompt(vendor=m.vendor, view=m.view, density=m.density, area=m.area))
        entries.append((_split(i), entry))
        written.add(name)
    for sub, ext in (("dicom", "dcm"), ("tiff", "tif"), ("png", "png"), ("masks", "png")):
        _prune(out / sub, rf"mg\d{{3}}\.{ext}", {f"{w}.{ext}" for w in written})
    write_datalist(out / "datalist.json", _sections(entries))
    return n


def build_atypia(out: Path, seed: int, per_grade: int) -> int:
    entries, keep = [], set()
    for grade in (1, 2, 3):
        for j in range(per_grade):
            tile = make_he_tile(np.random.default_rng([seed, 1, grade, j]), TILE, grade)
            name = f"g{grade}_{j:03d}.png"
            _png(out / "images" / name, tile["image"])
            _png(out / "masks" / name, tile["nuclei_mask"] * 255)
            entries.append((_split(j), {"image": f"images/{name}", "mask": f"masks/{name}", "label": grade - 1,
                                        "grade": grade}))
            keep.add(name)
    for sub in ("images", "masks"):
        _prune(out / sub, r"g\d_\d{3}\.png", keep)
    write_datalist(out / "datalist.json", _sections(entries))
    return len(entries)


def build_bci(out: Path, seed: int, n_train: int, n_test: int) -> int:
    entries = []
    for split, n in (("train", n_train), ("test", n_test)):
        keep = set()
        for k in range(n):
            score = HER2_SCORES[k % len(HER2_SCORES)]
            pair = make_ihc_pair(np.random.default_rng([seed, 2, split == "test", k]), TILE, score)
            name = f"{k:05d}_{split}_{score}.png"
            _png(out / "HE" / split / name, pair["he"])
            _png(out / "IHC" / split / name, pair["ihc"])
            keep.add(name)
            entries.append(("training" if split == "train" else "test",
                            {"image": f"HE/{split}/{name}", "pair": f"IHC/{split}/{name}", "her2": score,
                             "label": HER2_SCORES.index(score)}))
        for stain in ("HE", "IHC"):
            _prune(out / stain / split, rf"\d{{5}}_{split}_(0|1\+|2\+|3\+)\.png", keep)
    write_datalist(out / "datalist.json", _sections(entries))
    return len(entries)


def build_breakhis(out: Path, seed: int, per_class: int) -> int:
    entries = []
    for c, label in enumerate(("benign", "malignant")):
        keep = set()
        for j in range(per_class):
            tile = make_benign_malignant_tile(np.random.default_rng([seed, 3, c, j]), TILE, label)
            name = f"{label}_{j:03d}.png"
            _png(out / label / name, tile["image"])
            keep.add(name)
            entries.append((_split(j), {"image": f"{label}/{name}", "label": c, "class": label}))
        _prune(out / label, rf"{label}_\d{{3}}\.png", keep)
    write_datalist(out / "datalist.json", _sections(entries))
    return len(entries)


@main_guard
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; overwritten in place)")
    parser.add_argument("--seed", type=int, default=0, help="non-negative seed (default 0)")
    parser.add_argument("--small", action="store_true", help="reduced set with every class present (tests)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        raise BreastGenError(f"--seed must be non-negative, not {args.seed}")
    if args.out.exists() and not args.out.is_dir():
        raise BreastGenError("--out exists and is not a folder", args.out)
    counts = SMALL if args.small else FULL
    start = time.perf_counter()
    n_mammo = build_mammo(args.out / "mammo", args.seed, counts["mammo"])
    n_atypia = build_atypia(args.out / "histo" / "atypia", args.seed, counts["atypia"])
    n_bci = build_bci(args.out / "histo" / "bci", args.seed, *counts["bci"])
    n_breakhis = build_breakhis(args.out / "histo" / "breakhis_like", args.seed, counts["breakhis"])
    atomic_write_text(args.out / "README.md", README.format(out=args.out, seed=args.seed, mammo=n_mammo,
                                                            rows=MAMMO_SIZE[0], cols=MAMMO_SIZE[1]))
    print(f"demo data (phantoms) in {args.out}: {n_mammo} mammograms, {n_atypia} atypia tiles, {n_bci} BCI pairs, "
          f"{n_breakhis} BreakHis-like tiles in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
