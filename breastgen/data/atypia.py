"""Nuclear-atypia tiles: dataset preparation (MITOS-ATYPIA-14, "folder per class") and class-label transforms.

Preparation turns a dataset into the layout every breastgen histology bundle reads::

    <out>/tiles/<name>.png        RGB tiles (non-overlapping, partial border tiles dropped)
    <out>/masks/<name>.png        nuclei masks 0 / 255 (``breastgen.data.nuclei`` segmentation), unless disabled
    <out>/datalist.json           {"training": [...], "validation": [...], "test": [...]}

with entries ``{"image", "mask", "label" (0-based class), "grade" / "class_name", "source", "group", "tile_origin"}``
(paths relative to the datalist). Every input is checked before anything is written (a missing frame, an unknown
score, an empty class folder ... is one error line), tiles and masks are written to a staging folder that replaces
the previous output only when everything succeeded.

* :func:`prepare_mitos_atypia`: MITOS-ATYPIA-14 frames (x20, 1539 x 1376) and a CSV with one nuclear-atypia score
  (1, 2, 3) per frame. Tiles inherit their frame's score; the split keeps the frames of one slide together (slide =
  the frame name up to its first "_", e.g. ``A03`` for ``A03_00Aa``, unless the CSV has a ``slide`` column).
* :func:`prepare_class_folders`: ``<root>/<class name>/<images>``; the class order is given or alphabetical.

Transforms for class-conditional models: :class:`CheckRGBd`, :class:`ClassLabeld` (validates 0-based labels) and
:class:`ClassDropoutd` (classifier-free guidance: the label becomes the null class ``num_classes`` with
probability ``prob``); :func:`select_class` keeps one class of a datalist (one model per class).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from ..errors import BreastGenError
from .conditioning import DropoutTransformd
from .datalists import SECTIONS, write_datalist
from .histology import check_rgb, tile_frame
from .transforms import source_of

__all__ = ["IMAGE_SUFFIXES", "FRAME_COLUMNS", "SCORE_COLUMNS", "CheckRGBd", "ClassLabeld", "ClassDropoutd",
           "select_class", "read_scores", "scan_class_folders", "prepare_mitos_atypia", "prepare_class_folders",
           "split_groups"]
logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
FRAME_COLUMNS = ("frame", "image", "filename", "file", "name")
SCORE_COLUMNS = ("score", "atypia", "atypia_score", "nuclear_atypia", "grade")
MAX_LISTED = 8


# ------------------------------------------------------------------------------------------------ transforms
class CheckRGBd(MapTransform):
    """Raise (one line, naming the file) unless every key holds a channel-first RGB tile (3, W, H)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            check_rgb(d[key], source_of(d[key]))
        return d


def _as_label(value: Any, num_classes: int, src: str | None = None) -> int:
    v = value
    if isinstance(value, torch.Tensor) and value.numel() == 1 or isinstance(value, np.ndarray) and value.size == 1:
        v = value.item()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) and not (
            isinstance(v, (float, np.floating)) and float(v).is_integer()):
        raise BreastGenError(f"class label must be an integer 0..{num_classes - 1}, got {value!r}", src)
    if not 0 <= int(v) < num_classes:
        raise BreastGenError(f"class label {int(v)} is outside 0..{num_classes - 1}", src)
    return int(v)


