import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from breastgen.errors import BreastGenError
from breastgen.data.transforms import (BreastMaskd, FlipToLaterality, FlipToLateralityd, MammoPromptd, ResizeToSquare,
                                       ResizeToSquared, ScaleIntensityMammo, ValidateBoxesd, ValidateMaskd,
                                       box_from_mask, breast_mask, laterality_from_filename, laterality_from_image)


def _breast(w=300, h=500, lat="L", seed=0):
    """A half-disc 'breast' (MONAI (1, W, H) layout) with its chest wall on the side given by ``lat``."""
    x, y = np.meshgrid(np.arange(w), np.arange(h), indexing="ij")
    cx = 0 if lat == "L" else w - 1
    inside = ((x - cx) / (0.8 * w)) ** 2 + ((y - h / 2) / (0.45 * h)) ** 2 < 1
    rng = np.random.default_rng(seed)
    img = np.where(inside, 30000 + 2000 * rng.random((w, h)), 50 * rng.random((w, h))).astype(np.uint16)
    return img[None], inside


def test_scale_keeps_16_bit_precision_and_range():
    img, _ = _breast()
    out = ScaleIntensityMammo(mode="minmax")(MetaTensor(torch.from_numpy(img.astype(np.int32))))
    assert out.dtype == torch.float32 and float(out.min()) == 0.0 and float(out.max()) == 1.0
    # far more than 256 levels survive: no 8-bit bottleneck
    assert torch.unique(out).numel() > 1000
    bits = ScaleIntensityMammo(mode="bits")(MetaTensor(torch.full((1, 4, 4), 4095.0).index_put_(
        (torch.tensor([0]), torch.tensor([0]), torch.tensor([0])), torch.tensor(0.0)), meta={"BitsStored": 12}))
    assert float(bits.max()) == 1.0


@pytest.mark.parametrize("bad,reason", [(float("nan"), "NaN"), (float("inf"), "NaN or infinite")])
def test_scale_rejects_non_finite_naming_the_file(bad, reason):
    t = torch.rand(1, 8, 8)
    t[0, 3, 3] = bad
    with pytest.raises(BreastGenError, match=reason) as e:
        ScaleIntensityMammo()(MetaTensor(t, meta={"filename_or_obj": "/data/x.dcm"}))
    assert str(e.value).startswith("/data/x.dcm:")


def test_scale_rejects_constant_image():
    with pytest.raises(BreastGenError, match="constant image"):
        ScaleIntensityMammo()(MetaTensor(torch.ones(1, 8, 8), meta={"filename_or_obj": "c.png"}))


def test_laterality_sources():
    assert laterality_from_filename("Mass-Training_P_00001_LEFT_CC") == "L"
    assert laterality_from_filename("/x/22678622_MG_R_ML_ANON.dcm") == "R"
    assert laterality_from_filename("rmlo.png") == "R" and laterality_from_filename("mdb001.pgm") is None
    assert laterality_from_image(_breast(lat="L")[0]) == "L" and laterality_from_image(_breast(lat="R")[0]) == "R"
    # meta beats filename beats image
    img = MetaTensor(torch.from_numpy(_breast(lat="R")[0]), meta={"ImageLaterality": "L", "filename_or_obj": "a_R_CC"})
    assert FlipToLaterality().resolve(img) == ("L", "meta")
    img = MetaTensor(torch.from_numpy(_breast(lat="R")[0]), meta={"filename_or_obj": "a_LEFT_CC.dcm"})
    assert FlipToLaterality().resolve(img) == ("L", "filename")
    assert FlipToLaterality(method="image").resolve(img) == ("R", "image")


def test_flip_puts_chest_wall_on_the_target_side_and_inverts():
    img, _ = _breast(lat="R")
    t = MetaTensor(torch.from_numpy(img.astype(np.float32)))
    out = FlipToLaterality("L")(t)
    assert out.meta["flipped"] and laterality_from_image(out) == "L"
    assert torch.equal(out.as_tensor(), torch.flip(t.as_tensor(), dims=[1]))
    f = FlipToLaterality("L")
    out = f(t)
    assert torch.equal(f.inverse(out).as_tensor(), t.as_tensor())
    same = FlipToLaterality("R")(t)
    assert not same.meta["flipped"] and torch.equal(same.as_tensor(), t.as_tensor())


