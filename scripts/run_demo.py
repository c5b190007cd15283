"""`make demo`: build the demo phantoms, run every bundle's demo (tiny train -> infer -> evaluate) and write
``demo_out/index.html`` with image grids and metrics.

    python scripts/run_demo.py --data demo_data --out demo_out [--bundles name ...] [--skip-data] [--jobs 2]
"""

from __future__ import annotations

import argparse
import html
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from breastgen.bundle import demo_requires
from breastgen.data.datalists import load_datalist
from breastgen.data.readers import load_image
from breastgen.errors import BreastGenError, main_guard
from breastgen.io import atomic_write_json, atomic_write_text, make_grid, save_png

ROOT = Path(__file__).resolve().parents[1]


def _load(path) -> np.ndarray:
    """An image in MONAI layout: (W, H) grey or (3, W, H) RGB."""
    a = load_image(path)[0]
    return np.moveaxis(a, -1, 0) if a.ndim == 3 else a


def phantom_gallery(data: Path, out: Path) -> list[tuple[str, str]]:
    """Grids of the demo phantoms; returns (caption, relative png path) pairs."""
    out.mkdir(parents=True, exist_ok=True)
    shown = []
    mammo = load_datalist(data / "mammo" / "datalist.json", "training")
    order = sorted(mammo, key=lambda e: (e["view"], e["laterality"], e["density"], e["vendor"]))
    picks = [e for i, e in enumerate(order) if i % max(1, len(order) // 16) == 0][:16]
    imgs = [load_image(e["image"])[0].astype(np.float32) for e in picks]
    save_png(make_grid([a / max(1.0, float(a.max())) for a in imgs], ncol=8), out / "mammo_phantoms.png")
    shown.append(("Mammogram phantoms (16-bit DICOM): " + "; ".join(
        f"{e['view']}-{e['laterality']} {e['density']} {e['vendor']}" for e in picks[:8]) + " ...",
                  "phantoms/mammo_phantoms.png"))
    lesions = [e for e in mammo if e.get("mask")][:8]
    if lesions:
        imgs = []
        for e in lesions:
            img = load_image(e["image"])[0].astype(np.float32)
            img /= max(1.0, img.max())
            m = load_image(e["mask"])[0] > 0
            rgb = np.stack([np.maximum(img, 0.6 * m), img, img])
            imgs += [img, rgb]
        save_png(make_grid(imgs, ncol=8), out / "mammo_lesions.png")
        shown.append(("Phantoms with lesions, image and mask overlay", "phantoms/mammo_lesions.png"))
    atypia = load_datalist(data / "histo" / "atypia" / "datalist.json", "training")
    by_grade = [[e for e in atypia if int(e["label"]) == g][:6] for g in (0, 1, 2)]
    save_png(make_grid([_load(e["image"]) for row in by_grade for e in row], ncol=6), out / "atypia.png")
    shown.append(("H&E atypia phantoms, one row per grade 1 / 2 / 3", "phantoms/atypia.png"))
    he = sorted((data / "histo" / "bci" / "HE" / "train").glob("*.png"))[:6]
    pairs = []
    for p in he:
        pairs += [_load(p), _load(data / "histo" / "bci" / "IHC" / "train" / p.name)]
    if pairs:
        save_png(make_grid(pairs, ncol=6), out / "bci_pairs.png")
        shown.append(("Paired H&E / IHC phantoms (HER2 score in the file name)", "phantoms/bci_pairs.png"))
    return shown


def write_index(out: Path, gallery: list[tuple[str, str]], results: dict) -> Path:
    parts = ["<!doctype html><meta charset='utf-8'><title>breastgen demo</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}img{max-width:100%;image-rendering:pixelated}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>",
             "<h1>breastgen demo</h1><p>Tiny models trained for minutes on <b>phantoms</b> (synthetic images made "
             "by <code>scripts/make_demo_data.py</code>), not real images: the demo shows that every bundle runs "
             "end to end and that conditioning works, nothing about clinical image quality.</p>",
             "<h2>Demo data</h2>"]
    for caption, src in gallery:
        parts.append(f"<figure><img src='{html.escape(src)}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    for name, res in results.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        if res.get("error"):
            parts.append(f"<p style='color:#b00'>failed: {html.escape(res['error'])}</p>")
        if res.get("stages"):
            parts.append("<p>" + ", ".join(f"{s['stage']} {s['seconds']} s" for s in res["stages"]) + "</p>")
        metrics = out / name / "metrics.json"
        if metrics.is_file():
            flat = json.loads(metrics.read_text())
            rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v))}</td></tr>"
                           for k, v in flat.items())
            parts.append(f"<table>{rows}</table>")
        for png in sorted((out / name).rglob("*.png"))[:24]:
            rel = png.relative_to(out).as_posix()
            parts.append(f"<figure><img src='{html.escape(rel)}'><figcaption>{html.escape(rel)}</figcaption></figure>")
    return atomic_write_text(out / "index.html", "\n".join(parts) + "\n")


