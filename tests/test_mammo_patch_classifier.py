"""mammo_patch_classifier: patch extraction (CBIS-DDSM / mini-MIAS / datalist replicas), classifiers, metrics,
the four-arm augmentation experiment, the bundle demo and its DDP overlay."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from breastgen.data.patches import (CLASSES, PatchSpec, balanced_sampler, cases_from_datalist, extract_cases,
                                    find_patches, lesion_label, window_starts, window_sums)
from breastgen.data.phantoms import make_mammogram
from breastgen.data.readers import load_image
from breastgen.errors import BreastGenError
from breastgen.io.dicom import write_mg_dicom
from breastgen.networks.classifiers import (ShallowCNN, classification_metrics, evaluate_predictions, load_pretrained,
                                            resnet50_classifier)
from conftest import ROOT, run_bundle_cli

BUNDLE = ROOT / "bundles" / "mammo_patch_classifier"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------ windows
def test_windows_labels_follow_roi_overlap_and_breast_fraction():
    breast = np.zeros((128, 96), bool)
    breast[:, :] = True
    breast[96:, :] = False  # x >= 96 is background
    roi = np.zeros_like(breast)
    roi[40:50, 40:50] = True  # 100 px lesion
    spec = PatchSpec(size=32, stride=16, min_breast=0.75, min_lesion_overlap=0.5)
    found = find_patches(breast, [(roi, "malignant")], spec)
    assert list(window_starts(128, 32, 16)) == [0, 16, 32, 48, 64, 80, 96]
    by_pos = {(f["x0"], f["y0"]): f for f in found}
    assert all(f["x0"] + 32 <= 96 + 8 for f in found)  # windows mostly off the breast are dropped
    assert by_pos[(32, 32)]["label"] == "malignant"  # holds the whole ROI
    assert by_pos[(0, 0)]["label"] == "normal"  # touches no ROI
    # windows holding a sliver of the ROI (< 50 %) are neither normal nor lesion
    assert (48, 16) not in by_pos or by_pos[(48, 16)]["label"] == "malignant"
    for (x0, y0), f in by_pos.items():
        overlap = roi[x0:x0 + 32, y0:y0 + 32].sum()
        assert (f["label"] == "normal") == (overlap == 0)
        if f["label"] != "normal":
            assert overlap >= 50


def test_block_window_sums_match_the_summed_area_table():
    rng = np.random.default_rng(0)
    mask = rng.random((301, 257)) > 0.7
    for size, stride in ((64, 32), (64, 16), (48, 24), (50, 20)):
        xs, ys = window_starts(301, size, stride), window_starts(257, size, stride)
        fast = window_sums(mask, xs, ys, size, stride)
        slow = window_sums(mask, xs, ys, size)
        ref = np.array([[mask[x:x + size, y:y + size].sum() for y in ys] for x in xs])
        assert np.array_equal(fast, ref) and np.array_equal(slow, ref)


def test_unknown_pathology_is_one_line():
    assert lesion_label("BENIGN_WITHOUT_CALLBACK") == "benign"
    assert lesion_label(" MALIGNANT\n") == "malignant"
    with pytest.raises(BreastGenError, match=r"unknown pathology 'MAYBE'; allowed: MALIGNANT, BENIGN, BENIGN_WITH"):
        lesion_label("MAYBE")


# ------------------------------------------------------------------------------------------------ CBIS-DDSM
def _phantom(seed: int, lesion: str | None):
    return make_mammogram(seed, (256, 208), lesion=lesion, density="B")


def _cbis_case(root: Path, name: str, m, swap: bool = False, roi_missing: bool = False, crop_only: bool = False):
    """Write a CBIS-DDSM-like case: <name>/<uid>/<uid>/000000.dcm (image), <name>_1/<uid>/<uid>/00000{0,1}.dcm
    (crop and ROI mask). Returns the CSV paths (with CBIS's stray newline)."""
    img_rel = f"{name}/1.3.6.1.4.1.9590.100.1.2.{abs(hash(name)) % 10**8}/1.3.6.1.4.1.9590.100.1.2.7/000000.dcm"
    write_mg_dicom(root / img_rel, m.image, laterality="L", view="CC", manufacturer="LUMISYS", synthetic=True)
    x0, y0, x1, y1 = m.bbox
    crop_rel = f"{name}_1/1.3.6.1.4.1.9590.100.1.2.55/1.3.6.1.4.1.9590.100.1.2.56/000000.dcm"
    roi_rel = f"{name}_1/1.3.6.1.4.1.9590.100.1.2.55/1.3.6.1.4.1.9590.100.1.2.56/000001.dcm"
    if not roi_missing:  # roi_missing: neither file exists (nor their folder)
        write_mg_dicom(root / crop_rel, m.image[max(0, y0 - 8):y1 + 8, max(0, x0 - 8):x1 + 8], laterality="L",
                       view="CC", manufacturer="LUMISYS", synthetic=True)
    if not roi_missing and not crop_only:
        write_mg_dicom(root / roi_rel, m.lesion_mask.astype(np.uint16) * 255, laterality="L", view="CC",
                       manufacturer="LUMISYS", synthetic=True, bits_stored=16)
    if swap:
        roi_rel, crop_rel = crop_rel, roi_rel
    return img_rel + "\n", roi_rel + "\n", crop_rel + "\r\n"


def _write_cbis(tmp_path: Path):
    root = tmp_path / "CBIS-DDSM"
    rows = []
    specs = [("Mass-Training_P_00001_LEFT_CC", 1, "malignant", "MALIGNANT", {}),
             ("Mass-Training_P_00002_LEFT_CC", 2, "benign", "BENIGN_WITHOUT_CALLBACK", {"swap": True}),
             ("Mass-Training_P_00003_LEFT_CC", 3, "benign", "BENIGN", {"roi_missing": True}),
             ("Mass-Training_P_00004_LEFT_CC", 4, "malignant", "MAYBE", {}),
             ("Mass-Training_P_00005_LEFT_CC", 5, "malignant", "MALIGNANT", {"crop_only": True}),
             ("Mass-Training_P_00006_LEFT_CC", 6, "benign", "BENIGN", {})]
    for name, seed, lesion, pathology, kw in specs:
        img, roi, crop = _cbis_case(root, name, _phantom(seed, lesion), **kw)
        rows.append({"patient_id": name.split("_", 1)[1][:7], "breast_density": 2, "left or right breast": "LEFT",
                     "image view": "CC", "abnormality id": 1, "abnormality type": "mass", "mass shape": "OVAL",
                     "mass margins": "CIRCUMSCRIBED", "assessment": 4, "pathology": pathology, "subtlety": 4,
                     "image file path": img, "cropped image file path": crop, "ROI mask file path": roi})
    csv_file = tmp_path / "mass_case_description_train_set.csv"
    with open(csv_file, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return csv_file, root


def test_extract_cbis_ddsm_replica_handles_swaps_newlines_and_skips_bad_cases(tmp_path, capsys):
    csv_file, root = _write_cbis(tmp_path)
    out = tmp_path / "patches"
    summary = _script("extract_patches").main(["--cbis-csv", str(csv_file), "--cbis-root", str(root), "--out", str(out),
                                               "--size", "64", "--stride", "32", "--val-fraction", "0"])
    captured = capsys.readouterr()
    err, stdout = captured.err, captured.out
    skipped = {s["case"]: s["reason"] for s in summary["skipped"]}
    assert set(skipped) == {"Mass-Training_P_00003_LEFT_CC", "Mass-Training_P_00004_LEFT_CC",
                            "Mass-Training_P_00005_LEFT_CC"}, skipped
    assert "ROI mask file not found" in skipped["Mass-Training_P_00003_LEFT_CC"]
    assert "unknown pathology 'MAYBE'" in skipped["Mass-Training_P_00004_LEFT_CC"]
    assert "no ROI mask among" in skipped["Mass-Training_P_00005_LEFT_CC"]
    assert all("\n" not in r for r in skipped.values())  # one line each
    assert "skipped 3 of 6 images: " in stdout
    assert sum(line.startswith("skipped Mass-Training_P_0000") for line in err.splitlines()) == 3
    data = json.loads((out / "datalist.json").read_text())
    labels = {e["label"] for e in data["training"]}
    assert labels == {"normal", "benign", "malignant"}
    # the swapped case (ROI path -> crop file) was resolved by content: its lesion patches carry its lesion
    swapped = [e for e in data["training"] if "P_00002" in e["image"] and e["label"] != "normal"]
    assert swapped and all(e["label"] == "benign" for e in swapped)  # BENIGN_WITHOUT_CALLBACK -> benign
    for e in data["training"]:
        if e["label"] != "normal":
            assert load_image(out / e["mask"], modalities=None, allow_constant=True)[0].any()


def test_extract_cbis_all_bad_exits_with_one_line(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    csv_file = tmp_path / "calc_case_description_test_set.csv"
    csv_file.write_text("patient_id,pathology,image file path,ROI mask file path,cropped image file path\n"
                        "P_1,BENIGN,\"Calc-Test_P_1_LEFT_CC/a/b/000000.dcm\n\",\"x/000001.dcm\n\",\"x/000000.dcm\n\"\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "extract_patches.py"), "--cbis-csv", str(csv_file),
                        "--cbis-root", str(root), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no patches extracted from 1 case(s): every case was skipped" in last
    assert "image file not found: Calc-Test_P_1_LEFT_CC/a/b/000000.dcm" in r.stderr
    assert not (tmp_path / "o" / "datalist.json").exists()


# ------------------------------------------------------------------------------------------------ mini-MIAS
def test_extract_mini_mias_replica_measures_y_from_the_bottom(tmp_path):
    folder = tmp_path / "mias"
    folder.mkdir()
    lines = ["Reference list (mini-MIAS style)"]
    centres = {}
    for k, (ref, lesion) in enumerate((("mdb001", "benign"), ("mdb002", None), ("mdb003", "malignant"),
                                       ("mdb004", "benign"))):
        m = _phantom(10 + k, lesion)
        Image.fromarray((m.image / 256).astype(np.uint8)).save(folder / f"{ref}.pgm")
        if ref == "mdb001":
            x0, y0, x1, y1 = m.bbox
            cx, cy_row = (x0 + x1) / 2, (y0 + y1) / 2
            centres[ref] = (cx, cy_row)
            lines.append(f"{ref} G CIRC B {cx:.0f} {256 - 1 - cy_row:.0f} {max(x1 - x0, y1 - y0) / 2:.0f}")
        elif ref == "mdb002":
            lines.append(f"{ref} F NORM")
        elif ref == "mdb003":
            lines.append(f"{ref} D SPIC M")  # no coordinates: skipped
        else:
            lines.append(f"{ref} G CIRC X 50 50 5")  # unknown severity: skipped
    info = folder / "Info.txt"
    info.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    summary = _script("extract_patches").main(["--mias", str(info), "--out", str(out), "--size", "48", "--stride", "8"])
    reasons = {s["case"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"mdb003", "mdb004"}
    assert "without centre x, y and radius" in reasons["mdb003"] and "unknown severity 'X'" in reasons["mdb004"]
    data = json.loads((out / "datalist.json").read_text())
    entries = [e for s in data.values() for e in s]
    lesion = [e for e in entries if e["label"] == "benign"]
    assert lesion and {e["label"] for e in entries if "mdb002" in e["image"]} == {"normal"}
    cx, cy = centres["mdb001"]
    for e in lesion:  # every lesion patch holds the lesion centre: y was flipped from the bottom
        x0, y0, x1, y1 = e["box"]
        assert x0 - 3 <= cx <= x1 + 3 and y0 - 3 <= cy <= y1 + 3, (e["box"], centres)


# ------------------------------------------------------------------------------------------------ datalist
def test_extract_from_datalist_labels_by_overlap(demo_data, tmp_path):
    summary = extract_cases(cases_from_datalist(demo_data / "mammo" / "datalist.json"), tmp_path,
                            PatchSpec(64, 32))
    assert not summary["skipped"]
    counts = summary["counts"]["training"]
    assert all(counts[c] > 0 for c in CLASSES), counts
    data = json.loads((tmp_path / "datalist.json").read_text())
    src_masks = {}
    for e in data["training"][:200]:
        src = Path(e["source"])
        if src.stem not in src_masks:
            mask_file = demo_data / "mammo" / "masks" / f"{src.stem}.png"
            src_masks[src.stem] = (load_image(mask_file)[0] > 0) if mask_file.is_file() else None
        m = src_masks[src.stem]
        x0, y0, x1, y1 = e["box"]
        overlap = 0 if m is None else int(m[x0:x1, y0:y1].sum())
        assert (e["label"] == "normal") == (overlap == 0)
        patch = load_image(tmp_path / e["image"], modalities=None)[0]
        assert patch.shape == (64, 64) and patch.dtype == np.uint16
        assert e["breast_fraction"] >= 0.75


def test_extract_skips_roi_off_the_breast(tmp_path):
    m = _phantom(3, "benign")
    img = tmp_path / "a.png"
    Image.fromarray(m.image).save(img)
    off = np.zeros_like(m.lesion_mask)
    off[5:15, -15:-5] = True  # top right corner: background of a left breast
    Image.fromarray(off.astype(np.uint8) * 255).save(tmp_path / "a_mask.png")
    good = tmp_path / "b.png"
    Image.fromarray(m.image).save(good)
    (tmp_path / "dl.json").write_text(json.dumps({"training": [
        {"image": "a.png", "mask": "a_mask.png", "label": "benign"},
        {"image": "b.png", "label": "normal"},
        {"image": "c.png", "label": "normal"},
        {"image": "b.png", "label": "cancer"}]}))
    summary = extract_cases(cases_from_datalist(tmp_path / "dl.json"), tmp_path / "out", PatchSpec(64, 32))
    reasons = [s["reason"] for s in summary["skipped"]]
    assert any("ROI 1 (benign) touches no breast tissue" in r for r in reasons), reasons
    assert any("file not found" in r and "c.png" in r for r in reasons), reasons
    assert any("unknown label 'cancer'" in r for r in reasons), reasons
    assert summary["n_patches"] > 0


# ------------------------------------------------------------------------------------------------ networks
def test_resnet50_loads_local_imagenet_style_weights(tmp_path):
    from monai.networks.nets import resnet50

    ref = resnet50(spatial_dims=2, n_input_channels=3, num_classes=1000, conv1_t_stride=2, bias_downsample=False)
    torch.save(ref.state_dict(), tmp_path / "resnet50_imagenet.pt")
    net = resnet50_classifier(num_classes=2, pretrained_path=tmp_path / "resnet50_imagenet.pt")
    sd = net.state_dict()
    assert torch.equal(sd["layer3.2.conv2.weight"], ref.state_dict()["layer3.2.conv2.weight"])
    assert sd["fc.weight"].shape == (2, 2048)
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 2)
    torch.save({"foo": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(BreastGenError, match="pretrained weights do not fit the network: only 0 of"):
        load_pretrained(resnet50_classifier(num_classes=2), tmp_path / "bad.pt")
    with pytest.raises(BreastGenError, match="checkpoint not found"):
        resnet50_classifier(pretrained_path=tmp_path / "missing.pt")


def test_shallow_cnn_and_metrics():
    net = ShallowCNN(num_classes=2)
    assert net(torch.rand(3, 3, 224, 224)).shape == (3, 2) and net(torch.rand(3, 3, 64, 64)).shape == (3, 2)
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    dense = [m for m in net.classifier if isinstance(m, torch.nn.Linear)]
    assert len(convs) == 3 and len(dense) == 3
    y = [0, 0, 1, 1, 1]
    p = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2], [0.1, 0.9]])
    m = classification_metrics(y, p, ["non-malignant", "malignant"])
    assert m["accuracy"] == pytest.approx(0.6) and m["recall"] == pytest.approx(2 / 3)
    assert m["auc"] == pytest.approx(5 / 6) and m["confusion_matrix"] == [[1, 1], [1, 2]]


def test_balanced_sampler_equalises_classes():
    entries = [{"label": "normal"}] * 90 + [{"label": "malignant"}] * 10
    idx = list(balanced_sampler(entries, num_samples=4000, seed=1))
    share = np.mean([entries[i]["label"] == "malignant" for i in idx])
    assert 0.45 < share < 0.55


def test_traditional_augmentation_is_monai_flip_rotate_zoom():
    from monai.bundle import ConfigParser
    from monai.transforms import RandFlipd, RandRotated, RandZoomd

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    aug = parser.get_parsed_content("augmentation")
    kinds = {type(t): t for t in aug}
    assert set(kinds) == {RandFlipd, RandRotated, RandZoomd}
    assert kinds[RandFlipd].flipper.spatial_axis == 0  # horizontal flip: MONAI axis 0 is x
    rot = kinds[RandRotated].rand_rotate
    assert rot.range_x == pytest.approx((-np.radians(30), np.radians(30)))
    assert tuple(kinds[RandZoomd].rand_zoom.min_zoom) == (0.75,) and tuple(kinds[RandZoomd].rand_zoom.max_zoom) == (1.25,)
    assert parser.get_parsed_content("lr") == pytest.approx(1e-5) and parser.get_parsed_content("batch_size") == 32
    assert parser.get_parsed_content("max_epochs") == 50 and parser.get_parsed_content("input_size") == 224


def test_evaluate_rejects_unknown_labels(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([{"image": "a", "label": "cancer", "probs": [0.5, 0.5]}]))
    with pytest.raises(BreastGenError, match=r"labels \['cancer'\] are not in class_map"):
        evaluate_predictions(tmp_path / "p.json", {"normal": 0, "benign": 0, "malignant": 1}, ["n", "m"])


# ------------------------------------------------------------------------------------------------ bundle
def test_demo_writes_classification_metrics(bundle_demo):
    out = bundle_demo(BUNDLE)
    metrics = json.loads((out / "metrics.json").read_text())
    for k in ("accuracy", "recall", "auc", "specificity", "confusion_matrix", "cm_malignant_malignant"):
        assert k in metrics
    cm = json.loads(metrics["confusion_matrix"])
    assert sum(map(sum, cm)) == metrics["n"] and 0 <= metrics["accuracy"] <= 1
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == metrics["n"] and all(abs(sum(p["probs"]) - 1) < 1e-4 for p in preds)
    assert (out / "roc.png").is_file() and (out / "samples_by_score.png").is_file()
    assert list((out / "models").glob("checkpoint_epoch=*.pt")) and (out / "models" / "model.pt").is_file()


def test_augmentation_experiment_one_command_writes_four_row_table(demo_data, tmp_path):
    out = tmp_path / "exp"
    _script("augmentation_experiment").main([
        "--data", str(demo_data / "mammo" / "datalist.json"), "--out", str(out), "--preset", "demo",
        "--seeds", "0", "1", "--epochs", "1", "--input-size", "32", "--cigan-epochs", "1", "--cigan-warmup", "5",
        "--synthetic-max", "48"])
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["label"] for r in table] == ["Shallow CNN", "ResNet-50", "ResNet-50 + traditional aug.",
                                           "ResNet-50 + traditional aug. + ciGAN images"]
    for r in table:
        assert r["n_seeds"] == "2"
        for k in ("accuracy", "recall", "auc"):
            assert r[f"{k}_mean"] != "" and r[f"{k}_ci95"] != ""
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 8
    assert {r["n_synthetic"] for r in runs if r["arm"] == "resnet50_aug_cigan"} == {"48"}
    md = (out / "results.md").read_text().splitlines()
    assert sum(line.startswith("| ") and "---" not in line for line in md) == 5  # header + 4 rows
    assert (out / "roc.png").is_file()
    syn = json.loads((out / "cigan" / "synthetic" / "datalist.json").read_text())["training"]
    assert len(syn) == 48 and {e["label"] for e in syn} == {"malignant"}


@pytest.mark.slow
def test_multi_gpu_overlay_runs_with_torchrun_gloo(bundle_demo, tmp_path):
    demo_out = bundle_demo(BUNDLE)
    cfg = BUNDLE / "configs"
    r = run_bundle_cli(BUNDLE, ["train.json", "demo.json", "multi_gpu_train.json"],
                       "--meta_file", str(cfg / "metadata.json"), "--logging_file", str(cfg / "logging.conf"),
                       "--output_dir", str(tmp_path / "ddp"),
                       "--patch_datalist", str(demo_out / "work" / "patches" / "datalist.json"),
                       "--max_epochs", "1", "--trainer#epoch_length", "2", "--input_size", "32", nproc=2, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "ddp" / "models" / "model.pt").is_file()