@pytest.mark.parametrize("fit,anchor", [("crop", "center"), ("pad", "center"), ("pad", "start"), ("crop", "start")])
def test_box_follows_mask_through_flip_resize_crop(fit, anchor):
    w, h = 330, 520
    img, _ = _breast(w, h, lat="R")
    mask = np.zeros((1, w, h), np.uint8)
    box = [200, 150, 260, 231]  # x0, y0, x1, y1
    mask[0, box[0]:box[2], box[1]:box[3]] = 1
    data = {"image": MetaTensor(torch.from_numpy(img.astype(np.float32)), meta={"ImageLaterality": "R"}),
            "mask": MetaTensor(torch.from_numpy(mask)), "bbox": box}
    pipe = Compose([FlipToLateralityd(["image", "mask"], box_keys="bbox", laterality_key=None),
                    ResizeToSquared(["image", "mask"], size=128, fit=fit, anchor_x=anchor,
                                    mode=["area", "nearest-exact"], box_keys="bbox")])
    out = pipe(data)
    assert out["image"].shape == (1, 128, 128) and out["mask"].shape == (1, 128, 128)
    mbox = box_from_mask(out["mask"])
    np.testing.assert_allclose(out["bbox"], mbox, atol=1.0)
    # the flip moved the lesion to the other half
    assert out["bbox"][2] <= 64
    # inverse restores the original geometry (mask identical up to resampling at the lesion border)
    inv = pipe.inverse(out)
    assert inv["image"].shape == (1, w, h)
    back = inv["mask"].as_tensor().numpy() > 0.5
    assert (back != mask.astype(bool)).mean() < 0.01
    np.testing.assert_allclose(box_from_mask(back), box, atol=3)


def test_resize_to_square_plan():
    r = ResizeToSquare(512, fit="crop")
    p = r.plan((3328, 4084))
    assert p["resized"] == [512, 628] and p["crop_start"] == [0, 58]
    p = ResizeToSquare(512, fit="pad", anchor_x="start").plan((3328, 4084))
    assert p["resized"] == [417, 512] and p["pad"][0] == (0, 95)


def test_breast_mask_ignores_markers_and_area_class():
    img, inside = _breast(300, 500)
    img = img.copy()
    img[0, 280:295, 10:30] = 65000  # a burnt-in marker in the background
    m = breast_mask(img.astype(np.float32))
    assert (m == inside).mean() > 0.99 and not m[280:295, 10:30].any()
    d = BreastMaskd("image")({"image": MetaTensor(torch.from_numpy(img.astype(np.float32)))})
    assert d["breast_mask"].shape == (1, 300, 500)
    assert abs(d["breast_area_ratio"] - inside.mean()) < 0.01 and d["area"] == "medium"  # 0.57


def test_prompt_from_fields_and_meta():
    img = MetaTensor(torch.zeros(1, 4, 4), meta={"Manufacturer": "HOLOGIC, Inc.", "ViewPosition": "MLO",
                                                  "filename_or_obj": "p.dcm"})
    d = MammoPromptd()({"image": img, "density": "B", "area": "medium"})
    assert d["prompt"] == "a hologic mammogram in MLO view with low density and medium area"
    with pytest.raises(BreastGenError, match=r"^p.dcm: unknown density"):
        MammoPromptd()({"image": img, "density": "Z"})


def test_validation_of_masks_and_boxes():
    img = MetaTensor(torch.zeros(1, 100, 80), meta={"filename_or_obj": "im.dcm"})
    with pytest.raises(BreastGenError, match="mask size"):
        ValidateMaskd("mask")({"image": img, "mask": MetaTensor(torch.zeros(1, 80, 100), meta={"filename_or_obj": "m.png"})})
    with pytest.raises(BreastGenError, match="empty mask"):
        ValidateMaskd("mask", require_nonempty=True)({"image": img, "mask": torch.zeros(1, 100, 80)})
    with pytest.raises(BreastGenError, match=r"^im.dcm: bbox .* outside the image"):
        ValidateBoxesd("bbox")({"image": img, "bbox": [90, 10, 120, 20]})
    with pytest.raises(BreastGenError, match="out of order"):
        ValidateBoxesd("bbox")({"image": img, "bbox": [50, 10, 40, 20]})
    ValidateBoxesd("bbox")({"image": img, "bbox": [0, 0, 100, 80]})
