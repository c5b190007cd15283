"""I/O benchmark: full-field 16-bit 3328 x 4084 mammogram (DICOM and TIFF) -> 512 x 512 preprocessed tensor.

Measures the median ms/image on one thread (goal <= 150 ms), and a cached second epoch (MONAI
PersistentDataset and CacheDataset) against the first (goal >= 10x faster). Writes the figures into
docs/benchmarks.md between the `bench_io` markers with ``--write``.

    python scripts/bench_io.py [--repeats 15] [--images 8] [--write docs/benchmarks.md]
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
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose, EnsureTyped, LoadImaged

from breastgen.data.readers import MammoImageReader
from breastgen.data.transforms import FlipToLateralityd, ResizeToSquared, ScaleIntensityMammod
from breastgen.engines.perf import write_doc_block
from breastgen.errors import main_guard
from breastgen.io.dicom import write_mg_dicom

W, H, SIZE = 3328, 4084, 512


def synthetic_full_field(seed: int) -> np.ndarray:
    """A 16-bit 4084 x 3328 (rows x cols) breast-like image: realistic size and bit depth for I/O timing."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    inside = (xx / (0.75 * W)) ** 2 + ((yy - H / 2) / (0.42 * H)) ** 2 < 1
    tissue = (rng.random((H // 16 + 1, W // 16 + 1)) * 8000).astype(np.float32).repeat(16, 0).repeat(16, 1)[:H, :W]
    img = np.where(inside, 20000 + tissue, 300) + rng.integers(0, 200, (H, W))
    return img.astype(np.uint16)


def write_inputs(folder: Path, n: int) -> dict[str, list[Path]]:
    import tifffile

    out: dict[str, list[Path]] = {"dicom": [], "tiff": []}
    for i in range(n):
        img = synthetic_full_field(i)
        out["dicom"].append(write_mg_dicom(folder / f"mg{i}.dcm", img, laterality="L", view="CC",
                                           manufacturer="HOLOGIC, Inc.", synthetic=True) or folder / f"mg{i}.dcm")
        tifffile.imwrite(folder / f"mg{i}.tif", img)
        out["tiff"].append(folder / f"mg{i}.tif")
    return out


def pipeline() -> Compose:
    return Compose([
        LoadImaged("image", reader=MammoImageReader(), ensure_channel_first=True),
        FlipToLateralityd("image", laterality_key=None),
        ResizeToSquared("image", size=SIZE, fit="crop", mode="area"),
        ScaleIntensityMammod("image"),
        EnsureTyped("image", track_meta=False),
    ])


def time_per_image(paths: list[Path], repeats: int) -> list[float]:
    pre = pipeline()
    times = []
    for r in range(repeats):
        p = paths[r % len(paths)]
        t0 = time.perf_counter()
        out = pre({"image": str(p)})
        times.append((time.perf_counter() - t0) * 1000)
        assert tuple(out["image"].shape) == (1, SIZE, SIZE)
    return times


def epoch_seconds(ds) -> float:
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return time.perf_counter() - t0


def cache_speedups(paths: list[Path], cache_dir: Path) -> dict[str, tuple[float, float]]:
    data = [{"image": str(p)} for p in paths]
    res = {}
    pds = PersistentDataset(data, pipeline(), cache_dir=cache_dir)
    res["PersistentDataset"] = (epoch_seconds(pds), epoch_seconds(pds))
    first = epoch_seconds(Dataset(data, pipeline()))
    t0 = time.perf_counter()
    cds = CacheDataset(data, pipeline(), num_workers=0, progress=False)
    build = time.perf_counter() - t0
    res["CacheDataset"] = (max(first, build), epoch_seconds(cds))
    return res


def render(results: dict, args) -> str:
    lines = [f"Command: `OMP_NUM_THREADS=1 python scripts/bench_io.py --repeats {args.repeats} --images {args.images}"
             f" --write docs/benchmarks.md` ({platform.processor() or platform.machine()}, torch "
             f"{torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d')}, load average "
             f"{results['load'][0]:.1f} / {results['load'][1]:.1f} at start / end on 2 cores"
             f"{': shared with other jobs, figures pessimistic' if max(results['load']) > 1.5 else ''}).", "",
             f"Full-field 16-bit {W} x {H} mammogram -> {SIZE} x {SIZE} float tensor (read, flip to L, area resize "
             "+ centre crop, percentile scaling):", "",
             "| input | median ms/image | p90 ms | goal |", "| --- | --- | --- | --- |"]
    for fmt, times in results["per_image"].items():
        lines.append(f"| {fmt} | {statistics.median(times):.0f} | {np.percentile(times, 90):.0f} | <= 150 |")
    lines += ["", f"Cached second epoch vs first ({args.images} DICOMs):", "",
              "| dataset | epoch 1 s | epoch 2 s | speed-up | goal |", "| --- | --- | --- | --- | --- |"]
    for name, (e1, e2) in results["cache"].items():
        lines.append(f"| {name} | {e1:.2f} | {e2:.3f} | {e1 / max(e2, 1e-9):.0f}x | >= 10x |")
    return "\n".join(lines)


@main_guard
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--write", type=Path, default=None, help="update this markdown file (docs/benchmarks.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = write_inputs(tmp, args.images)
        results = {"per_image": {}, "cache": {}, "load": [os.getloadavg()[0]]}
        for fmt, paths in inputs.items():
            time_per_image(paths, 2)  # warm-up
            results["per_image"][fmt] = time_per_image(paths, args.repeats)
        results["cache"] = cache_speedups(inputs["dicom"], tmp / "cache")
        results["load"].append(os.getloadavg()[0])
    block = render(results, args)
    print(block)
    if args.write:
        write_doc_block(args.write, "bench_io", block)


if __name__ == "__main__":
    main()
