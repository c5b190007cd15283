"""mammo_ldm_inpainting: geometry and paste-back, the inpainting pipeline on a 16-bit DICOM, RePaint, training
plumbing, bad input, and the demo model (trained on top of the text-to-image demo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from breastgen.data.phantoms import make_mammogram
from breastgen.data.readers import load_image
from breastgen.data.transforms import breast_mask
from breastgen.engines import inpainting as ip
from breastgen.errors import BreastGenError
from breastgen.io.dicom import SYNTHETIC_MARK, write_mg_dicom
from breastgen.networks.text import PromptTokenizer, TextConditionedUNet, TextEncoder
from breastgen.schedulers import guided_sample, make_scheduler, repaint_sample
from conftest import ROOT, run_bundle_cli

BUNDLE = ROOT / "bundles" / "mammo_ldm_inpainting"
CONFIGS = BUNDLE / "configs"


# ------------------------------------------------------------------------------------------ geometry
def test_context_window_contains_the_box_and_stays_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = int(rng.integers(80, 300)), int(rng.integers(80, 300))
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        box = [x0, y0, x0 + int(rng.integers(2, min(40, w - x0))), y0 + int(rng.integers(2, min(40, h - y0)))]
        wx, wy, side = ip.context_window(box, (w, h), 3.0, 64, jitter=0.3, rng=rng)
        assert side >= 64 and side >= 3 * max(box[2] - box[0], box[3] - box[1]) - 1
        assert wx <= box[0] and wy <= box[1] and wx + side >= box[2] and wy + side >= box[3]
        if side <= w:
            assert 0 <= wx and wx + side <= w
        if side <= h:
            assert 0 <= wy and wy + side <= h
    # a window larger than the image is centred on it (zero padding outside)
    assert ip.context_window([10, 10, 20, 20], (50, 40), 3.0, 64) == (-7, -12, 64)
    img = torch.arange(50 * 40, dtype=torch.float32).reshape(1, 50, 40)
    crop = ip.crop_window(img, (-7, -12, 64))
    assert crop.shape == (1, 64, 64) and crop[0, 7:57, 12:52].equal(img[0]) and crop[0, :7].abs().sum() == 0


def test_paste_back_is_bit_identical_outside_the_dilated_mask():
    rng = np.random.default_rng(1)
    orig = rng.integers(0, 65535, size=(120, 90), dtype=np.uint16)
    mask = np.zeros((120, 90), dtype=bool)
    mask[40:60, 30:50] = True
    gen = rng.uniform(0, 65535, size=orig.shape)
    out = ip.paste_back(orig, gen, mask, feather=6)
    from scipy import ndimage

    far = ndimage.distance_transform_edt(~mask) >= 6
    assert out.dtype == np.uint16
    assert np.array_equal(out[far], orig[far])
    assert np.array_equal(out[mask], np.round(gen[mask]).astype(np.uint16))
    ring = ~mask & ~far  # blend: between the two
    lo, hi = np.minimum(orig, np.round(gen)), np.maximum(orig, np.round(gen))
    assert ((out[ring] >= lo[ring] - 1) & (out[ring] <= hi[ring] + 1)).all()


def test_random_mask_lies_on_breast_tissue_away_from_lesions():
    m = make_mammogram(3, lesion="benign")
    img = m.image.T  # (W, H)
    breast, lesion = breast_mask(img), m.lesion_mask.T
    rng = np.random.default_rng(0)
    sizes = []
    for shape in ("box", "blob", "any"):
        for _ in range(10):
            r = ip.random_mask(breast, rng, (12, 24), shape, avoid=lesion)
            assert r.any() and not (r & ~breast).any() and not (r & lesion).any()
            xs, ys = np.nonzero(r)
            sizes.append(max(np.ptp(xs), np.ptp(ys)) + 1)
    assert 6 <= min(sizes) and max(sizes) <= 25
    with pytest.raises(BreastGenError, match="shape"):
        ip.random_mask(breast, rng, (12, 24), "star")


def test_box_size_range_is_the_interquartile_range_of_training_boxes():
    entries = [{"bbox": [0, 0, s, s // 2]} for s in (10, 20, 30, 40, 50)] + [{"label": "normal"}]
    assert ip.box_size_range(entries) == [20.0, 40.0]
    assert ip.box_size_range([{"label": "normal"}]) == [16.0, 48.0]


def test_intensity_matching_removes_a_decoder_bias():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 1, 32, 32, generator=g)
    known = torch.ones_like(target, dtype=torch.bool)
    known[..., 10:20, 10:20] = False
    decoded = 0.7 * target + 0.05  # a darker, lower-contrast reconstruction
    fixed = ip._match_known(decoded, target, known)
    assert torch.allclose(fixed, target, atol=1e-5)  # the unknown part too: the fit is global
    flat = torch.full_like(target, 0.3)  # nothing to fit: unchanged
    assert torch.equal(ip._match_known(flat, target, known), flat)


def test_latent_mask_keeps_a_small_lesion():
    m = torch.zeros(1, 1, 64, 64)
    m[..., 30:33, 30:33] = 1  # 3 x 3 px: a 0.5 threshold on an 8x area resize would drop it
    lm = ip.latent_mask(m, 8)
    assert lm.shape == (1, 1, 8, 8) and lm.sum() >= 1 and set(lm.unique().tolist()) <= {0.0, 1.0}


# ------------------------------------------------------------------------------------------ tiny untrained models
def _nets(in_extra: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    tok = PromptTokenizer(max_length=12)
    ae = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), num_res_blocks=1,
                       latent_channels=3, attention_levels=(False, False), norm_num_groups=8,
                       with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False).eval()
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=7 if in_extra else 3, out_channels=3, channels=(16, 32),
                              attention_levels=(False, True), num_res_blocks=1, num_head_channels=16,
                              norm_num_groups=8, with_conditioning=True, cross_attention_dim=16)
    net = TextConditionedUNet(unet, TextEncoder(len(tok), 16, 1, 2, 12)).eval()
    return ae, net, tok


def _pipeline(mode: str = "model", **kw):
    ae, net, tok = _nets(mode == "model")
    return ip.InpaintingPipeline(ae, net, tok, 1.0, image_size=32, mode=mode, min_window=32, feather=3, **kw)


@pytest.fixture(scope="module")
def dicom16(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 16-bit right-breast MG DICOM phantom with its (W, H) pixel array as loaded."""
    m = make_mammogram(5, size=(128, 104), laterality="R", lesion=None)
    path = tmp_path_factory.mktemp("ip") / "right_cc.dcm"
    write_mg_dicom(path, m.image, laterality="R", view="CC", manufacturer="SIEMENS", synthetic=True)
    arr, _ = load_image(path)
    return path, np.asarray(arr)


