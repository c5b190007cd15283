"""Image writers (atomic) and display helpers.

Inputs follow MONAI's convention -- ``(W, H)``, ``(1, W, H)`` or ``(3, W, H)`` arrays/tensors, float in [0, 1]
or integer -- and are transposed back to the files' row-major order here, in one place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path

__all__ = ["to_rows_cols", "to_uint8", "to_uint16", "save_png", "save_png16", "save_tiff16", "make_grid"]


def to_rows_cols(img: Any) -> np.ndarray:
    """MONAI (C, W, H) / (W, H) -> numpy (H, W) for grey or (H, W, 3) for RGB."""
    a = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 2:
        return a.T
    if a.ndim == 3 and a.shape[0] in (3, 4):
        return np.transpose(a[:3], (2, 1, 0))
    raise ValueError(f"expected (W, H), (1, W, H) or (3, W, H), got shape {a.shape}")


def to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        return (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return (a.astype(np.float64) / max(1.0, float(np.iinfo(a.dtype).max)) * 255.0 + 0.5).astype(np.uint8)


def to_uint16(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint16:
        return a
    if np.issubdtype(a.dtype, np.floating):
        return (np.clip(np.nan_to_num(a), 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)
    return np.clip(a, 0, 65535).astype(np.uint16)


def save_png(img: Any, path: str | os.PathLike) -> Path:
    """8-bit PNG for viewing (float input is taken as [0, 1])."""
    from PIL import Image

    a = to_uint8(to_rows_cols(img))
    with atomic_path(path) as tmp:
        Image.fromarray(a).save(tmp, format="PNG")
    return Path(path)


def save_png16(img: Any, path: str | os.PathLike) -> Path:
    """16-bit greyscale PNG (float input is taken as [0, 1])."""
    from PIL import Image

    a = to_uint16(to_rows_cols(img))
    if a.ndim != 2:
        raise ValueError("16-bit PNG is written for greyscale images only")
    with atomic_path(path) as tmp:
        Image.fromarray(a).save(tmp, format="PNG")
    return Path(path)


def save_tiff16(img: Any, path: str | os.PathLike, description: str | None = None) -> Path:
    """16-bit TIFF (float input is taken as [0, 1]), zlib-compressed, lossless."""
    import tifffile

    a = to_uint16(to_rows_cols(img))
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, a, compression="zlib", description=description)
    return Path(path)


def make_grid(images: Sequence[Any], ncol: int = 8, pad: int = 2) -> np.ndarray:
    """Tile images (MONAI convention, float [0, 1] or integer) into one (3, W, H) float grid for a PNG."""
    tiles = []
    for img in images:
        a = to_rows_cols(img).astype(np.float32)
        if not np.issubdtype(to_rows_cols(img).dtype, np.floating):
            a = a / max(1.0, float(a.max()))
        tiles.append(np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a[..., :3])
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    ncol = max(1, min(ncol, len(tiles)))
    nrow = -(-len(tiles) // ncol)
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.float32)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + t.shape[0], x:x + t.shape[1]] = t
    return np.transpose(grid, (2, 1, 0))
