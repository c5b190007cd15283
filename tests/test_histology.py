import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from breastgen.data.histology import NormalizeStain, TileFramed, check_rgb, tile_frame
from breastgen.errors import BreastGenError


def test_tiles_are_non_overlapping_and_inherit_the_label():
    frame = torch.arange(3 * 70 * 50, dtype=torch.float32).reshape(3, 70, 50)
    mask = (frame[:1] % 7 == 0).to(torch.uint8)
    out = TileFramed(["image", "mask"], tile=32)({"image": frame, "mask": mask, "label": 2, "id": "f1"})
    assert len(out) == 2 * 1  # 70 // 32 = 2 columns, 50 // 32 = 1 row; partial tiles dropped
    assert [d["tile_origin"] for d in out] == [(0, 0), (32, 0)]
    for d in out:
        x, y = d["tile_origin"]
        assert d["label"] == 2 and d["id"] == "f1"
        assert torch.equal(d["image"], frame[:, x:x + 32, y:y + 32]) and torch.equal(d["mask"], mask[:, x:x + 32, y:y + 32])
    tiles, origins = tile_frame(frame, 32, drop_partial=False)
    assert len(tiles) == 3 * 2 and all(t.shape == (3, 32, 32) for t in tiles)


def test_tiling_errors():
    with pytest.raises(BreastGenError, match="smaller than one"):
        tile_frame(MetaTensor(torch.zeros(3, 10, 10), meta={"filename_or_obj": "f.png"}), 32)
    with pytest.raises(BreastGenError, match="mask size"):
        TileFramed(["image", "mask"], tile=8)({"image": torch.zeros(3, 16, 16), "mask": torch.zeros(1, 16, 8)})
    with pytest.raises(BreastGenError, match="RGB"):
        check_rgb(np.zeros((1, 8, 8)), "g.png")


def _beer_lambert(conc, stains, tli=240.0):
    od = conc @ (stains / np.linalg.norm(stains, axis=1, keepdims=True))
    return np.moveaxis(tli * np.exp(-od), -1, 0).astype(np.float32).clip(0, 255)


def test_stain_normalisation_maps_two_scanners_to_one_appearance():
    rng = np.random.default_rng(0)
    conc = np.stack([rng.random((64, 64)) ** 2 * 1.5, 0.3 + 0.7 * rng.random((64, 64))], axis=-1)
    scan_a = _beer_lambert(conc, np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]))
    scan_b = _beer_lambert(conc, np.array([[0.55, 0.78, 0.30], [0.15, 0.90, 0.35]]))  # same tissue, other stains
    a, b = NormalizeStain()(torch.from_numpy(scan_a)), NormalizeStain()(torch.from_numpy(scan_b))
    assert a.shape == (3, 64, 64)
    before = float(np.abs(scan_a - scan_b).mean())
    after = float((a - b).abs().mean())
    assert after < 0.5 * before
    blank = torch.full((3, 16, 16), 250.0)
    assert torch.equal(NormalizeStain()(blank), blank)  # no tissue: unchanged
    with pytest.raises(BreastGenError, match="stain normalisation failed"):
        NormalizeStain(skip_empty=False)(blank)
