#!/usr/bin/env python
"""Prepare nuclear-atypia tiles for bundles/histo_ddpm_atypia: tiles, nuclei masks and a MONAI datalist.

Two inputs::

    # MITOS-ATYPIA-14: x20 frames (1539 x 1376) anywhere under --frames, one score per frame in a CSV
    #   frame,score            (frame = file stem such as A03_00Aa, or a path relative to --frames)
    #   A03_00Aa,2             optional columns: slide (else the name up to the first "_"), split
    python scripts/prepare_atypia.py mitos --frames /data/MITOS-ATYPIA-14 --scores scores.csv --out /data/atypia_tiles

    # a folder per class: <root>/<class>/<images>; --classes fixes the label order (default: alphabetical)
    python scripts/prepare_atypia.py folders --root /data/atypia_by_grade --classes grade1 grade2 grade3 \\
        --out /data/atypia_tiles [--tile 256]

Output: ``<out>/tiles/*.png``, ``<out>/masks/*.png`` (nuclei 0 / 255 from the classical segmentation: rgb2hed +
threshold + watershed; ``--masks none`` skips them, ``--seg-checkpoint`` uses a MONAI network instead) and
``<out>/datalist.json``; validation and test sections are drawn per class and never split a slide (MITOS) or an
image (folders). Every input is checked first; any problem is one error line and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from breastgen.errors import BreastGenError, main_guard  # noqa: E402


def segmenter_from_args(args: argparse.Namespace):
    from breastgen.data.nuclei import NucleiSegmenter

    if args.masks == "none":
        return None
    opts = {k: v for k, v in (("threshold", args.seg_threshold), ("min_threshold", args.seg_min_threshold),
                              ("max_threshold", args.seg_max_threshold), ("sigma", args.seg_sigma),
                              ("min_size", args.seg_min_size), ("min_distance", args.seg_min_distance))
            if v is not None}
    if args.seg_checkpoint is None:
        return NucleiSegmenter(**opts)
    from monai.bundle import ConfigParser

    try:
        net_cfg = json.loads(args.seg_network)
    except json.JSONDecodeError as e:
        raise BreastGenError(f"--seg-network is not JSON ({e})") from None
    parser = ConfigParser({"net": net_cfg})
    network = parser.get_parsed_content("net")
    return NucleiSegmenter("network", network=network, checkpoint=args.seg_checkpoint,
                           checkpoint_key=args.seg_checkpoint_key, **{k: v for k, v in opts.items()
                                                                       if k in ("min_size", "min_distance")})


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="layout", required=True)
    m = sub.add_parser("mitos", help="MITOS-ATYPIA-14 frames + per-frame score CSV")
    m.add_argument("--frames", type=Path, required=True, help="folder holding the frames (searched recursively)")
    m.add_argument("--scores", type=Path, required=True, help="CSV with a frame and a score column")
    m.add_argument("--frame-column", default=None, help="frame column (default: frame/image/filename/file/name)")
    m.add_argument("--score-column", default=None, help="score column (default: score/atypia/atypia_score/...)")
    f = sub.add_parser("folders", help="<root>/<class>/<images>")
    f.add_argument("--root", type=Path, required=True)
    f.add_argument("--classes", nargs="+", default=None, help="class folder names in label order")
    for p in (m, f):
        p.add_argument("--out", type=Path, required=True, help="output folder (tiles/, masks/, datalist.json)")
        p.add_argument("--tile", type=int, default=256 if p is m else None,
                       help="tile size (mitos: 256; folders: none = one tile per image)")
        p.add_argument("--val-fraction", type=float, default=0.1)
        p.add_argument("--test-fraction", type=float, default=0.1)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--min-tissue", type=float, default=0.0,
                       help="drop tiles with a smaller share of stained pixels (0: keep all)")
        p.add_argument("--masks", choices=("segment", "none"), default="segment")
        p.add_argument("--seg-threshold", type=float, default=None, help="fixed haematoxylin threshold (default Otsu)")
        p.add_argument("--seg-min-threshold", type=float, default=None)
        p.add_argument("--seg-max-threshold", type=float, default=None)
        p.add_argument("--seg-sigma", type=float, default=None)
        p.add_argument("--seg-min-size", type=int, default=None)
        p.add_argument("--seg-min-distance", type=int, default=None)
        p.add_argument("--seg-checkpoint", type=Path, default=None,
                       help="local checkpoint of a MONAI segmentation network (instead of the classical method)")
        p.add_argument("--seg-checkpoint-key", default="model")
        p.add_argument("--seg-network", default='{"_target_": "monai.networks.nets.BasicUNet", "spatial_dims": 2, '
                                                '"in_channels": 3, "out_channels": 2}',
                       help="the network of --seg-checkpoint as a MONAI config component (JSON)")
    return ap.parse_args(argv)


@main_guard
def main(argv: list[str] | None = None) -> dict:
    from breastgen.data.atypia import prepare_class_folders, prepare_mitos_atypia

    args = parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        raise BreastGenError("--out exists and is not a folder", args.out)
    segmenter = segmenter_from_args(args)
    common = dict(segmenter=segmenter, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                  seed=args.seed, min_tissue=args.min_tissue, tile=args.tile)
    if args.layout == "mitos":
        counts = prepare_mitos_atypia(args.frames, args.scores, args.out, frame_column=args.frame_column,
                                      score_column=args.score_column, **common)
    else:
        counts = prepare_class_folders(args.root, args.out, classes=args.classes, **common)
    print(f"wrote {args.out / 'datalist.json'}: " + ", ".join(f"{counts[s]} {s}" for s in
                                                              ("training", "validation", "test"))
          + (f"; {counts['dropped_background']} background tiles dropped" if counts.get("dropped_background") else "")
          + (f"; classes {counts['classes']}" if "classes" in counts else ""))
    return counts


if __name__ == "__main__":
    main()
