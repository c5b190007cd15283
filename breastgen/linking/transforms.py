"""Transforms of the mammogram-histology link: input checks, lesion crops, cached mammogram embeddings.

* :class:`CheckImaged` -- one-line error unless an image has the expected channels (1: grey mammogram, 3: RGB
  histology) and a minimum size; a histology tile given as a query mammogram, or a thumbnail, stops here.
* :class:`CropToBoxd` -- square crop around the lesion box (``roi: "lesion"``); the box follows.
* :class:`EmbedMammod` -- the frozen mammogram autoencoder's bottleneck as a diffusion conditioning
  (deterministic, so a ``CacheDataset`` computes it once per image).
* :class:`ZeroWhereLabeld` -- zero a conditioning where the label is the null class (after
  :class:`breastgen.data.atypia.ClassDropoutd`), so classifier-free guidance drops label and context together.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from torch import nn

from ..data.transforms import as_boxes, source_of
from ..errors import BreastGenError

__all__ = ["ROIS", "CheckImaged", "CropToBoxd", "EmbedMammod", "ZeroWhereLabeld", "square_around"]


class CheckImaged(MapTransform):
    """Raise (one line naming the file) unless each key holds a channel-first image with ``channels`` channels
    and at least ``min_size`` pixels on each side. ``what`` names the expected input in the message."""

    def __init__(self, keys: KeysCollection, channels: int = 1, min_size: int = 1, what: str = "grey mammogram",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channels, self.min_size, self.what = int(channels), int(min_size), what

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            shape, src = tuple(np.shape(d[key])), source_of(d[key])
            if len(shape) != 3 or shape[0] != self.channels:
                got = f"{shape[0]} channels" if len(shape) == 3 else f"an array of shape {shape}"
                hint = " (an RGB image: histology?)" if len(shape) == 3 and shape[0] in (3, 4) and self.channels == 1 \
                    else " (a grey image: a mammogram?)" if len(shape) == 3 and shape[0] == 1 else ""
                raise BreastGenError(f"expected a {self.what} with {self.channels} channel(s), got {got}{hint}", src)
            if min(shape[1:]) < self.min_size:
                raise BreastGenError(f"image of {shape[1]} x {shape[2]} px is too small for a {self.what} "
                                     f"(at least {self.min_size} px per side)", src)
        return d


def square_around(box: Any, image_wh: tuple[int, int], margin: float = 0.5, min_size: int = 32) -> tuple[int, int, int]:
    """(x0, y0, side) of a square window around ``box`` ([x0, y0, x1, y1]): side = longer box side * (1 + 2 *
    margin), at least ``min_size``, at most the shorter image side; shifted to lie inside the image."""
    x0, y0, x1, y1 = as_boxes(box).reshape(-1, 4)[0]
    w, h = int(image_wh[0]), int(image_wh[1])
    side = int(round(max(x1 - x0, y1 - y0) * (1 + 2 * float(margin))))
    side = max(1, min(max(side, int(min_size)), w, h))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    sx = int(np.clip(round(cx - side / 2), 0, w - side))
    sy = int(np.clip(round(cy - side / 2), 0, h - side))
    return sx, sy, side


ROIS = ("image", "lesion")


class CropToBoxd(MapTransform):
    """With ``roi="lesion"``, crop each key to the square window around the box in ``box_key``
    (:func:`square_around`) and move the box into the crop; an entry without a box is an error. With
    ``roi="image"`` (the whole mammogram) nothing happens."""

    def __init__(self, keys: KeysCollection, roi: str = "lesion", box_key: str = "bbox", margin: float = 0.5,
                 min_size: int = 32, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if roi not in ROIS:
            raise BreastGenError(f"unknown roi {roi!r}; allowed: {', '.join(map(repr, ROIS))}")
        self.roi, self.box_key, self.margin, self.min_size = roi, box_key, float(margin), int(min_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys or self.roi == "image":
            return d
        src = source_of(d[keys[0]])
        if d.get(self.box_key) is None:
            raise BreastGenError(f"no lesion box ({self.box_key!r}) for a lesion crop; use roi 'image' or give the "
                                 "lesion outline", src)
        w, h = np.shape(d[keys[0]])[1:3]
        x0, y0, side = square_around(d[self.box_key], (w, h), self.margin, self.min_size)
        for key in keys:
            d[key] = d[key][:, x0:x0 + side, y0:y0 + side]
        box = as_boxes(d[self.box_key], src).reshape(-1, 4)[0] - np.array([x0, y0, x0, y0], dtype=np.float64)
        d[self.box_key] = np.clip(box, 0, side).tolist()
        return d


class EmbedMammod(MapTransform):
    """Write ``model.condition(image, mode, size)`` of a frozen :class:`~breastgen.networks.linking.ConvAutoencoder`
    to ``output_key``: (tokens, channels) for ``mode="crossattn"``, (channels, size, size) for ``"concat"``."""

    def __init__(self, keys: KeysCollection = "mammo", model: nn.Module | None = None, mode: str = "crossattn",
                 size: int | None = None, output_key: str = "context", device: Any = "cpu",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if model is None:
            raise BreastGenError("EmbedMammod needs the mammogram autoencoder")
        self.model, self.mode, self.size = model, mode, size
        self.output_key, self.device = output_key, torch.device(device)

    @torch.no_grad()
    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
            was = self.model.training
            self.model.eval()
            d[self.output_key] = self.model.condition(x.float()[None].to(self.device), self.mode, self.size)[0].cpu()
            self.model.train(was)
        return d


class ZeroWhereLabeld(MapTransform):
    """Replace ``keys`` by zeros where ``label_key`` equals ``label`` (the null class of classifier-free guidance)."""

    def __init__(self, keys: KeysCollection, label_key: str = "label", label: int = 2, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.label_key, self.label = label_key, int(label)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if int(torch.as_tensor(d[self.label_key]).reshape(-1)[0]) == self.label:
            for key in self.key_iterator(d):
                d[key] = torch.zeros_like(torch.as_tensor(d[key]))
        return d
