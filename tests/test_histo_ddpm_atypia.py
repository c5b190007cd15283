"""histo_ddpm_atypia: nuclei masks, EMA, data preparation, bad input, and the demo model's behaviour
(grade-3 tiles have larger nuclei than grade-1 tiles; mask-guided tiles follow their masks), the
synthetic-fraction experiment end to end."""

from __future__ import annotations

import csv
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from PIL import Image

from breastgen.data.atypia import (ClassDropoutd, ClassLabeld, prepare_class_folders, prepare_mitos_atypia,
                                   read_scores, select_class, split_groups)
from breastgen.data.nuclei import (MaskClassAblationd, NucleiSegmenter, OneHotMaskd, class_index_mask, load_masks,
                                   mask_agreement, mask_dice, mask_files_from_datalist, mask_iou, mask_preview,
                                   nucleus_areas, segment_nuclei)
from breastgen.data.phantoms import make_he_tile
from breastgen.engines.ema import EMA
from breastgen.engines.histo_ddpm import generate_tiles
from breastgen.errors import BreastGenError, find_breastgen_error
from conftest import ROOT, run_bundle_cli

BUNDLE = ROOT / "bundles" / "histo_ddpm_atypia"
CONFIGS = BUNDLE / "configs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _chw(rgb_hwc: np.ndarray) -> np.ndarray:
    return np.transpose(rgb_hwc, (2, 1, 0))  # file (rows, cols, 3) -> MONAI (3, W, H)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)
    return path


def _one_line(exc: BaseException) -> str:
    err = find_breastgen_error(exc)
    assert err is not None, repr(exc)
    assert "\n" not in str(err)
    return str(err)


# ------------------------------------------------------------------------------------------------ nuclei
def test_classical_segmentation_finds_the_phantom_nuclei_and_their_size():
    areas = {}
    for grade in (1, 3):
        tile = make_he_tile(np.random.default_rng([5, grade]), 128, grade)
        labels = segment_nuclei(_chw(tile["image"]))
        assert labels.shape == (128, 128) and labels.dtype == np.int32
        assert mask_iou(labels, tile["nuclei_mask"].T) > 0.85
        assert mask_dice(labels, tile["nuclei_mask"].T) > 0.9
        areas[grade] = nucleus_areas(labels).mean()
    assert areas[3] > 3 * areas[1]
    # a tile without nuclei (pale stroma only) gets (almost) nothing
    blank = np.full((3, 64, 64), 235, np.uint8)
    blank[1] = 200
    assert nucleus_areas(segment_nuclei(blank)).sum() == 0


def test_watershed_splits_touching_nuclei():
    yy, xx = np.mgrid[:40, :40]
    blob = (np.hypot(xx - 14, yy - 20) < 7) | (np.hypot(xx - 26, yy - 20) < 7)
    img = np.where(blob[None], np.array([60, 40, 140])[:, None, None], np.array([235, 190, 225])[:, None, None])
    labels = segment_nuclei(img.astype(np.uint8).transpose(0, 2, 1), sigma=0, min_distance=4)
    assert labels.max() == 2
    assert segment_nuclei(img.astype(np.uint8), sigma=0, split=False).max() == 1