def _mask_on_breast(img: np.ndarray, seed: int = 0) -> np.ndarray:
    return ip.random_mask(breast_mask(img), np.random.default_rng(seed), (10, 16), "box")


def test_inpainting_a_16bit_dicom_changes_only_the_dilated_mask(dicom16, tmp_path):
    path, img = dicom16
    pipe = _pipeline()
    mask = _mask_on_breast(img)
    box = ip.box_from_mask(mask).astype(int).tolist()
    man = ip.inpaint_files(pipe, [{"image": str(path), "mask": box}], tmp_path / "out", prompt="a mammogram with a mass",
                           num_inference_steps=3, seed=7)
    files = man[0]["files"]
    out_ds = pydicom.dcmread(files["dcm"])
    out = out_ds.pixel_array.T  # (W, H)
    src = pydicom.dcmread(path).pixel_array.T
    assert out.dtype == np.uint16 and out.shape == src.shape
    from scipy import ndimage

    far = ndimage.distance_transform_edt(~mask) >= pipe.feather
    assert np.array_equal(out[far], src[far])  # stored 16-bit values, bit for bit
    inside = out[mask].astype(np.int64)
    assert np.abs(inside - src[mask]).mean() > 50  # the mask was filled with something new ...
    assert inside.std() > 0 and inside.mean() > 0  # ... and not left as the masked-out (zero) fill
    # synthetic, no source identity; the mask and side-by-side preview were written
    assert SYNTHETIC_MARK in str(out_ds.ImageComments) and out_ds.PatientName == "SYNTHETIC"
    assert out_ds.SOPInstanceUID != pydicom.dcmread(path).SOPInstanceUID and out_ds.ImageLaterality == "R"
    saved_mask, _ = load_image(files["mask"], allow_constant=True)
    assert np.array_equal(np.asarray(saved_mask) > 0, mask)
    for key in ("png", "tiff", "compare"):
        assert Path(files[key]).is_file()
    png, _ = load_image(files["png"])
    assert np.array_equal(np.asarray(png), out)  # 16-bit PNG holds the same values


