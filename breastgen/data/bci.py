"""BCI (HE / IHC pairs, Liu et al. 2022) -> a MONAI datalist with a HER2-stratified validation split.

Used by ``scripts/prepare_bci.py`` (command line) and the ``he2ihc_pyramidpix2pix`` demo config. Expected layout
(the BCI release; the demo phantoms mimic it at 128 px)::

    <bci>/HE/train/<nnnnn>_train_<score>.png   <bci>/IHC/train/<same name>
    <bci>/HE/test/<nnnnn>_test_<score>.png     <bci>/IHC/test/<same name>

with ``<score>`` the HER2 score ``0``, ``1+``, ``2+`` or ``3+``. The datalist has the sections ``training``,
``validation`` (a fraction of each HER2 score of ``train``, reproducible with the seed; BCI ships none) and
``test``; entries are ``{"image": HE, "target": IHC, "her2": score, "label": 0..3, "name": stem}`` with paths
relative to the datalist's folder (absolute when the datalist is written outside the BCI folder). Every pair is
checked first (same name in HE and IHC, readable, RGB, same size); any problem is one
:class:`~breastgen.errors.BreastGenError` listing the offending files, and nothing is written.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import BreastGenError
from .atypia import _listing
from .datalists import write_datalist

__all__ = ["HER2_SCORES", "scan_bci", "stratified_split", "prepare_bci"]

HER2_SCORES = ("0", "1+", "2+", "3+")
SPLITS = ("train", "test")
NAME = re.compile(r"^(?P<id>\d+)_(?P<split>train|test)_(?P<score>0|1\+|2\+|3\+)\.png$", re.IGNORECASE)
MAX_LISTED = 12


def _header(path: Path) -> tuple[str, tuple[int, int]] | str:
    """(mode, (width, height)) from the file header, or a short reason it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode, im.size
    except Exception as e:  # noqa: BLE001 - reported with the file name
        return f"unreadable ({type(e).__name__})"


def scan_bci(bci_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """Validated pairs per split: ``{"train": [{"name", "he", "ihc", "her2"}...], "test": [...]}``."""
    root = Path(bci_dir)
    missing = [f"{stain}/{split}" for stain in ("HE", "IHC") for split in SPLITS if not (root / stain / split).is_dir()]
    if missing:
        raise BreastGenError(f"not a BCI folder: missing {', '.join(missing)} (expected HE/{{train,test}} and "
                             "IHC/{train,test})", root)
    unpaired, bad_names, not_rgb, sizes, unreadable = [], [], [], [], []
    pairs: dict[str, list[dict]] = {}
    for split in SPLITS:
        he = {p.name: p for p in (root / "HE" / split).iterdir() if p.is_file() and not p.name.startswith(".")}
        ihc = {p.name: p for p in (root / "IHC" / split).iterdir() if p.is_file() and not p.name.startswith(".")}
        unpaired += [f"HE/{split}/{n} (no IHC)" for n in sorted(set(he) - set(ihc))]
        unpaired += [f"IHC/{split}/{n} (no HE)" for n in sorted(set(ihc) - set(he))]
        pairs[split] = []
        for name in sorted(set(he) & set(ihc)):
            m = NAME.match(name)
            if m is None or m["split"].lower() != split:
                bad_names.append(f"{split}/{name}")
                continue
            heads = {stain: _header(p) for stain, p in (("HE", he[name]), ("IHC", ihc[name]))}
            broken = [f"{stain}/{split}/{name} {h}" for stain, h in heads.items() if isinstance(h, str)]
            if broken:
                unreadable += broken
                continue
            not_rgb += [f"{stain}/{split}/{name} (mode {h[0]})" for stain, h in heads.items()
                        if h[0] not in ("RGB", "RGBA")]
            if heads["HE"][1] != heads["IHC"][1]:
                sizes.append(f"{split}/{name} (HE {heads['HE'][1][0]}x{heads['HE'][1][1]}, "
                             f"IHC {heads['IHC'][1][0]}x{heads['IHC'][1][1]})")
            pairs[split].append({"name": Path(name).stem, "he": he[name], "ihc": ihc[name], "her2": m["score"]})
    problems = [(what, items) for what, items in (
        ("unpaired", unpaired), ("name not <id>_<split>_<0|1+|2+|3+>.png", bad_names), ("unreadable", unreadable),
        ("not RGB", not_rgb), ("HE/IHC size mismatch", sizes)) if items]
    if problems:
        n = sum(len(items) for _, items in problems)
        listing = "; ".join(f"{what}: {_listing(items, MAX_LISTED)}" for what, items in problems)
        raise BreastGenError(f"{n} bad BCI file(s): {listing}", root)
    if not pairs["train"]:
        raise BreastGenError("no HE/IHC pairs in HE/train", root)
    return pairs


def stratified_split(items: list[dict], fraction: float, seed: int, key: str = "her2") -> tuple[list[dict], list[dict]]:
    """(kept, held_out): ``round(fraction * n)`` items of each ``key`` value (at least 1 when that value has >= 2
    items and fraction > 0) are held out, chosen reproducibly by ``seed``.

    Unlike :func:`breastgen.data.atypia.split_groups` (which keeps training data in every stratum first), a value
    with two items gives one to validation even for a small fraction: BCI's HER2 scores each need a validation pair.
    """
    if not 0.0 <= fraction < 1.0:
        raise BreastGenError(f"--val-fraction must be in [0, 1), not {fraction}")
    by: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        by[it[key]].append(it)
    keep, held = [], []
    rng = np.random.default_rng(seed)
    for value in sorted(by):
        group = sorted(by[value], key=lambda it: it["name"])
        n_val = int(round(fraction * len(group)))
        if fraction > 0 and n_val == 0 and len(group) >= 2:
            n_val = 1
        chosen = set(rng.permutation(len(group))[:n_val].tolist())
        for i, it in enumerate(group):
            (held if i in chosen else keep).append(it)
    return sorted(keep, key=lambda it: it["name"]), sorted(held, key=lambda it: it["name"])


def prepare_bci(bci_dir: str | os.PathLike, out: str | os.PathLike | None = None, val_fraction: float = 0.1,
                seed: int = 0) -> Path:
    """Validate the BCI folder and write the datalist; returns its path (default ``<bci>/he2ihc_datalist.json``)."""
    root = Path(bci_dir).resolve()
    out = Path(out) if out is not None else root / "he2ihc_datalist.json"
    pairs = scan_bci(root)
    train, val = stratified_split(pairs["train"], val_fraction, seed)
    base = out.resolve().parent

    def entry(it: dict) -> dict:
        # relative to the datalist's folder when the data lies below it (movable together), else absolute
        rel = lambda p: p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p)  # noqa: E731
        return {"image": rel(it["he"]), "target": rel(it["ihc"]), "her2": it["her2"],
                "label": HER2_SCORES.index(it["her2"]), "name": it["name"]}

    return write_datalist(out, {"training": [entry(i) for i in train], "validation": [entry(i) for i in val],
                                "test": [entry(i) for i in pairs["test"]]})