def test_mask_metrics_and_shuffled_baseline():
    a = np.zeros((8, 8), bool)
    a[:4] = True
    b = np.zeros((8, 8), bool)
    b[2:6] = True
    assert mask_iou(a, b) == pytest.approx(16 / 48) and mask_dice(a, b) == pytest.approx(0.5)
    assert mask_iou(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    rng = np.random.default_rng(0)
    masks = [rng.random((16, 16)) > 0.7 for _ in range(6)]
    agree = mask_agreement(masks, masks)
    assert agree["iou"] == 1.0 and agree["iou_shuffled"] < 0.5
    with pytest.raises(BreastGenError, match="shapes"):
        mask_iou(np.zeros((4, 4)), np.zeros((4, 5)))


def test_network_segmenter_from_a_local_checkpoint(tmp_path):
    from monai.networks.nets import BasicUNet

    net = BasicUNet(spatial_dims=2, in_channels=3, out_channels=2, features=(4, 4, 8, 8, 16, 4))
    torch.save({"model": net.state_dict()}, tmp_path / "seg.pt")
    seg = NucleiSegmenter("network", network=BasicUNet(spatial_dims=2, in_channels=3, out_channels=2,
                                                       features=(4, 4, 8, 8, 16, 4)), checkpoint=tmp_path / "seg.pt")
    labels = seg(np.full((3, 32, 32), 128, np.uint8))
    assert labels.shape == (32, 32)
    with pytest.raises(BreastGenError, match="checkpoint not found"):
        NucleiSegmenter("network", network=net, checkpoint=tmp_path / "missing.pt")
    with pytest.raises(BreastGenError, match="unknown nuclei segmentation option"):
        NucleiSegmenter(radius=3)


def test_one_hot_masks_validation_resize_and_ablation():
    m = np.zeros((1, 8, 8), np.uint8)
    m[0, 2:6, 2:6] = 255
    d = OneHotMaskd("mask", values=[0, 255], ref_key="image")({"mask": torch.from_numpy(m),
                                                               "image": torch.zeros(3, 8, 8)})
    assert d["mask"].shape == (2, 8, 8) and d["mask"][1].sum() == 16 and torch.all(d["mask"].sum(0) == 1)
    small = OneHotMaskd("mask", values=[0, 255], spatial_size=4, ref_key=None)({"mask": torch.from_numpy(m)})["mask"]
    assert small.shape == (2, 4, 4) and small[1].sum() == 4
    # unknown class values and size mismatch: one line naming the file
    bad = MetaTensor(torch.from_numpy(np.where(m > 0, 128, 0).astype(np.uint8)), meta={"filename_or_obj": "m.png"})
    with pytest.raises(BreastGenError, match=r"^m.png: mask has values 128 that are not known classes"):
        OneHotMaskd("mask", values=[0, 255], ref_key=None)({"mask": bad})
    with pytest.raises(BreastGenError, match="mask size .* differs from image size"):
        OneHotMaskd("mask", values=[0, 255])({"mask": torch.from_numpy(m), "image": torch.zeros(3, 8, 6)})
    assert class_index_mask(np.array([0, 1, 2]), [0, 1, 2]).tolist() == [0, 1, 2]
    # class ablation: the nucleus class becomes background
    onehot = d["mask"]
    ablated = MaskClassAblationd("mask", prob=1.0)({"mask": onehot})["mask"]
    assert ablated[1].sum() == 0 and torch.all(ablated[0] == 1)
    kept = MaskClassAblationd("mask", prob=0.0)({"mask": onehot})["mask"]
    assert torch.equal(kept, onehot)


def test_class_labels_and_class_dropout():
    assert ClassLabeld("label", 3)({"label": 2})["label"].item() == 2
    with pytest.raises(BreastGenError, match="outside 0..2"):
        ClassLabeld("label", 3)({"label": 3})
    with pytest.raises(BreastGenError, match="integer"):
        ClassLabeld("label", 3)({"label": "grade 2"})
    drop = ClassDropoutd("label", num_classes=3, prob=1.0)
    assert drop({"label": torch.tensor(1)})["label"].item() == 3
    keep = ClassDropoutd("label", num_classes=3, prob=0.0)
    assert keep({"label": 1})["label"].item() == 1


def test_masks_and_classes_picked_from_a_datalist(tmp_path):
    m = np.zeros((24, 24), np.uint8)
    m[4:12, 4:12] = 255
    m1, m2 = _png(tmp_path / "m1.png", m), _png(tmp_path / "m2.png", m.T.copy())
    entries = [{"image": "a.png", "mask": str(m1), "label": 0}, {"image": "b.png", "label": 1},
               {"image": "c.png", "mask": str(m2), "label": 2}]
    assert mask_files_from_datalist(entries) == ([str(m1), str(m2)], [0, 2])
    assert mask_files_from_datalist(entries, 1) == ([str(m1)], [0])
    with pytest.raises(BreastGenError, match="no entry with a 'mask'"):
        mask_files_from_datalist(entries[1:2])
    masks = load_masks([m1, m2], [0, 255], 12)
    assert masks.shape == (2, 2, 12, 12) and torch.all(masks.sum(1) == 1) and masks[0, 1].sum() == 16
    preview = mask_preview(masks[0])
    assert preview.shape == (3, 12, 12) and set(preview.unique().tolist()) == {0.0, 1.0}
    wide = _png(tmp_path / "wide.png", np.zeros((24, 32), np.uint8))
    with pytest.raises(BreastGenError, match=r"wide.png: mask is 32 x 24 \(W x H\); the model makes square"):
        load_masks([m1, wide], [0, 255], 12)
    rgb = _png(tmp_path / "rgb.png", np.zeros((24, 24, 3), np.uint8))
    with pytest.raises(BreastGenError, match="a mask has one grey channel"):
        load_masks([rgb], [0, 255], 12)
    # one model per class: its tiles only; all tiles (copies) for None
    assert select_class(entries, 2, 3) == [entries[2]]
    everything = select_class(entries, None, 3)
    assert everything == entries and everything[0] is not entries[0]
    with pytest.raises(BreastGenError, match="train_class must be null or an integer 0..2"):
        select_class(entries, 3, 3)
    with pytest.raises(BreastGenError, match="no training tile of class 1"):
        select_class(entries[:1], 1, 3)


# ------------------------------------------------------------------------------------------------ EMA
def test_ema_average_swap_and_checkpoint_round_trip():
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, decay=0.5, warmup=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update()  # 0.5 * 0 + 0.5 * 1
    with torch.no_grad():
        net.weight.fill_(2.0)
    ema.update()  # 0.5 * 0.5 + 0.5 * 2
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 1.25))
    with ema.swapped() as swapped:
        assert swapped is net and torch.allclose(net.weight, torch.full((1, 2), 1.25)) and not net.training
    assert torch.allclose(net.weight, torch.full((1, 2), 2.0)) and net.training
    state = ema.state_dict()
    other = EMA(torch.nn.Linear(2, 1, bias=False), decay=0.5)
    other.load_state_dict(state)
    assert other.num_updates == 2 and torch.allclose(other.module.weight, ema.module.weight)
    plain = torch.nn.Linear(2, 1, bias=False)
    plain.load_state_dict(ema.module.state_dict())  # the final checkpoint's "ema" entry loads into a network
    warm = EMA(net, decay=0.999)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): early steps follow the weights
    with pytest.raises(BreastGenError, match="decay"):
        EMA(net, decay=1.5)