def test_seeded_runs_repeat_and_seeds_differ(dicom16):
    _, img = dicom16
    pipe = _pipeline()
    mask = _mask_on_breast(img, 1)
    a = pipe.inpaint(img, mask, "a mammogram with a lesion", seed=3, num_inference_steps=3)["image"]
    b = pipe.inpaint(img, mask, "a mammogram with a lesion", seed=3, num_inference_steps=3)["image"]
    c = pipe.inpaint(img, mask, "a mammogram with a lesion", seed=4, num_inference_steps=3)["image"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_right_breast_is_processed_as_left_and_mirrored_back(dicom16):
    _, img = dicom16
    pipe = _pipeline()
    mask = _mask_on_breast(img, 2)
    right = pipe.inpaint(img, mask, "a mammogram with a mass", seed=1, num_inference_steps=2, laterality="R")
    left = pipe.inpaint(img[::-1].copy(), mask[::-1].copy(), "a mammogram with a mass", seed=1, num_inference_steps=2,
                        laterality="L")
    assert right["flipped"] and not left["flipped"]
    assert np.array_equal(right["image"], left["image"][::-1])


def test_repaint_keeps_the_known_region_and_matches_plain_sampling_when_all_is_masked():
    ae, net, tok = _nets(in_extra=False)
    g = torch.Generator().manual_seed(0)
    noise, known = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    ctx = net.encode(tok(["a mammogram", "a mammogram"]))
    sched = lambda: make_scheduler("ddim")  # noqa: E731
    nothing = repaint_sample(net, noise, sched(), 5, known, torch.zeros(1, 1, 8, 8), context=ctx)
    assert torch.equal(nothing, known)  # nothing to generate: the known latent comes back exactly
    everything = repaint_sample(net, noise, sched(), 5, known, torch.ones(1, 1, 8, 8), context=ctx)
    assert torch.allclose(everything, guided_sample(net, noise, sched(), 5, context=ctx), atol=1e-5)
    with pytest.raises(BreastGenError, match="ddim"):
        repaint_sample(net, noise, make_scheduler("dpm++2m"), 5, known, torch.ones(1, 1, 8, 8), resample=2)


def test_repaint_pipeline_on_a_dicom(dicom16):
    _, img = dicom16
    pipe = _pipeline("repaint")
    mask = _mask_on_breast(img, 3)
    out = pipe.inpaint(img, mask, "a mammogram in CC view", seed=0, num_inference_steps=4, sampler="ddim", resample=2)
    from scipy import ndimage

    far = ndimage.distance_transform_edt(~mask) >= pipe.feather
    assert np.array_equal(out["image"][far], img[far]) and not np.array_equal(out["image"][mask], img[mask])
    side = max(img.shape)
    assert out["window"][2] == side  # the whole image, as the text-to-image model saw it
    with pytest.raises(BreastGenError, match="cannot parse"):
        pipe.check(img, mask, "a mammogram with a mass")  # not the text-to-image grammar


def test_init_from_text2image_starts_as_the_text2image_model(tmp_path):
    _, t2i, tok = _nets(in_extra=False, seed=1)
    _, inp, _ = _nets(in_extra=True, seed=2)
    from breastgen.data.conditioning import LatentScaleFactor

    torch.save({"network": t2i.state_dict(), "scale": LatentScaleFactor(0.7).state_dict()}, tmp_path / "t2i.pt")
    scale = LatentScaleFactor()
    n = ip.init_from_text2image(inp, tmp_path / "t2i.pt", scale)
    assert n == len(t2i.state_dict()) and float(scale.value) == pytest.approx(0.7)
    x, extra = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    ctx = tok(["a mammogram with a mass", ""])
    with torch.no_grad():
        assert torch.allclose(inp(torch.cat([x, extra], 1), t, ctx), t2i(x, t, ctx), atol=1e-5)
    assert ip.init_from_text2image(inp, None) == 0
    with pytest.raises(BreastGenError, match="not found|no such|missing"):
        ip.init_from_text2image(inp, tmp_path / "absent.pt")


def test_prepare_batch_and_inferer_feed_nine_channel_style_inputs():
    ae, net, tok = _nets(in_extra=True)
    from breastgen.data.conditioning import LatentScaleFactor

    sched = make_scheduler("ddpm", prediction_type="v_prediction")
    prep = ip.InpaintPrepareBatch(ae, LatentScaleFactor(0.5), 1000, "v_prediction", sched)
    image, mask = torch.rand(2, 1, 32, 32), torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:16, 8:16] = 1
    z, target, _, kw = prep({"image": image, "mask": mask, "tokens": tok(["a mammogram with a mass", ""])})
    assert z.shape == (2, 3, 16, 16) and kw["concat"].shape == (2, 4, 16, 16)
    assert set(kw["concat"][:, 0].unique().tolist()) == {0.0, 1.0}
    assert torch.allclose(target, sched.get_velocity(z, kw["noise"], kw["timesteps"]))
    from breastgen.engines.conditional import ConditionalDiffusionInferer

    assert kw["context"].dtype == torch.long  # token ids: the text encoder runs inside the network
    pred = ConditionalDiffusionInferer(sched)(z, net, kw["noise"], kw["timesteps"], context=kw["context"],
                                              concat=kw["concat"])
    assert pred.shape == z.shape
    with pytest.raises(BreastGenError, match="scale factor"):
        ip.InpaintPrepareBatch(ae, LatentScaleFactor(), 1000)({"image": image, "mask": mask, "tokens": kw["context"]})


