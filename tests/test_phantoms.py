"""Phantoms (breastgen.data.phantoms), DICOM writers (breastgen.io.dicom) and scripts/make_demo_data.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from skimage.color import rgb2hed
from skimage.measure import label, regionprops

from breastgen.data.phantoms import (AREAS, DENSITIES, HER2_SCORES, make_benign_malignant_tile, make_he_tile,
                                     make_ihc_pair, make_mammogram)
from breastgen.errors import BreastGenError
from breastgen.io.dicom import (MG_FOR_PRESENTATION, SECONDARY_CAPTURE, SYNTHETIC_MARK, write_mg_dicom,
                                write_synthetic_dicom)

ROOT = Path(__file__).resolve().parents[1]


def _bbox(mask: np.ndarray) -> list[int]:
    rows, cols = np.nonzero(mask)
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def _mean_nucleus_area(mask: np.ndarray) -> float:
    return float(np.mean([r.area for r in regionprops(label(mask > 0))]))


# ------------------------------------------------------------------------------------------------ mammograms
def test_mammogram_is_deterministic():
    kw = dict(view="MLO", laterality="R", density="C", vendor="hologic", lesion="malignant", breast_area="medium")
    a, b = make_mammogram(7, **kw), make_mammogram(np.random.default_rng(7), **kw)
    for name in ("image", "breast_mask", "lesion_mask", "pectoral_mask", "dense_mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.meta() == b.meta()
    assert not np.array_equal(a.image, make_mammogram(8, **kw).image)
    assert a.image.dtype == np.uint16 and a.image.shape == (256, 208)


@pytest.mark.parametrize("view", ["CC", "MLO"])
@pytest.mark.parametrize("area", AREAS)
def test_breast_area_lands_in_class(view, area):
    for seed in range(3):
        m = make_mammogram(seed, (200, 160) if seed == 2 else (256, 208), view=view, breast_area=area)
        fraction = m.breast_mask.mean()
        assert m.area == area and fraction == pytest.approx(m.area_fraction)
        assert {"small": fraction < 0.4, "medium": 0.4 <= fraction <= 0.6, "big": fraction > 0.6}[area]


def test_laterality_convention_and_background():
    left = make_mammogram(3, laterality="L", breast_area="small")
    right = make_mammogram(3, laterality="R", breast_area="small")
    np.testing.assert_array_equal(right.image, left.image[:, ::-1])
    assert left.breast_mask[:, 0].sum() > 0 and left.breast_mask[:, -1].sum() == 0  # chest wall on the left
    background = left.image[~left.breast_mask]
    assert np.median(background) < 0.01 * left.image.max() and background.max() > 0  # near 0, slight noise


def test_vendors_use_different_ranges():
    siemens = make_mammogram(1, vendor="siemens", density="D").image
    hologic = make_mammogram(1, vendor="hologic", density="D").image
    assert 30000 < siemens.max() <= 65535 and 2000 < hologic.max() < 4096


def test_mlo_pectoral_is_brighter_than_cc_there():
    for laterality in ("L", "R"):
        mlo = make_mammogram(5, view="MLO", laterality=laterality, density="D", breast_area="big")
        cc = make_mammogram(5, view="CC", laterality=laterality, density="D", breast_area="big")
        region = mlo.pectoral_mask
        corner = (0, 0) if laterality == "L" else (0, -1)
        assert region[corner] and region.mean() > 0.03 and not cc.pectoral_mask.any()
        assert mlo.image[region].mean() > 1.15 * cc.image[region].mean()
        assert mlo.image[region].mean() > mlo.image[mlo.breast_mask & ~region].mean()


def test_density_increases_fibroglandular_fraction():
    for seed in range(2):
        ms = [make_mammogram(seed, density=d, breast_area="medium") for d in DENSITIES]
        fractions = [m.dense_fraction for m in ms]
        assert fractions == sorted(fractions) and fractions[-1] - fractions[0] > 0.6
        assert all((ms[i].dense_mask <= ms[i + 1].dense_mask).all() for i in range(3))
        brightness = [m.image[m.breast_mask].mean() for m in ms]
        assert brightness == sorted(brightness)


@pytest.mark.parametrize("lesion", ["benign", "malignant"])
def test_lesion_inside_breast_with_matching_bbox(lesion):
    for seed, (view, laterality) in enumerate([("CC", "L"), ("MLO", "R"), ("MLO", "L")]):
        m = make_mammogram(seed, view=view, laterality=laterality, lesion=lesion, breast_area="small")
        assert m.lesion_mask.any() and m.label == lesion
        assert (m.lesion_mask <= (m.breast_mask & ~m.pectoral_mask)).all()
        assert m.bbox == _bbox(m.lesion_mask)
    normal = make_mammogram(0)
    assert normal.bbox is None and not normal.lesion_mask.any() and normal.label == "normal"


def test_bad_attribute_is_a_user_error():
    with pytest.raises(BreastGenError, match="density"):
        make_mammogram(0, density="E")
    with pytest.raises(BreastGenError, match="grade"):
        make_he_tile(0, grade=4)


# ------------------------------------------------------------------------------------------------ histology
def test_he_tiles_nucleus_area_grows_with_grade():
    for seed in range(2):
        tiles = [make_he_tile(seed, 128, grade) for grade in (1, 2, 3)]
        for t, g in zip(tiles, (1, 2, 3)):
            assert t["image"].shape == (128, 128, 3) and t["image"].dtype == np.uint8 and t["grade"] == g
            assert set(np.unique(t["nuclei_mask"])) <= {0, 1}
        areas = [_mean_nucleus_area(t["nuclei_mask"]) for t in tiles]
        assert areas[0] < areas[1] < areas[2]
    np.testing.assert_array_equal(make_he_tile(4, 128, 2)["image"], make_he_tile(4, 128, 2)["image"])
    # H&E colours: nuclei carry more haematoxylin than the pink stroma
    t = tiles[2]
    hed = rgb2hed(t["image"])
    assert hed[..., 0][t["nuclei_mask"] > 0].mean() > hed[..., 0][t["nuclei_mask"] == 0].mean() + 0.02


def test_ihc_dab_grows_with_her2_score():
    pairs = [make_ihc_pair(2, 128, score) for score in HER2_SCORES]
    dab = [rgb2hed(p["ihc"])[..., 2].mean() for p in pairs]
    assert dab == sorted(dab) and dab[-1] - dab[0] > 0.01
    assert pairs[0]["membrane_mask"].sum() < pairs[-1]["membrane_mask"].sum()
    for p in pairs[1:]:  # same tissue layout whatever the score
        np.testing.assert_array_equal(p["he"], pairs[0]["he"])
        np.testing.assert_array_equal(p["nuclei_mask"], pairs[0]["nuclei_mask"])


def test_benign_and_malignant_tiles_differ():
    benign = [make_benign_malignant_tile(s, 128, "benign") for s in range(2)]
    malignant = [make_benign_malignant_tile(s, 128, "malignant") for s in range(2)]
    assert max(_mean_nucleus_area(t["nuclei_mask"]) for t in benign) < \
        min(_mean_nucleus_area(t["nuclei_mask"]) for t in malignant)
    assert all(t["label"] == "benign" for t in benign) and malignant[0]["image"].shape == (128, 128, 3)


# ------------------------------------------------------------------------------------------------ DICOM
def test_write_mg_dicom_round_trip(tmp_path):
    m = make_mammogram(0, vendor="hologic", view="MLO", laterality="R")
    path = write_mg_dicom(tmp_path / "mg.dcm", m.image, laterality="R", view="MLO", manufacturer="HOLOGIC, Inc.",
                          pixel_spacing_mm=(0.07, 0.065), synthetic=False, window=(2000, 3000), bits_stored=12)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == MG_FOR_PRESENTATION and ds.Modality == "MG"
    assert (ds.ImageLaterality, ds.Laterality, ds.ViewPosition) == ("R", "R", "MLO")
    assert ds.ViewCodeSequence[0].CodeMeaning == "medio-lateral oblique" and list(ds.PatientOrientation) == ["P", "F"]
    assert ds.Manufacturer == "HOLOGIC, Inc." and ds.BodyPartExamined == "BREAST"
    assert [float(v) for v in ds.PixelSpacing] == [0.07, 0.065] == [float(v) for v in ds.ImagerPixelSpacing]
    assert ds.PresentationIntentType == "FOR PRESENTATION" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY"]
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (256, 208, 16, 12, 0)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (2000, 3000)
    assert ds.pixel_array.dtype == np.uint16
    np.testing.assert_array_equal(ds.pixel_array, m.image)
    other = pydicom.dcmread(write_mg_dicom(tmp_path / "b.dcm", m.image, laterality="R", view="MLO",
                                           manufacturer="x", synthetic=False))
    assert other.StudyInstanceUID != ds.StudyInstanceUID and other.SOPInstanceUID != ds.SOPInstanceUID
    with pytest.raises(BreastGenError, match="bits"):
        write_mg_dicom(tmp_path / "c.dcm", np.full((4, 4), 5000, np.uint16), laterality="L", view="CC",
                       manufacturer="x", synthetic=False, bits_stored=12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.dcm", "mg.dcm"]  # atomic: no temporary left over


def test_synthetic_dicom_has_no_patient_data(tmp_path):
    params = {"prompt": "a siemens mammogram in CC view with high density", "seed": 42, "sampler": "ddim",
              "steps": 50, "guidance": 7.5}
    source = {"laterality": "L", "view": "CC", "manufacturer": "SIEMENS", "modality": "MG",
              "PatientName": "DOE^JANE", "PatientID": "123456", "PatientBirthDate": "19600101"}
    image = np.linspace(0, 1, 64 * 48).reshape(64, 48)
    path = write_synthetic_dicom(tmp_path / "syn.dcm", image, source_meta=source, description="demo sample",
                                 params=params)
    raw = path.read_bytes()
    assert b"DOE" not in raw and b"123456" not in raw and b"19600101" not in raw
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == MG_FOR_PRESENTATION and (ds.ImageLaterality, ds.ViewPosition) == ("L", "CC")
    assert ds.Manufacturer == "SIEMENS" and ds.PatientName == "SYNTHETIC" and ds.PatientID == "SYNTHETIC"
    assert ds.PatientBirthDate == "" and ds.PatientSex == ""
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.BurnedInAnnotation == "NO"
    assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
    assert ds.ImageComments.startswith(SYNTHETIC_MARK) and SYNTHETIC_MARK in ds.DerivationDescription
    assert json.loads(ds.ImageComments.split("params=", 1)[1]) == params
    assert ds.pixel_array.max() == 65535 and ds.pixel_array[0, 0] == 0
    # no source: a Secondary Capture of a synthetic image; oversized params are cut to the LT limit
    ds = pydicom.dcmread(write_synthetic_dicom(tmp_path / "sc.dcm", np.zeros((8, 8), np.uint16),
                                               params={"prompt": "x" * 20000}))
    assert ds.SOPClassUID == SECONDARY_CAPTURE and ds.ConversionType == "SYN"
    assert len(ds.ImageComments) <= 10240 and ds.ImageComments.endswith("[truncated]")


# ------------------------------------------------------------------------------------------------ demo data
def test_make_demo_data_small(tmp_path):
    out = tmp_path / "demo"
    stale = out / "mammo" / "png" / "mg999.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    (stale.parent / "notes.txt").write_text("not ours")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--out", str(out), "--small"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.strip().splitlines()) == 1 and "phantoms" in run.stdout
    assert not stale.exists() and (stale.parent / "notes.txt").exists()
    assert "not real images" in (out / "README.md").read_text()
    datalists = sorted(out.rglob("datalist.json"))
    assert {p.parent.name for p in datalists} == {"mammo", "atypia", "bci", "breakhis_like"}
    for dl in datalists:
        data = json.loads(dl.read_text())
        assert set(data) == {"training", "validation", "test"} and data["training"]
        for entry in (e for section in data.values() for e in section):
            for key in ("image", "tiff", "png", "mask", "pair"):
                if key in entry:
                    assert (dl.parent / entry[key]).is_file(), (dl, entry[key])
    mammo = json.loads((out / "mammo" / "datalist.json").read_text())
    entries = [e for section in mammo.values() for e in section]
    assert {e["label"] for e in entries} == {"normal", "benign", "malignant"}
    assert {e["area"] for e in entries} == set(AREAS) and {e["vendor"] for e in entries} == {"siemens", "hologic"}
    lesion = next(e for e in entries if "mask" in e)
    mask = np.asarray(Image.open(out / "mammo" / lesion["mask"])) > 0
    assert lesion["bbox"] == _bbox(mask)
    ds = pydicom.dcmread(out / "mammo" / lesion["image"])
    png = np.asarray(Image.open(out / "mammo" / lesion["png"]))
    np.testing.assert_array_equal(ds.pixel_array, png)
    assert ds.ImageLaterality == lesion["laterality"] and ds.ViewPosition == lesion["view"]
    names = sorted(p.name for p in (out / "histo" / "bci" / "HE" / "train").iterdir())
    assert names == sorted(p.name for p in (out / "histo" / "bci" / "IHC" / "train").iterdir())
    assert all(re.fullmatch(r"\d{5}_train_(0|1\+|2\+|3\+)\.png", n) for n in names)
    assert {n.split("_")[-1][:-4] for n in names} == set(HER2_SCORES)
