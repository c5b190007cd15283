#!/usr/bin/env python
"""Query time of the mammo2histo_link embedding index for 10^5 stored embeddings (exact KNN, scikit-learn).

For each embedding size and distance: time to fit ``NearestNeighbors``, median time of a single query
(k = 3, the bundle's setting) and per-query time of a batch of queries; also the index file's save / load time
and size. Vectors are random (Gaussian): brute-force cost does not depend on the values, tree methods do (they
are slower on real, clustered embeddings only by less). ``--write docs/benchmarks.md`` replaces the block between
``<!-- bench_mammo2histo:start -->`` and ``<!-- bench_mammo2histo:end -->``.

Usage::

    OMP_NUM_THREADS=1 python scripts/bench_mammo2histo.py --size 100000 --dims 128 1024 2048 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from breastgen.errors import BreastGenError, main_guard  # noqa: E402

NAME = "bench_mammo2histo"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=100_000, help="stored embeddings (default 10^5)")
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 1024, 2048], help="embedding sizes")
    ap.add_argument("--queries", type=int, default=20, help="single queries timed (median)")
    ap.add_argument("--batch", type=int, default=100, help="queries in the batched measurement")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--tree-dims", type=int, nargs="*", default=[128],
                    help="embedding sizes where ball_tree is also measured")
    ap.add_argument("--write", type=Path, default=None, help="Markdown file to update (docs/benchmarks.md)")
    return ap.parse_args(argv)


def bench_dim(dim: int, args) -> list[dict]:
    import numpy as np

    from breastgen.engines.perf import Stopwatch, median
    from breastgen.linking.index import METRICS, EmbeddingIndex

    rng = np.random.default_rng(dim)
    vectors = rng.standard_normal((args.size, dim), dtype=np.float32)
    queries = rng.standard_normal((max(args.queries, args.batch), dim), dtype=np.float32)
    index = EmbeddingIndex(vectors, [f"m{i}" for i in range(args.size)], "bench", rng.integers(0, 2, args.size))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.npz"
        with Stopwatch() as save:
            index.save(path)
        with Stopwatch() as load:
            EmbeddingIndex.load(path, "bench")
        file_mb = path.stat().st_size / 1e6
    for metric in METRICS:
        for algorithm in ("brute",) + (("ball_tree",) if dim in args.tree_dims else ()):
            index._fitted.clear()
            with Stopwatch() as fit:
                index._neighbours(metric, algorithm)
            singles = []
            for q in queries[:args.queries]:
                with Stopwatch() as sw:
                    index.search(q[None], args.k, metric, algorithm)
                singles.append(sw.wall)
            with Stopwatch() as batch:
                index.search(queries[:args.batch], args.k, metric, algorithm)
            rows.append({"dim": dim, "metric": metric, "algorithm": algorithm, "fit_s": fit.wall,
                         "single_ms": 1e3 * median(singles), "batch_ms": 1e3 * batch.wall / args.batch,
                         "save_s": save.wall, "load_s": load.wall, "file_mb": file_mb,
                         "ram_mb": args.size * dim * 8 / 1e6})
            print(f"d={dim} {metric:9s} {algorithm:9s} fit {fit.wall:6.2f} s  single {rows[-1]['single_ms']:8.1f} ms"
                  f"  batched {rows[-1]['batch_ms']:8.2f} ms/query", flush=True)
    return rows


def render(rows: list[dict], args, load: tuple, load_end: tuple, minutes: float) -> str:
    import sklearn
    import torch

    lines = [
        "### Embedding index query time, mammo2histo_link (`scripts/bench_mammo2histo.py`)",
        "",
        f"{args.size:,} stored embeddings (random float32, searched in float64 as the bundle does), k = {args.k}, "
        f"scikit-learn {sklearn.__version__} `NearestNeighbors`; single = median of {args.queries} one-query calls, "
        f"batched = {args.batch} queries in one call, per query. RAM = the float64 search copy (N x D x 8 bytes).",
        "",
        "| dim | distance | algorithm | fit (s) | single query (ms) | batched (ms / query) | RAM (MB) |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['dim']} | {r['metric']} | {r['algorithm']} | {r['fit_s']:.2f} | {r['single_ms']:.1f} | "
                     f"{r['batch_ms']:.2f} | {r['ram_mb']:.0f} |")
    io = {r["dim"]: r for r in rows}
    lines += ["", "Index file (`.npz`, float32 vectors + ids + labels + links): " + "; ".join(
        f"d = {d}: {r['file_mb']:.0f} MB, save {r['save_s']:.1f} s, load {r['load_s']:.1f} s" for d, r in io.items()) + ".",
              "",
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} (torch threads {torch.get_num_threads()}), "
              f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, run {minutes:.1f} min. "
              f"Load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the start, {load_end[0]:.1f} / "
              f"{load_end[1]:.1f} / {load_end[2]:.1f} at the end"
              + (" (shared machine: figures pessimistic)." if load[0] > 1.5 or load_end[0] > 1.5 else "."),
              f"Command: `OMP_NUM_THREADS=1 python scripts/bench_mammo2histo.py --size {args.size} --dims "
              f"{' '.join(map(str, args.dims))} --write docs/benchmarks.md`."]
    return "\n".join(lines)


@main_guard
def main(argv: list[str] | None = None) -> list[dict]:
    from breastgen.engines.perf import load_average, write_doc_block

    args = parse_args(argv)
    if args.size < args.k or args.size < 1:
        raise BreastGenError(f"--size must be >= k ({args.k}), got {args.size}")
    if any(d < 1 for d in args.dims):
        raise BreastGenError(f"embedding sizes must be >= 1, got {args.dims}")
    load, t0 = load_average(), time.perf_counter()
    rows = [r for d in args.dims for r in bench_dim(d, args)]
    block = render(rows, args, load, load_average(), (time.perf_counter() - t0) / 60)
    print(block)
    if args.write:
        write_doc_block(args.write, NAME, block)
        print(f"wrote the {NAME} block of {args.write}")
    return rows


if __name__ == "__main__":
    main()
