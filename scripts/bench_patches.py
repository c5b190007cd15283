#!/usr/bin/env python
"""Patch-extraction benchmark: 256 x 256 windows, stride 128 (the paper's settings) on full-field 16-bit
3328 x 4084 mammograms (synthetic, DICOM), one ROI each. Reports the median per image and patches/s for

* windows only: breast fraction + ROI overlap of every window and the labels (block sums), given the
  breast and ROI masks;
* extraction without writing: read the DICOM and the ROI, Otsu breast mask, intensity scaling, labels, crops;
* extraction writing 16-bit PNG patches + masks (what ``scripts/extract_patches.py`` does).

    OMP_NUM_THREADS=1 python scripts/bench_patches.py [--images 3] [--repeats 3] [--write docs/benchmarks.md]

``--write`` replaces the block between ``<!-- bench_patches:start -->`` and ``<!-- bench_patches:end -->``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from breastgen.data.patches import PatchSpec, cases_from_datalist, extract_cases, find_patches
from breastgen.data.transforms import breast_mask
from breastgen.engines.perf import write_doc_block
from breastgen.errors import main_guard
from breastgen.io.dicom import write_mg_dicom

W, H = 3328, 4084  # columns x rows of a full-field digital mammogram
NAME = "bench_patches"  # its block in docs/benchmarks.md


def full_field(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 16-bit (rows, cols) breast-like image and a lesion mask on the breast."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    inside = (xx / (0.72 * W)) ** 2 + ((yy - H / 2) / (0.44 * H)) ** 2 < 1
    tissue = (rng.random((-(-H // 16), -(-W // 16))) * 8000).astype(np.float32).repeat(16, 0).repeat(16, 1)[:H, :W]
    img = (np.where(inside, 20000 + tissue, 300) + rng.integers(0, 200, (H, W))).astype(np.uint16)
    cy, cx = H / 2 + rng.uniform(-600, 600), W * rng.uniform(0.25, 0.45)
    lesion = (xx - cx) ** 2 + (yy - cy) ** 2 < rng.uniform(100, 200) ** 2
    img[lesion] = np.minimum(img[lesion].astype(np.int32) + 6000, 65535).astype(np.uint16)
    return img, lesion


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(n_images: int, repeats: int) -> dict:
    import json

    from PIL import Image

    spec = PatchSpec(256, 128)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        entries, arrays = [], []
        for i in range(n_images):
            img, lesion = full_field(i)
            write_mg_dicom(tmp / f"mg{i}.dcm", img, laterality="L", view="CC", manufacturer="HOLOGIC, Inc.",
                           synthetic=True)
            Image.fromarray(lesion.astype(np.uint8) * 255).save(tmp / f"mg{i}_roi.png")
            entries.append({"image": f"mg{i}.dcm", "mask": f"mg{i}_roi.png", "label": "malignant"})
            arrays.append((breast_mask(img.T), lesion.T.copy()))
        (tmp / "datalist.json").write_text(json.dumps({"training": entries}))
        n_patches = sum(len(find_patches(b, [(r, "malignant")], spec)) for b, r in arrays)
        t_windows = median_time(lambda: [find_patches(b, [(r, "malignant")], spec) for b, r in arrays], repeats)
        cases = cases_from_datalist(tmp / "datalist.json")
        t_nowrite = median_time(lambda: extract_cases(cases, tmp / "o1", spec, write=False), repeats)
        t_write = median_time(lambda: extract_cases(cases, tmp / "o2", spec, write=True), repeats)
    per = n_patches / n_images
    return {"images": n_images, "patches_per_image": per, "repeats": repeats,
            "windows_ms": 1000 * t_windows / n_images, "windows_pps": n_patches / t_windows,
            "nowrite_ms": 1000 * t_nowrite / n_images, "nowrite_pps": n_patches / t_nowrite,
            "write_ms": 1000 * t_write / n_images, "write_pps": n_patches / t_write}


def block(r: dict, load: tuple[float, float, float]) -> str:
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return "\n".join([
        "### Patch extraction (`scripts/bench_patches.py`)",
        "",
        f"Full-field synthetic 16-bit DICOM mammograms, {W} x {H} (cols x rows), one ROI each; windows 256 x 256, "
        f"stride 128, kept when >= 75 % breast ({r['patches_per_image']:.0f} patches per image). Median of "
        f"{r['repeats']} runs over {r['images']} images; OMP_NUM_THREADS={threads}, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}.",
        "",
        "| step | ms / image | patches / s |",
        "| --- | ---: | ---: |",
        f"| windows + labels (block sums, masks given) | {r['windows_ms']:.0f} | {r['windows_pps']:.0f} |",
        f"| extraction: read DICOM + ROI, breast mask, scaling, crops (no writing) | {r['nowrite_ms']:.0f} | "
        f"{r['nowrite_pps']:.0f} |",
        f"| extraction writing 16-bit PNG patches + breast / lesion masks | {r['write_ms']:.0f} | {r['write_pps']:.0f} |",
        "",
        f"Measured on a machine shared with other jobs (load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "on 2 cores at the start): figures are pessimistic. Command: "
        "`OMP_NUM_THREADS=1 python scripts/bench_patches.py --images 3 --repeats 3 --write docs/benchmarks.md`.",
    ])


@main_guard
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", type=Path, default=None, help="markdown file to update (docs/benchmarks.md)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    load = os.getloadavg()
    r = run(args.images, args.repeats)
    text = block(r, load)
    print(text)
    if args.write:
        write_doc_block(args.write, NAME, text)


if __name__ == "__main__":
    main()