def test_classification_metrics_and_intervals():
    from breastgen.metrics import classification as C

    rng = np.random.default_rng(0)
    for k in (2, 3):
        y = rng.integers(0, k, 40)
        p = rng.dirichlet(np.ones(k), 40)
        p[np.arange(40), y] += 0.4
        p /= p.sum(1, keepdims=True)
        s = C.summary(y, p, n_boot=200)
        for m in C.METRICS:  # the bootstrap's numpy metrics agree with scikit-learn's
            assert C._FAST[m](y, p) == pytest.approx(s[m])
            assert s[f"{m}_ci_low"] <= s[m] <= s[f"{m}_ci_high"]
    assert C.summary([0, 1, 1, 0], np.eye(2)[[0, 1, 1, 0]])["macro_f1"] == 1.0
    mean, half = C.t_interval([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)
    assert np.isnan(C.t_interval([0.5])[1])


# ------------------------------------------------------------------------------------------------ preparation
def _frame(seed: int, score: int, size=(1539, 1376)) -> np.ndarray:
    """An x20-sized H&E frame (rows x cols x 3 = 1376 x 1539) tiled from phantom tiles of the score's grade."""
    tile = make_he_tile(np.random.default_rng([seed, score]), 256, score)["image"]
    reps = (size[1] // 256 + 1, size[0] // 256 + 1, 1)
    return np.tile(tile, reps)[: size[1], : size[0]]


def _mitos_replica(root: Path) -> Path:
    frames = root / "MITOS-ATYPIA-14"
    rows = []
    for slide, score in (("A03", 1), ("A04", 1), ("A07", 2), ("A11", 3)):
        name = f"{slide}_00Aa"
        _png(frames / slide / "frames" / "x20" / f"{name}.png", _frame(len(rows), score))
        rows.append(f"{name},{score}")
    (root / "scores.csv").write_text("frame,score\n" + "\n".join(rows) + "\n")
    return frames


def test_mitos_atypia_preparation_on_a_miniature_replica(tmp_path):
    frames = _mitos_replica(tmp_path)
    out = tmp_path / "tiles"
    counts = prepare_mitos_atypia(frames, tmp_path / "scores.csv", out, tile=512, val_fraction=0.0,
                                  test_fraction=0.5, seed=0)
    data = json.loads((out / "datalist.json").read_text())
    entries = [e for s in ("training", "validation", "test") for e in data[s]]
    assert len(entries) == 4 * 3 * 2  # 1539 // 512 = 3 columns, 1376 // 512 = 2 rows per frame; partial dropped
    # score 1 has two slides: one for training, one for test; scores 2 and 3 (one slide each) stay in training
    assert counts["training"] == len(data["training"]) == 18 and len(data["test"]) == 6 and not data["validation"]
    assert {e["grade"] for e in data["test"]} == {1} and {e["grade"] for e in data["training"]} == {1, 2, 3}
    for e in entries:
        img = np.asarray(Image.open(out / e["image"]))
        mask = np.asarray(Image.open(out / e["mask"]))
        assert img.shape == (512, 512, 3) and mask.shape == (512, 512) and set(np.unique(mask)) <= {0, 255}
        assert e["label"] == e["grade"] - 1 and e["slide"] == Path(e["source"]).stem.split("_")[0]
        assert mask.mean() > 10  # the phantom nuclei were segmented
    # a slide never straddles two sections
    sections = {}
    for s in ("training", "validation", "test"):
        for e in data[s]:
            sections.setdefault(e["slide"], set()).add(s)
    assert all(len(v) == 1 for v in sections.values())
    # the tiles inherit the frame's score: a grade-3 tile has larger nuclei than a grade-1 tile
    g = {e["grade"]: e for e in entries}
    area = {k: nucleus_areas(segment_nuclei(_chw(np.asarray(Image.open(out / v["image"]))))).mean()
            for k, v in g.items()}
    assert area[3] > area[1]


def test_mitos_preparation_refuses_bad_csv_before_writing(tmp_path):
    frames = _mitos_replica(tmp_path)
    (tmp_path / "bad.csv").write_text("frame,score\nA03_00Aa,1\nA99_00Zz,2\nA04_00Aa,4\n")
    out = tmp_path / "tiles"
    with pytest.raises(BreastGenError) as e:
        prepare_mitos_atypia(frames, tmp_path / "bad.csv", out, tile=512)
    msg = str(e.value)
    assert "1 frame(s) not found" in msg and "A99_00Zz" in msg and "1 unknown score(s)" in msg and "'4'" in msg
    assert "\n" not in msg and not out.exists()
    (tmp_path / "nocol.csv").write_text("image_id,grade_text\nA03_00Aa,1\n")
    with pytest.raises(BreastGenError, match="no frame column"):
        read_scores(frames, tmp_path / "nocol.csv")


def test_folder_per_class_layout_and_empty_class_folder(tmp_path, capsys):
    root = tmp_path / "by_grade"
    for grade in (1, 2, 3):
        for j in range(3):
            tile = make_he_tile(np.random.default_rng([grade, j]), 64, grade)["image"]
            _png(root / f"grade{grade}" / f"t{j}.png", tile)
    out = tmp_path / "prepared"
    counts = prepare_class_folders(root, out, classes=["grade3", "grade1", "grade2"], val_fraction=0.34,
                                   test_fraction=0.34, segmenter=None)
    assert counts["classes"] == ["grade3", "grade1", "grade2"]
    data = json.loads((out / "datalist.json").read_text())
    entries = [e for s in ("training", "validation", "test") for e in data[s]]
    assert len(entries) == 9 and all("mask" not in e for e in entries)
    assert {e["class_name"]: e["label"] for e in entries} == {"grade3": 0, "grade1": 1, "grade2": 2}
    for s in ("training", "validation", "test"):  # every section gets every class
        assert {e["label"] for e in data[s]} == {0, 1, 2}
    (root / "grade4").mkdir()
    with pytest.raises(BreastGenError, match=r"empty class folder\(s\): grade4"):
        prepare_class_folders(root, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    # the script: one error line, exit code 2
    script = runpy.run_path(str(ROOT / "scripts" / "prepare_atypia.py"))
    with pytest.raises(SystemExit) as e:
        script["main"](["folders", "--root", str(root), "--out", str(tmp_path / "cli")])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"error: {root}: empty class folder(s): grade4 (no .png/.tif/.tiff/.jpg/.jpeg/.bmp image)"]
    assert not (tmp_path / "cli").exists()


def test_split_groups_is_stratified_and_seeded():
    groups = [f"s{i}" for i in range(30)]
    strata = [i % 3 for i in range(30)]
    a = split_groups(groups, strata, 0.2, 0.2, seed=1)
    assert a == split_groups(groups, strata, 0.2, 0.2, seed=1)
    for s in ("validation", "test"):
        assert {strata[int(g[1:])] for g, sec in a.items() if sec == s} == {0, 1, 2}
    with pytest.raises(BreastGenError, match="fractions"):
        split_groups(groups, None, 0.6, 0.5)


# ------------------------------------------------------------------------------------------------ demo model
@pytest.fixture(scope="module")
def demo(bundle_demo) -> Path:
    return bundle_demo(BUNDLE)


@pytest.fixture(scope="module")
def parser(demo, demo_data) -> ConfigParser:
    p = ConfigParser()
    p.read_config([str(CONFIGS / f) for f in ("train.json", "inference.json", "demo.json")])
    p.update({"bundle_root": str(BUNDLE), "data_dir": str(demo_data), "output_dir": str(demo)})
    return p


def test_demo_grade3_tiles_have_larger_nuclei_than_grade1_tiles(demo):
    m = json.loads((demo / "metrics.json").read_text())
    assert m["real_nucleus_area_class2"] > m["real_nucleus_area_class0"]  # the segmenter sees it on real tiles
    assert m["nucleus_area_class2"] > m["nucleus_area_class0"], m


def test_demo_mask_guided_tiles_follow_their_masks(demo):
    m = json.loads((demo / "metrics.json").read_text())
    assert m["mask_iou"] > m["mask_iou_shuffled"] + 0.1, m
    assert m["mask_dice"] > m["mask_dice_shuffled"] + 0.1, m


def test_demo_evaluation_reports_fid_and_ddim_vs_ddpm(demo):
    m = json.loads((demo / "metrics.json").read_text())
    for key in ("fid", "fid_class0", "fid_class1", "fid_class2", "ddpm_fid_compare", "ddim_fid_compare"):
        assert np.isfinite(m[key]) and m[key] > 0, key
    assert m["ddpm_steps"] == 1000 and m["ddpm_seconds_per_tile"] > m["ddim25_seconds_per_tile"]
    for f in ("classcond_samples.png", "real_samples.png", "ddim_vs_ddpm.png",
              "maskguided_mask_sample_segmentation.png"):
        assert (demo / "evaluation" / f).is_file(), f


def test_demo_inference_writes_tiles_and_a_manifest(demo):
    manifest = json.loads((demo / "generated" / "manifest.json").read_text())
    cc = [r for r in manifest if r["mode"] == "classcond"]
    mg = [r for r in manifest if r["mode"] == "maskguided"]
    assert [r["class"] for r in cc] == [0, 0, 1, 1, 2, 2] and len(mg) == 3  # demo: 2 per class, 3 test masks
    assert len({r["seed"] for r in manifest}) == len(manifest)
    for r in manifest:
        img = np.asarray(Image.open(r["file"]))
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and r["sampler"] == "ddim" and r["steps"] == 25
    assert all(Path(r["mask"]).is_file() and Path(r["mask_used"]).is_file() for r in mg)


def test_same_seed_same_tile_and_guidance_changes_the_tile(parser):
    pipe = parser.get_parsed_content("classcond_pipeline")
    a = pipe.sample([3], [2], steps=10, guidance_scale=1.0)
    b = pipe.sample([3], [2], steps=10, guidance_scale=1.0)
    c = pipe.sample([3], [2], steps=10, guidance_scale=3.0)
    d = pipe.sample([3], [0], steps=10, guidance_scale=1.0)
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, d)
    assert a.shape == (1, 3, 32, 32) and float(a.min()) >= 0 and float(a.max()) <= 1
    ab = pipe.sample([4, 3], [0, 2], steps=10, guidance_scale=1.0)  # a batch does not change a tile
    assert torch.allclose(ab[1], a, atol=1e-5)


@pytest.mark.parametrize("kwargs,needle", [
    ({"classes": [3]}, r"unknown class\(es\) \[3\]"),
    ({"sampler": "ddpm", "num_inference_steps": 50}, "DDPM sampling runs all 1000 training steps"),
    ({"sampler": "euler"}, "unknown sampler 'euler'"),
    ({"guidance_scale": -1.0}, "guidance_scale must be >= 0"),
])
def test_bad_requests_are_refused_before_any_tile(parser, tmp_path, kwargs, needle):
    args = {"classes": [0], "num_samples": 1, "sampler": "ddim", "num_inference_steps": 5, **kwargs}
    with pytest.raises(BreastGenError, match=needle):
        generate_tiles(tmp_path / "out", classcond=parser.get_parsed_content("classcond_pipeline"), **args)
    assert not (tmp_path / "out").exists()


def _run_cli(configs, demo_data, *extra):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str([str(CONFIGS / f) for f in configs]),
           "--bundle_root", str(BUNDLE), "--data_dir", str(demo_data), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV)