def test_training_window_transform_lesion_and_random_masks(tmp_path):
    m = make_mammogram(3, lesion="malignant")
    img = torch.from_numpy(m.image.T[None].astype(np.float32) / m.image.max())
    t = ip.InpaintWindowd(size=32, min_window=48, lesion_type="mass", pathology_prob=1.0)
    t.set_random_state(0)
    les = t({"image": img, "mask": torch.from_numpy(m.lesion_mask.T[None]), "label": "malignant"})
    assert les["image"].shape == (1, 32, 32) and les["mask"].shape == (1, 32, 32)
    assert les["prompt"] == "a mammogram with a malignant mass" and 0 < les["mask"].mean() < 0.5
    nor = t({"image": img, "label": "normal"})
    assert nor["prompt"] == "a mammogram" and nor["mask"].sum() > 0
    box = t({"image": img, "bbox": m.bbox, "label": "benign"})  # bbox only
    assert box["prompt"] in ("a mammogram with a benign mass", "a mammogram with a mass") and box["mask"].sum() > 0


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("case,needle", [
    ("size", "differs from image size"), ("empty", "empty mask"), ("outside", "outside the breast"),
    ("bbox", "outside the image"), ("word", "unknown pathology"), ("steps", "steps"),
])
def test_bad_requests_raise_one_line_errors_before_writing(dicom16, tmp_path, case, needle):
    path, img = dicom16
    pipe = _pipeline()
    w, h = img.shape
    req: dict = {"image": str(path)}
    kw: dict = {"num_inference_steps": 2}
    if case == "size":
        from PIL import Image

        Image.fromarray(np.full((h + 3, w), 255, np.uint8)).save(tmp_path / "m.png")
        req["mask"] = str(tmp_path / "m.png")
    elif case == "empty":
        from PIL import Image

        Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / "m.png")
        req["mask"] = str(tmp_path / "m.png")
    elif case == "outside":
        bg = ~breast_mask(img)
        xs, ys = np.nonzero(bg)
        req["mask"] = [int(xs[0]), int(ys[0]), int(xs[0]) + 3, int(ys[0]) + 3]
        assert bg[xs[0]:xs[0] + 3, ys[0]:ys[0] + 3].all()
    elif case == "bbox":
        req["mask"] = [w - 5, 10, w + 20, 30]
    elif case == "word":
        req["mask"], kw["prompt"] = "random", "a mammogram with a huge mass"
    else:
        req["mask"], kw["num_inference_steps"] = "random", 0
    with pytest.raises(BreastGenError, match=needle) as e:
        ip.inpaint_files(pipe, [{"image": str(path), "mask": "random"}, req], tmp_path / "out", **kw)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written, not even for the good first request


