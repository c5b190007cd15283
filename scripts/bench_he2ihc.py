#!/usr/bin/env python
"""Benchmark: milliseconds per 1024x1024 H&E tile for the he2ihc_pyramidpix2pix generators on the CPU.

Usage::

    OMP_NUM_THREADS=2 python scripts/bench_he2ihc.py [--size 1024] [--roi 512] [--repeats 2] [--threads 2]
                                                    [--generators resnet_9blocks resnet_9blocks_attention unet]
                                                    [--write docs/benchmarks.md]

Each generator is built with the bundle's full-size settings (ngf 64, BatchNorm; attention with keys/values pooled
to 32x32; the U-Net baseline with 8 levels), randomly initialised (speed does not depend on the weights), in eval
mode, and run through ``breastgen.engines.gan.ImageTranslator`` exactly as ``inference.json`` runs it: sliding
window at the 512 px training size (overlap 0.25, Gaussian blending; 9 windows for a 1024 px tile), plus a
single whole-tile pass for comparison. Reported: median wall time over ``--repeats`` runs after a warm-up, and
the system load average, because a shared machine inflates the figures. ``--write`` rewrites only the
block between ``<!-- bench_he2ihc:start -->`` and ``<!-- bench_he2ihc:end -->``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from breastgen.engines.gan import ImageTranslator
from breastgen.engines.perf import write_doc_block
from breastgen.errors import BreastGenError, main_guard
from breastgen.networks.pix2pix import ResnetGenerator, UNetGenerator

NAME = "bench_he2ihc"  # its block in docs/benchmarks.md
GENERATORS = {
    "resnet_9blocks": lambda: ResnetGenerator(ngf=64, n_blocks=9, dropout=0.5),
    "resnet_9blocks_attention": lambda: ResnetGenerator(ngf=64, n_blocks=9, dropout=0.5, attention=True,
                                                        attn_kv_grid=32),
    "unet": lambda: UNetGenerator(channels=(64, 128, 256, 512, 512, 512, 512, 512)),
}


def bench(name: str, size: int, roi: int, repeats: int) -> dict:
    torch.manual_seed(0)
    net = GENERATORS[name]()
    tile = torch.rand(3, size, size)
    row = {"generator": name, "params_m": sum(p.numel() for p in net.parameters()) / 1e6}
    for mode, r in (("sliding", roi), ("whole", None)):
        tr = ImageTranslator(net, roi_size=r, overlap=0.25, mode="gaussian")
        tr(torch.rand(3, 256, 256))  # warm-up (allocator, kernels)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = tr(tile)
            times.append(time.perf_counter() - t0)
        if out.shape != tile.shape:
            raise RuntimeError(f"{name}: output {tuple(out.shape)} != input {tuple(tile.shape)}")
        row[f"{mode}_ms"] = 1000 * statistics.median(times)
        print(f"{name:26s} {mode:8s} {row[f'{mode}_ms']:10.0f} ms/tile  (runs: "
              + ", ".join(f"{1000 * t:.0f}" for t in times) + ")", flush=True)
    return row


def markdown(rows: list[dict], args: argparse.Namespace, load: tuple[float, float], cmd: str) -> str:
    lines = ["### HE -> IHC generator inference, he2ihc_pyramidpix2pix (`scripts/bench_he2ihc.py`)", "",
             f"Milliseconds per {args.size}x{args.size} RGB tile (median of {args.repeats} runs after a warm-up), "
             f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} logical CPU(s), torch {torch.__version__}. \"sliding\" is what `inference.json` / "
             f"`evaluate.json` do (windows of the {args.roi} px training size, overlap 0.25, Gaussian blending: 9 "
             f"windows per {args.size} px tile); \"whole\" is one pass over the full tile.", "",
             "| generator | parameters (M) | sliding window (ms/tile) | whole tile (ms/tile) |",
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['generator']} | {r['params_m']:.1f} | {r['sliding_ms']:.0f} | {r['whole_ms']:.0f} |" for r in rows]
    lines += ["", f"System load average (1 min) {load[0]:.1f} at the start and {load[1]:.1f} at the end of the run"
              + (f" on {os.cpu_count()} CPUs: the machine was shared with other jobs during the measurement, so "
                 "these figures are pessimistic; re-measure on an idle machine before planning a deployment."
                 if max(load) > 0.5 * (os.cpu_count() or 1) else "."),
              "", "Command:", "", "```bash", cmd, "```"]
    return "\n".join(lines)


@main_guard
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--roi", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS / torch's)")
    ap.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    ap.add_argument("--write", type=Path, default=None, help="write the results block into this Markdown file")
    args = ap.parse_args(argv)
    if args.size < 64 or args.roi < 64 or args.repeats < 1:
        raise BreastGenError("--size and --roi must be >= 64 and --repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    rows = [bench(name, args.size, args.roi, args.repeats) for name in args.generators]
    load1 = os.getloadavg()[0]
    cmd = (f"OMP_NUM_THREADS={torch.get_num_threads()} python scripts/bench_he2ihc.py --size {args.size} "
           f"--roi {args.roi} --repeats {args.repeats} --generators {' '.join(args.generators)}"
           + (f" --write {args.write}" if args.write else ""))
    block = markdown(rows, args, (load0, load1), cmd)
    print(block)
    if args.write:
        write_doc_block(args.write, NAME, block)


if __name__ == "__main__":
    sys.exit(main())
