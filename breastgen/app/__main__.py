"""``python -m breastgen.app``: serve the GUI (see ``docs/gui.md``)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from ..errors import BreastGenError, main_guard


def _pairs(values: Sequence[str], what: str) -> list[tuple[str, Path]]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise BreastGenError(f"{what} must be NAME=PATH, got {v!r}")
        out.append((name, Path(path)))
    return out


@main_guard
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m breastgen.app", description="breastgen web GUI (Gradio)")
    ap.add_argument("--bundle-dir", type=Path, default=Path("bundles"), help="folder of the bundles (default: bundles)")
    ap.add_argument("--demo-out", type=Path, default=Path("demo_out"),
                    help="demo output folder holding <bundle>/models/ (what `make demo` writes; default: demo_out)")
    ap.add_argument("--demo-data", type=Path, default=Path("demo_data"),
                    help="demo data offered as example inputs when present (default: demo_data)")
    ap.add_argument("--checkpoints", action="append", default=[], metavar="BUNDLE=DIR",
                    help="use a trained, full-size model: the bundle's training output folder (its configs without "
                         "demo.json); repeatable")
    ap.add_argument("--overlay", action="append", default=[], metavar="BUNDLE=FILE",
                    help="extra config laid over a bundle's configs (e.g. he2ihc_pyramidpix2pix=.../attention.json)")
    ap.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: the configs' choice)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1, this machine only; anything else prints a warning)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--max-upload-mb", type=float, default=50.0, help="upload size limit in MB (default 50)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.bundle_dir.is_dir():
        raise BreastGenError("bundle folder not found", args.bundle_dir)
    from .server import AppOptions, launch

    overlays: dict[str, list[Path]] = {}
    for name, path in _pairs(args.overlay, "--overlay"):
        overlays.setdefault(name, []).append(path)
    launch(AppOptions(bundle_dir=args.bundle_dir, demo_out=args.demo_out, demo_data=args.demo_data,
                      checkpoints=dict(_pairs(args.checkpoints, "--checkpoints")), overlays=overlays,
                      device=args.device, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb))


if __name__ == "__main__":
    main()