def test_corrupt_image_and_bbox_file_errors(tmp_path):
    pipe = _pipeline()
    bad = tmp_path / "notes.dcm"
    bad.write_text("this is not a DICOM file")
    with pytest.raises(BreastGenError, match="notes.dcm"):
        ip.inpaint_files(pipe, [{"image": str(bad), "mask": "random"}], tmp_path / "out")
    img = np.asarray(make_mammogram(0, size=(96, 80)).image.T)
    (tmp_path / "box.json").write_text("{not json")
    with pytest.raises(BreastGenError, match="not JSON"):
        ip.read_mask(str(tmp_path / "box.json"), img)
    (tmp_path / "box.json").write_text(json.dumps({"bbox": [10, 10, 5, 20]}))
    with pytest.raises(BreastGenError, match="out of order"):
        ip.read_mask(str(tmp_path / "box.json"), img)


# ------------------------------------------------------------------------------------------ the demo bundle
@pytest.fixture(scope="module")
def demo(bundle_demo) -> Path:
    return bundle_demo(BUNDLE)


@pytest.fixture(scope="module")
def t2i(bundle_demo, demo) -> Path:
    return bundle_demo(ROOT / "bundles" / "mammo_ldm_text2image")  # already run: the inpainting demo needs it


def test_demo_outputs_and_gallery(demo):
    m = json.loads((demo / "metrics.json").read_text())
    for key in ("model_seam_ratio", "repaint_seam_ratio", "seam_ratio_real_lesions", "model_fid_lesion_crops",
                "model_classifier_lesion_rate", "repaint_classifier_lesion_rate", "classifier_lesion_rate_real_lesions"):
        assert np.isfinite(m[key]), key
    assert (demo / "gallery.png").is_file()
    man = json.loads((demo / "inpainted" / "inpainted.json").read_text())
    assert len(man) == 3 and all(Path(r["files"]["compare"]).is_file() for r in man)
    assert json.loads((demo / "inpainted_repaint" / "inpainted.json").read_text())[0]["mode"] == "repaint"


def test_demo_model_draws_a_lesion_when_asked(demo, t2i, demo_data):
    """Phantom lesions are bright masses: on lesion-free test phantoms, the same masks and seeds, the lesion prompt
    fills the mask brighter than the tissue around it, the normal-tissue prompt about as bright as it."""
    from scipy import ndimage

    from breastgen.data.datalists import load_datalist

    p = ConfigParser()
    p.read_config([str(CONFIGS / f) for f in ("train.json", "inference.json", "demo.json")])
    p.update({"bundle_root": str(BUNDLE), "data_dir": str(demo_data), "output_dir": str(demo),
              "text2image_dir": str(t2i)})
    p.get_parsed_content("load")
    pipe = p.get_parsed_content("pipeline")
    tests = [e for e in load_datalist(demo_data / "mammo" / "datalist.json", "test") if e["label"] == "normal"][:6]
    size = p.get_parsed_content("random_box_size")
    lesion, normal = [], []
    for k, e in enumerate(tests):
        img = np.asarray(load_image(e["image"])[0])
        mask = ip.random_mask(breast_mask(img), np.random.default_rng(k), size, "box")
        ring = ndimage.binary_dilation(mask, iterations=8) & ~ndimage.binary_dilation(mask, iterations=3)
        around, span = img[ring & breast_mask(img)].astype(np.float64).mean(), float(img.max() - img.min())
        for prompt, out in (("a mammogram with a mass", lesion), ("a mammogram", normal)):
            res = pipe.inpaint(img, mask, prompt, seed=k, guidance_scale=3.5, num_inference_steps=20)["image"]
            out.append((res[mask].astype(np.float64).mean() - around) / span)
    print("fill - surrounding tissue (fraction of the range): lesion", np.round(lesion, 3), "normal", np.round(normal, 3))
    assert np.mean(lesion) > 0.03 and sum(v > 0 for v in lesion) >= 4, lesion
    assert np.mean(lesion) > np.mean(normal) + 0.03 and abs(np.mean(normal)) < 0.05, (lesion, normal)