def test_cli_mask_with_unknown_class_values_is_one_line_and_writes_nothing(demo, demo_data, tmp_path):
    bad = np.zeros((128, 128), np.uint8)
    bad[10:20, 10:20] = 255
    bad[40:50, 40:50] = 128  # a third value: not a known class
    mask = _png(tmp_path / "bad_mask.png", bad)
    out = tmp_path / "generated"
    r = _run_cli(["train.json", "inference.json", "demo.json"], demo_data, "--output_dir", str(demo),
                 "--generated_dir", str(out), "--generate", "['maskguided']", "--masks", str([str(mask)]))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {mask}: mask has values 128 that are not known classes (mask values 0, 255 = classes 0..1)")
    assert not out.exists()


def test_mask_image_size_mismatch_is_a_one_line_error(demo_data, tmp_path):
    from breastgen.bundle import run_configs
    from breastgen.data.datalists import write_datalist

    img = _png(tmp_path / "t.png", make_he_tile(0, 64, 2)["image"])
    mask = _png(tmp_path / "m.png", np.zeros((64, 48), np.uint8))
    good = _png(tmp_path / "good.png", np.zeros((64, 64), np.uint8))
    dl = write_datalist(tmp_path / "datalist.json", {"training": [{"image": str(img), "mask": str(mask), "label": 1}],
                                                     "validation": [{"image": str(img), "mask": str(good), "label": 1}]})
    with pytest.raises(Exception) as e:
        run_configs(BUNDLE, ["train.json", "train_maskguided.json", "demo.json"],
                    {"data_dir": str(demo_data), "datalist_file": str(dl), "output_dir": str(tmp_path / "run")})
    assert _one_line(e.value) == (f"{mask}: mask size (48, 64) differs from image size (64, 64) of {img} "
                                  "(sizes are W x H)")