def run_all(bundles: list[Path], data: Path, out: Path, jobs: int = 1) -> dict[str, dict]:
    """Run the bundles' demos, ``jobs`` at a time, each in its own process (``python -m breastgen.bundle demo``,
    log in ``<out>/<bundle>/demo.log``); a bundle starts once the demos it requires (``demo_requires``) are done.
    Small demo networks gain little from a second thread, so on 2 cores two one-thread demos side by side
    finish sooner than one two-thread demo after the other."""
    pending = list(bundles)
    needs = {b.name: set(demo_requires(b).values()) for b in bundles}
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    results: dict[str, dict] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if jobs > 1 else dict(os.environ)
    try:
        while pending or running:
            for b in list(pending):
                failed = [n for n in needs[b.name] if results.get(n, {}).get("error")]
                if failed:
                    results[b.name] = {"error": f"needs the {', '.join(failed)} demo, which failed"}
                    pending.remove(b)
                elif len(running) < max(1, jobs) and needs[b.name] <= {n for n in results if "stages" in results[n]}:
                    log = out / b.name / "demo.log"
                    log.parent.mkdir(parents=True, exist_ok=True)
                    print(f"[demo] {b.name} ...", flush=True)
                    with open(log, "w", encoding="utf-8") as fh:
                        cmd = [sys.executable, "-m", "breastgen.bundle", "demo", str(b), "--data", str(data),
                               "--out", str(out / b.name)]
                        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
                    running[b.name] = (proc, time.perf_counter(), log)
                    pending.remove(b)
            for name, (proc, t0, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                stages = out / name / "demo_stages.json"
                if proc.returncode == 0 and stages.is_file():
                    results[name] = {"stages": json.loads(stages.read_text(encoding="utf-8")),
                                     "seconds": round(time.perf_counter() - t0, 1)}
                    print(f"[demo] {name} done in {results[name]['seconds']:.0f} s", flush=True)
                else:
                    lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
                    last = lines[-1] if lines else ""
                    reason = next((ln for ln in reversed(lines) if ln.startswith("error:")), last)
                    results[name] = {"error": f"{reason} (log: {log})"}
                    print(f"[demo] {name} failed: {results[name]['error']}", file=sys.stderr, flush=True)
            time.sleep(0.5)
    finally:  # interrupted (Ctrl-C, SIGTERM): no orphaned demo processes
        for proc, _, _ in running.values():
            proc.terminate()
    return results


def _sigterm(signum, frame):  # SIGTERM like Ctrl-C, so run_all stops its demo processes
    raise KeyboardInterrupt


@main_guard
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="demo_data", type=Path)
    ap.add_argument("--out", default="demo_out", type=Path)
    ap.add_argument("--bundles", nargs="*", default=None, help="bundle names (default: all in bundles/)")
    ap.add_argument("--skip-data", action="store_true", help="reuse existing demo data")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="bundle demos run at once, one thread each (default: min(2, cores)); 1 = one after the "
                         "other with all threads")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    t0 = time.perf_counter()
    if not args.skip_data or not (args.data / "mammo" / "datalist.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--out", str(args.data)], check=True)
    gallery = phantom_gallery(args.data, args.out / "phantoms")
    bundles = sorted(p for p in (ROOT / "bundles").iterdir() if (p / "configs" / "demo.json").is_file())
    if args.bundles:
        bundles = [b for b in bundles if b.name in args.bundles]
    results = run_all(bundles, args.data, args.out, args.jobs)
    atomic_write_json(args.out / "demo_summary.json", {"seconds": round(time.perf_counter() - t0, 1), "bundles": results})
    index = write_index(args.out, gallery, results)
    print(f"[demo] wrote {index} in {time.perf_counter() - t0:.0f} s")
    failed = [n for n, r in results.items() if r.get("error")]
    if failed:
        raise BreastGenError(f"demo failed for: {', '.join(failed)} (see {args.out / 'demo_summary.json'})")
    return 0


if __name__ == "__main__":
    main()