class ClassLabeld(MapTransform):
    """Validate 0-based class labels (``0 <= label < num_classes``) and make them int64 scalar tensors."""

    def __init__(self, keys: KeysCollection = "label", num_classes: int = 3, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.num_classes = int(num_classes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        src = source_of(d.get("image")) if d.get("image") is not None else None
        for key in self.key_iterator(d):
            d[key] = torch.tensor(_as_label(d[key], self.num_classes, src), dtype=torch.int64)
        return d


class ClassDropoutd(DropoutTransformd):
    """With probability ``prob`` replace the class label by the null class ``num_classes`` (the unconditional
    branch of classifier-free guidance; the network then needs ``num_class_embeds = num_classes + 1``)."""

    what = "class dropout"

    def __init__(self, keys: KeysCollection = "label", num_classes: int = 3, prob: float = 0.1,
                 allow_missing_keys: bool = False):
        super().__init__(keys, float(prob), allow_missing_keys)
        self.num_classes = int(num_classes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            label = _as_label(d[key], self.num_classes)
            d[key] = torch.tensor(self.num_classes if self._drop else label, dtype=torch.int64)
        return d


def select_class(datalist: Sequence[Mapping], train_class: int | None, num_classes: int) -> list[dict]:
    """The datalist entries of class ``train_class`` (copies of all entries for None): the one-model-per-class
    setup. An invalid class or a class without any entry is a one-line error."""
    if train_class is None:
        return [dict(e) for e in datalist]
    if isinstance(train_class, bool) or not isinstance(train_class, int) or not 0 <= train_class < num_classes:
        raise BreastGenError(f"train_class must be null or an integer 0..{num_classes - 1}, got {train_class!r}")
    out = [dict(e) for e in datalist if int(e.get("label", -1)) == train_class]
    if not out:
        raise BreastGenError(f"no training tile of class {train_class} in the datalist")
    return out


# ------------------------------------------------------------------------------------------------ inputs
def _listing(items: Sequence[str], limit: int = MAX_LISTED) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _images_in(folder: Path, recursive: bool = False) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _pick_column(columns: Sequence[str], wanted: Sequence[str], what: str, path: Path, given: str | None) -> str:
    if given:
        if given.lower() not in columns:
            raise BreastGenError(f"no column {given!r} (found: {', '.join(columns) or 'none'})", path)
        return given.lower()
    for c in wanted:
        if c in columns:
            return c
    raise BreastGenError(f"no {what} column: expected one of {', '.join(wanted)} (found: "
                         f"{', '.join(columns) or 'none'})", path)


def read_scores(frames_dir: str | os.PathLike, scores_csv: str | os.PathLike, frame_column: str | None = None,
                score_column: str | None = None, scores: Sequence[int] = (1, 2, 3)) -> list[dict]:
    """Frames with their score: ``[{"path", "name", "score", "slide", "split"}]``, all checked.

    The CSV names a frame by its path relative to ``frames_dir`` or by its file stem (``A03_00Aa``), searched
    recursively; the score must be one of ``scores``. Problems (missing frames, unknown scores, duplicates) are
    collected and raised as one error.
    """
    from .prepare import normalise_split, read_csv_rows

    root, csv_path = Path(frames_dir), Path(scores_csv)
    if not root.is_dir():
        raise BreastGenError("frames folder not found", root)
    columns, rows = read_csv_rows(csv_path, ())
    fcol = _pick_column(columns, FRAME_COLUMNS, "frame", csv_path, frame_column)
    scol = _pick_column(columns, SCORE_COLUMNS, "score", csv_path, score_column)
    if not rows:
        raise BreastGenError("the score CSV has no rows", csv_path)
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in _images_in(root, recursive=True):
        by_stem[p.stem.lower()].append(p)
    missing, bad_scores, ambiguous, duplicates, bad_splits = [], [], [], [], []
    out, seen = [], set()
    allowed = [int(s) for s in scores]
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        ref = (row.get(fcol) or "").strip()
        direct = root / ref
        if ref and direct.is_file():
            path = direct
        else:
            hits = by_stem.get(Path(ref).stem.lower(), []) if ref else []
            if len(hits) != 1:
                (ambiguous if hits else missing).append(f"{ref or '<empty>'} (line {i})")
                continue
            path = hits[0]
        raw = (row.get(scol) or "").strip()
        try:
            score = int(float(raw))
            if float(raw) != score or score not in allowed:
                raise ValueError
        except ValueError:
            bad_scores.append(f"{ref}: {raw!r} (line {i})")
            continue
        if path.resolve() in seen:
            duplicates.append(f"{ref} (line {i})")
            continue
        seen.add(path.resolve())
        try:
            split = normalise_split(row["split"]) if (row.get("split") or "").strip() else None
        except BreastGenError:
            bad_splits.append(f"{ref}: {row['split']!r} (line {i})")
            continue
        slide = (row.get("slide") or "").strip() or path.stem.split("_")[0]
        out.append({"path": path, "name": path.stem, "score": score, "slide": slide, "split": split})
    problems = []
    if missing:
        problems.append(f"{len(missing)} frame(s) not found under {root}: {_listing(missing)}")
    if ambiguous:
        problems.append(f"{len(ambiguous)} frame name(s) match several files: {_listing(ambiguous)}")
    if bad_scores:
        problems.append(f"{len(bad_scores)} unknown score(s) (allowed: {', '.join(map(str, allowed))}): "
                        f"{_listing(bad_scores)}")
    if duplicates:
        problems.append(f"{len(duplicates)} frame(s) listed twice: {_listing(duplicates)}")
    if bad_splits:
        problems.append(f"{len(bad_splits)} unknown split(s): {_listing(bad_splits)}")
    if problems:
        raise BreastGenError("; ".join(problems), csv_path)
    return out


def scan_class_folders(root: str | os.PathLike, classes: Sequence[str] | None = None) -> tuple[list[str], list[dict]]:
    """(class names, images ``[{"path", "name", "label", "class_name", "group"}]``) of a folder-per-class layout.

    ``classes`` fixes the order (label = position); by default every sub-folder, alphabetically. A missing or empty
    class folder is an error (nothing would teach the model that class).
    """
    root = Path(root)
    if not root.is_dir():
        raise BreastGenError("class folder root not found", root)
    names = list(classes) if classes else sorted(p.name for p in root.iterdir() if p.is_dir() and
                                                  not p.name.startswith("."))
    if len(names) < 2:
        raise BreastGenError(f"need at least 2 class folders, found {len(names)} ({', '.join(names) or 'none'})", root)
    if len(set(names)) != len(names):
        raise BreastGenError(f"class names repeat: {names}", root)
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise BreastGenError(f"class folder(s) not found: {', '.join(missing)}", root)
    items, empty = [], []
    for label, name in enumerate(names):
        files = _images_in(root / name, recursive=True)
        if not files:
            empty.append(name)
        for p in files:
            rel = p.relative_to(root / name)
            items.append({"path": p, "name": f"{name}_{rel.with_suffix('').as_posix().replace('/', '_')}",
                          "label": label, "class_name": name, "group": f"{name}/{rel.as_posix()}", "split": None})
    if empty:
        raise BreastGenError(f"empty class folder(s): {', '.join(empty)} (no {'/'.join(IMAGE_SUFFIXES)} image)", root)
    return names, items


# ------------------------------------------------------------------------------------------------ split
def split_groups(groups: Sequence[str], strata: Sequence[Any] | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, seed: int = 0) -> dict[str, str]:
    """Group (slide / image) -> section, seeded; groups of each stratum are split separately (by class) so every
    section gets every class when there are enough groups. Each non-empty fraction gets >= 1 group per stratum
    when the stratum has >= 3 groups; a stratum always keeps at least one training group."""
    for name, f in (("validation", val_fraction), ("test", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise BreastGenError(f"{name} fraction must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise BreastGenError(f"validation + test fractions must leave training data, got {val_fraction} + "
                             f"{test_fraction}")
    strata = list(strata) if strata is not None else [0] * len(groups)
    first: dict[str, Any] = {}
    for g, s in zip(groups, strata):
        first.setdefault(g, s)
    by_stratum: dict[Any, list[str]] = defaultdict(list)
    for g, s in first.items():
        by_stratum[s].append(g)
    rng = np.random.default_rng(seed)
    out = {}
    for s in sorted(by_stratum, key=str):
        gs = sorted(by_stratum[s])
        rng.shuffle(gs)
        n = len(gs)
        n_test = int(round(test_fraction * n)) if n < 3 or test_fraction == 0 else max(1, int(round(test_fraction * n)))
        n_val = int(round(val_fraction * n)) if n < 3 or val_fraction == 0 else max(1, int(round(val_fraction * n)))
        while n_test + n_val >= n and n_val > 0:  # every stratum keeps training data: validation gives way first
            n_val -= 1
        while n_test + n_val >= n and n_test > 0:
            n_test -= 1
        for i, g in enumerate(gs):
            out[g] = "test" if i < n_test else "validation" if i < n_test + n_val else "training"
    return out


# ------------------------------------------------------------------------------------------------ writing
def _read_rgb(path: Path) -> np.ndarray:
    from .readers import load_image

    arr, _ = load_image(path, modalities=None)
    if arr.ndim != 3:
        raise BreastGenError(f"expected an RGB image, got a grey image of size {arr.shape}", path)
    if arr.dtype != np.uint8:
        if arr.dtype.kind == "f" and arr.max() <= 1.0:
            arr = arr * 255.0
        elif arr.dtype == np.uint16:
            arr = arr / 257.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return np.moveaxis(arr, -1, 0)  # (3, W, H)


def _tissue_fraction(tile: np.ndarray, od_threshold: float = 0.15) -> float:
    """Share of pixels whose mean optical density exceeds ``od_threshold`` (white background has ~0)."""
    od = -np.log((tile.astype(np.float64) + 1.0) / 256.0).mean(axis=0)
    return float((od > od_threshold).mean())


def _save_rgb(arr_chw: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(np.transpose(arr_chw, (2, 1, 0)))).save(path, format="PNG")


def _save_mask(mask_wh: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(((mask_wh > 0).astype(np.uint8) * 255).T)).save(path, format="PNG")


def _write_dataset(items: Sequence[dict], out_dir: Path, tile: int | None, segmenter: Any, min_tissue: float,
                   extra_keys: Sequence[str], sections: Mapping[str, str]) -> dict[str, Any]:
    """Tile ``items`` into a staging folder, then swap it in and write the datalist; returns counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare_", dir=out_dir))
    entries: dict[str, list[dict]] = {s: [] for s in SECTIONS}
    dropped = 0
    try:
        for item in items:
            frame = _read_rgb(item["path"])
            if tile:
                tiles, origins = tile_frame(frame, int(tile))
            else:
                tiles, origins = [frame], [(0, 0)]
            for t, (x, y) in zip(tiles, origins):
                if min_tissue > 0 and _tissue_fraction(t) < min_tissue:
                    dropped += 1
                    continue
                name = f"{item['name']}_x{x:04d}_y{y:04d}.png" if tile else f"{item['name']}.png"
                _save_rgb(t, staging / "tiles" / name)
                entry = {"image": f"tiles/{name}"}
                if segmenter is not None:
                    _save_mask(segmenter(t), staging / "masks" / name)
                    entry["mask"] = f"masks/{name}"
                entry.update({k: item[k] for k in extra_keys if k in item})
                entry.update({"source": str(item["path"]), "group": item["group"], "tile_origin": [int(x), int(y)]})
                entries[sections[item["group"]]].append(entry)
        if not any(entries.values()):
            raise BreastGenError("no tile left (all below --min-tissue, or images smaller than one tile)", out_dir)
        for sub in ("tiles", "masks"):
            target = out_dir / sub
            if target.exists():
                shutil.rmtree(target)
            if (staging / sub).exists():
                os.replace(staging / sub, target)
        write_datalist(out_dir / "datalist.json", entries)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    counts = {s: len(v) for s, v in entries.items()}
    counts["dropped_background"] = dropped
    return counts


def _check_tile(tile: int | None) -> None:
    if tile is not None and (not isinstance(tile, (int, np.integer)) or tile < 8):
        raise BreastGenError(f"tile size must be an integer >= 8, got {tile!r}")


def prepare_mitos_atypia(frames_dir: str | os.PathLike, scores_csv: str | os.PathLike, out_dir: str | os.PathLike,
                         tile: int = 256, segmenter: Any = "classical", val_fraction: float = 0.1,
                         test_fraction: float = 0.1, seed: int = 0, min_tissue: float = 0.0,
                         frame_column: str | None = None, score_column: str | None = None) -> dict[str, Any]:
    """MITOS-ATYPIA-14 frames + per-frame score CSV -> tiles, nuclei masks and a datalist (label = score - 1).

    ``segmenter``: "classical" (default), None (no masks) or any callable ``(3, W, H) -> labels``. Slides never
    straddle two sections unless the CSV's ``split`` column says so. Returns the section counts.
    """
    from .nuclei import NucleiSegmenter

    _check_tile(tile)
    frames = read_scores(frames_dir, scores_csv, frame_column, score_column)
    segmenter = NucleiSegmenter() if segmenter == "classical" else segmenter
    for f in frames:
        f.update(label=f["score"] - 1, grade=f["score"], group=f["slide"])
    given = {f["slide"]: f["split"] for f in frames if f["split"]}
    auto = split_groups([f["slide"] for f in frames if f["slide"] not in given],
                        [f["score"] for f in frames if f["slide"] not in given], val_fraction, test_fraction, seed)
    sections = {**auto, **given}
    counts = _write_dataset(frames, Path(out_dir), tile, segmenter, min_tissue, ("label", "grade", "slide"), sections)
    logger.info("MITOS-ATYPIA-14: %d frames -> %s", len(frames), counts)
    return counts


def prepare_class_folders(root: str | os.PathLike, out_dir: str | os.PathLike, classes: Sequence[str] | None = None,
                          tile: int | None = None, segmenter: Any = "classical", val_fraction: float = 0.1,
                          test_fraction: float = 0.1, seed: int = 0, min_tissue: float = 0.0) -> dict[str, Any]:
    """``<root>/<class>/<images>`` -> tiles (``tile`` None: one tile per image), nuclei masks and a datalist
    (label = the class's position; ``class_name`` kept). Images are split per class; tiles of one image stay in
    one section. Returns the section counts and the class names."""
    from .nuclei import NucleiSegmenter

    _check_tile(tile)
    names, items = scan_class_folders(root, classes)
    segmenter = NucleiSegmenter() if segmenter == "classical" else segmenter
    sections = split_groups([i["group"] for i in items], [i["label"] for i in items], val_fraction, test_fraction,
                            seed)
    counts = _write_dataset(items, Path(out_dir), tile, segmenter, min_tissue, ("label", "class_name"), sections)
    counts["classes"] = names
    logger.info("class folders %s: %d images -> %s", names, len(items), counts)
    return counts
