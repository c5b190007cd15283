"""Histology transforms: RGB H&E tiles, tiling of large frames, stain normalisation.

Arrays follow MONAI's convention: channel-first RGB ``(3, W, H)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.apps.pathology.transforms import NormalizeHEStains
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from ..errors import BreastGenError
from .transforms import source_of

__all__ = ["check_rgb", "tile_frame", "TileFramed", "NormalizeStain", "NormalizeStaind"]


def check_rgb(img: Any, src: str | None = None) -> None:
    """Raise unless ``img`` is a channel-first RGB tile (3, W, H)."""
    shape = tuple(np.shape(img))
    if len(shape) != 3 or shape[0] != 3:
        raise BreastGenError(f"expected an RGB tile (3 channels), got array of shape {shape}", src)


def tile_frame(img: Any, tile: int, drop_partial: bool = True) -> tuple[list[Any], list[tuple[int, int]]]:
    """Cut a channel-first frame (C, W, H) into non-overlapping ``tile`` x ``tile`` tiles, row by row.

    Returns the tiles and their (x, y) origins. Partial tiles at the right/bottom border are dropped (the
    MITOS-ATYPIA protocol) unless ``drop_partial=False``, which zero-pads them.
    """
    src = source_of(img)
    w, h = np.shape(img)[-2:]
    if tile < 1 or (drop_partial and (w < tile or h < tile)):
        raise BreastGenError(f"frame of W x H = {w} x {h} is smaller than one {tile}x{tile} tile", src)
    stop_x = w - tile + 1 if drop_partial else w
    stop_y = h - tile + 1 if drop_partial else h
    tiles, origins = [], []
    for y in range(0, stop_y, tile):
        for x in range(0, stop_x, tile):
            t = img[..., x:x + tile, y:y + tile]
            if t.shape[-2:] != (tile, tile):
                pad = [(0, 0)] * (t.ndim - 2) + [(0, tile - t.shape[-2]), (0, tile - t.shape[-1])]
                t = type(img)(np.pad(np.asarray(t), pad)) if not isinstance(t, torch.Tensor) else \
                    torch.nn.functional.pad(t, (0, tile - t.shape[-1], 0, tile - t.shape[-2]))
            tiles.append(t)
            origins.append((x, y))
    return tiles, origins


class TileFramed(MapTransform):
    """One dict per tile: image/mask ``keys`` are tiled alike; every other field (label, grade ...) is inherited.

    Returns a list of dicts (like MONAI's ``RandSpatialCropSamplesd``), so a DataLoader with MONAI's
    ``list_data_collate`` flattens them. Each tile gets ``tile_origin`` (x, y) and ``tile_index``.
    """

    def __init__(self, keys: KeysCollection, tile: int = 256, drop_partial: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.tile, self.drop_partial = int(tile), drop_partial

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict]:
        keys = list(self.key_iterator(data))
        ref = data[keys[0]]
        for k in keys[1:]:
            if tuple(np.shape(data[k])[-2:]) != tuple(np.shape(ref)[-2:]):
                raise BreastGenError(f"{k} size {tuple(np.shape(data[k])[-2:])} differs from {keys[0]} size "
                                     f"{tuple(np.shape(ref)[-2:])}", source_of(data[k]) or source_of(ref))
        per_key = {k: tile_frame(data[k], self.tile, self.drop_partial) for k in keys}
        origins = per_key[keys[0]][1]
        out = []
        for i, origin in enumerate(origins):
            d = dict(data)
            for k in keys:
                d[k] = per_key[k][0][i]
            d["tile_origin"], d["tile_index"] = origin, i
            out.append(d)
        return out


class NormalizeStain(Transform):
    """Macenko H&E stain normalisation (MONAI's ``NormalizeHEStains``) on a channel-first uint8-range RGB tile.

    Tiles with too little tissue for a stain estimate are returned unchanged when ``skip_empty`` (default), so a
    tiling pipeline does not stop at background tiles; with ``skip_empty=False`` they raise.
    """

    def __init__(self, skip_empty: bool = True, **kwargs):
        self.normalizer = NormalizeHEStains(**kwargs)
        self.skip_empty = skip_empty

    def __call__(self, img: Any) -> Any:
        src = source_of(img)
        check_rgb(img, src)
        hwc = np.ascontiguousarray(np.moveaxis(np.asarray(img), 0, -1)).astype(np.float32)
        if hwc.max() <= 1.0:
            hwc = hwc * 255.0
        try:
            out = self.normalizer(hwc.clip(0, 255).astype(np.uint8))
        except ValueError as e:  # MONAI raises ValueError for tiles without stained tissue
            if self.skip_empty:
                return img
            raise BreastGenError(f"stain normalisation failed: {e}", src) from None
        chw = torch.from_numpy(np.moveaxis(out, -1, 0).astype(np.float32))
        if float(np.asarray(img).max()) <= 1.0:
            chw = chw / 255.0
        return MetaTensor(chw, meta=dict(img.meta)) if isinstance(img, MetaTensor) else chw


class NormalizeStaind(MapTransform):
    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.t = NormalizeStain(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for k in self.key_iterator(d):
            d[k] = self.t(d[k])
        return d