def test_per_class_option_reproduces_one_model_per_class(demo_data, tmp_path):
    from breastgen.bundle import run_configs

    over = {"data_dir": str(demo_data), "output_dir": str(tmp_path), "epochs": 1}
    for c in range(3):
        run_configs(BUNDLE, ["train.json", "train_classcond.json", "demo.json"], {**over, "train_class": c})
        state = torch.load(tmp_path / "models" / f"class{c}.pt", weights_only=True)
        assert set(state) == {"network", "ema"} and "class_embedding.weight" not in state["network"]
    run_configs(BUNDLE, ["train.json", "inference.json", "demo.json"],
                {**over, "per_class_models": True, "generate": ["classcond"], "num_samples": 1}, workflow_type="infer")
    manifest = json.loads((tmp_path / "generated" / "manifest.json").read_text())
    assert [r["class"] for r in manifest] == [0, 1, 2] and all(r["guidance_scale"] == 1.0 for r in manifest)
    with pytest.raises(Exception) as e:
        run_configs(BUNDLE, ["train.json", "train_classcond.json", "demo.json"], {**over, "train_class": 5})
    assert "train_class must be null or an integer 0..2" in _one_line(e.value)


def test_rerunning_training_resumes_from_the_latest_checkpoint(demo_data, tmp_path):
    from breastgen.bundle import run_configs

    over = {"data_dir": str(demo_data), "output_dir": str(tmp_path), "train_class": 0, "save_interval": 1}
    run_configs(BUNDLE, ["train.json", "train_classcond.json", "demo.json"], {**over, "epochs": 1})
    first = torch.load(tmp_path / "models" / "class0" / "class0_checkpoint_epoch=1.pt", weights_only=True)
    assert set(first) == {"network", "ema", "optimizer", "lr_scheduler", "trainer"}
    assert first["ema"]["_ema_num_updates"] == first["trainer"]["iteration"] > 0
    run_configs(BUNDLE, ["train.json", "train_classcond.json", "demo.json"], {**over, "epochs": 2})
    second = torch.load(tmp_path / "models" / "class0" / "class0_checkpoint_epoch=2.pt", weights_only=True)
    assert second["trainer"]["epoch"] == 2 and second["trainer"]["iteration"] == 2 * first["trainer"]["iteration"]
    assert second["ema"]["_ema_num_updates"] == second["trainer"]["iteration"]  # continued, not restarted
    assert second["lr_scheduler"]["last_epoch"] == second["trainer"]["iteration"]


