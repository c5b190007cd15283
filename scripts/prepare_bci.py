#!/usr/bin/env python
"""Turn a BCI download (HE / IHC pairs) into a MONAI datalist with a HER2-stratified validation split.

Usage::

    python scripts/prepare_bci.py --bci /data/BCI_dataset [--out /data/BCI_dataset/he2ihc_datalist.json]
                                  [--val-fraction 0.1] [--seed 0]

Expected layout (the BCI release)::

    <bci>/HE/train/<nnnnn>_train_<score>.png   <bci>/IHC/train/<same name>
    <bci>/HE/test/<nnnnn>_test_<score>.png     <bci>/IHC/test/<same name>

with ``<score>`` the HER2 score ``0``, ``1+``, ``2+`` or ``3+``. The datalist and its checks are those of
:func:`breastgen.data.bci.prepare_bci`: sections ``training``, ``validation`` (``--val-fraction`` of each HER2
score of ``train``, reproducible with ``--seed``) and ``test``; any bad pair is one error line listing the
offending files, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from breastgen.data.bci import prepare_bci
from breastgen.errors import main_guard


@main_guard
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bci", required=True, type=Path, help="BCI root holding HE/ and IHC/")
    ap.add_argument("--out", type=Path, default=None, help="datalist to write (default <bci>/he2ihc_datalist.json)")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="share of each HER2 score held out (0.1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = prepare_bci(args.bci, args.out, args.val_fraction, args.seed)
    d = json.loads(path.read_text(encoding="utf-8"))
    counts = {s: len(d[s]) for s in ("training", "validation", "test")}
    print(f"wrote {path}: {counts['training']} training, {counts['validation']} validation, "
          f"{counts['test']} test pairs")


if __name__ == "__main__":
    sys.exit(main())