def test_cli_bad_mask_is_one_line_and_writes_nothing(demo, t2i, demo_data, tmp_path):
    img = sorted((demo_data / "mammo" / "dicom").glob("*.dcm"))[0]
    w = pydicom.dcmread(img).Columns
    inputs = json.dumps([{"image": str(img), "mask": [w - 2, 0, w + 30, 20]}])
    out = tmp_path / "o"
    r = run_bundle_cli(BUNDLE, ["train.json", "inference.json", "demo.json"], "--data_dir", str(demo_data),
                       "--output_dir", str(out), "--text2image_dir", str(t2i),
                       "--inpainting_ckpt", str(demo / "models" / "inpainting.pt"), "--inputs", inputs)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "outside the image" in last and "Traceback" not in r.stderr
    assert not (out / "inpainted").exists()


def test_multi_gpu_overlay_trains_with_torchrun_on_cpu(demo, t2i, demo_data, tmp_path):
    r = run_bundle_cli(BUNDLE, ["train.json", "demo.json", "multi_gpu_train.json"], "--data_dir", str(demo_data),
                       "--output_dir", str(tmp_path), "--text2image_dir", str(t2i), "--epochs", "1", nproc=2,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "models" / "inpainting.pt").is_file()


# ------------------------------------------------------------------------------------------ data preparation
def test_prepare_lesion_datalist_from_a_mini_mias_replica(tmp_path):
    import importlib.util

    from PIL import Image

    spec = importlib.util.spec_from_file_location("prep", ROOT / "scripts" / "prepare_lesion_datalist.py")
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    folder = tmp_path / "mias"
    folder.mkdir()
    lines, centre_row = ["Reference list"], None
    for k, (ref, lesion) in enumerate((("mdb001", "benign"), ("mdb002", None), ("mdb003", "malignant"))):
        m = make_mammogram(10 + k, lesion=lesion)
        Image.fromarray((m.image / 256).astype(np.uint8)).save(folder / f"{ref}.pgm")
        if lesion is None:
            lines.append(f"{ref} F NORM")
        elif ref == "mdb001":
            x0, y0, x1, y1 = m.bbox
            cx, centre_row = (x0 + x1) / 2, round((y0 + y1) / 2)
            lines.append(f"{ref} G CIRC B {cx:.0f} {256 - 1 - centre_row} 9")
        else:
            lines.append(f"{ref} D SPIC M")  # no centre: skipped with a reason
    (folder / "Info.txt").write_text("\n".join(lines) + "\n")
    assert prep.main(["--mias", str(folder / "Info.txt"), "--out", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "datalist.json").read_text())
    entries = [e for s in data.values() for e in s]
    les = [e for e in entries if e["label"] == "benign"]
    assert len(les) == 1 and {e["label"] for e in entries if "mdb002" in e["image"]} == {"normal"}
    mask, _ = load_image(tmp_path / "out" / les[0]["mask"], allow_constant=True)
    mask = np.asarray(mask) > 0
    x0, y0, x1, y1 = les[0]["bbox"]
    assert mask.shape == (208, 256) and 15 <= x1 - x0 <= 20 and 15 <= y1 - y0 <= 20  # a radius-9 circle
    assert abs(np.nonzero(mask)[1].mean() - centre_row) < 1  # y counted from the bottom, converted to rows
    assert "mdb003" in (tmp_path / "out" / "skipped.csv").read_text()


def test_torchscript_export_of_the_inpainting_unet(tmp_path):
    from breastgen.networks.export import export_torchscript

    _, net, tok = _nets(in_extra=True)
    x, t = torch.randn(2, 7, 8, 8), torch.tensor([10, 500])  # noisy latent + mask + masked latent
    ctx = net.encode(tok(["a mammogram with a malignant mass", ""]))
    loaded = torch.jit.load(str(export_torchscript(net, {"x": x, "timesteps": t, "context": ctx},
                                                 tmp_path / "inpaint_unet.ts")))
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, ctx), net(x, timesteps=t, context=ctx), atol=1e-4)