def test_multi_gpu_overlay_trains_with_torchrun_on_cpu(demo_data, tmp_path):
    r = run_bundle_cli(BUNDLE, ["train.json", "train_maskguided.json", "demo.json", "multi_gpu_train.json"],
                       "--data_dir", str(demo_data), "--output_dir", str(tmp_path), "--epochs", "1", nproc=2,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(tmp_path / "models" / "maskguided.pt", weights_only=True)
    assert set(state) == {"network", "ema"} and state["network"]["conv_in.conv.weight"].shape[1] == 3 + 2


def test_synthetic_fraction_experiment_end_to_end(demo, demo_data, tmp_path):
    exp = runpy.run_path(str(ROOT / "scripts" / "synthetic_fraction_experiment.py"))
    out = tmp_path / "fraction"
    result = exp["main"](["--data", str(demo_data / "histo" / "atypia" / "datalist.json"), "--out", str(out),
                          "--preset", "demo", "--generator", str(demo / "models" / "classcond.pt"),
                          "--fractions", "0", "50", "--seeds", "0", "1", "--iterations", "20", "--bootstrap", "50"])
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["k"], r["seed"]) for r in rows] == [("0", "0"), ("0", "1"), ("50", "0"), ("50", "1")]
    assert {r["n_synthetic"] for r in rows} == {"0", "60"} and all(r["n_real"] == "60" for r in rows)
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [t["k"] for t in table] == ["0", "50"]
    for t in table:
        for m in ("accuracy", "macro_f1"):
            assert 0 <= float(t[f"{m}_mean"]) <= 1 and np.isfinite(float(t[f"{m}_ci95"]))
    png = np.asarray(Image.open(out / "fraction.png"))
    assert png.ndim == 3 and png.shape[1] > png.shape[0]
    assert result["pool"] >= 60 and (out / "experiment.json").is_file()
