"""Data preparation for the mammography bundles: VinDr-Mammo and generic CSV layouts on miniature replicas."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from breastgen.data.datalists import load_datalist
from breastgen.data.phantoms import make_mammogram
from breastgen.data.prepare import Record, breast_area_ratio, patient_split, prepare_datalist
from breastgen.data.transforms import FlipToLaterality, ResizeToSquare
from breastgen.errors import BreastGenError
from breastgen.io.dicom import write_mg_dicom
from breastgen.prompts import area_class, density_word, parse_prompt

ROOT = Path(__file__).resolve().parents[1]
SIZE = (128, 104)
MANUFACTURER = {"siemens": "SIEMENS", "hologic": "HOLOGIC, Inc."}
AREAS = ("small", "medium", "big")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vindr = _script("prepare_vindr")
generic = _script("prepare_mammo_csv")


def _phantom_dicom(path: Path, seed: int, view: str, lat: str, density: str = "B", lesion: str | None = None,
                   vendor: str | None = None, **extra):
    vendor = vendor or ("siemens", "hologic")[seed % 2]
    m = make_mammogram(seed, SIZE, view=view, laterality=lat, density=density, vendor=vendor, lesion=lesion,
                       breast_area=AREAS[seed % 3])
    write_mg_dicom(path, m.image, laterality=lat, view=view, manufacturer=MANUFACTURER[vendor], synthetic=True,
                   bits_stored=m.bits_stored, extra=extra or None)
    return m


def _true_area(m) -> tuple[float, str]:
    """The phantom's true breast fraction in the square the bundle trains on (flipped to L, 512 crop)."""
    t = MetaTensor(torch.from_numpy(m.breast_mask.T.astype(np.float32))[None])
    t = FlipToLaterality("L")(t, laterality=m.laterality)
    ratio = float((ResizeToSquare(512, "crop", mode="nearest-exact", anchor_x="start")(t) > 0.5).float().mean())
    return ratio, area_class(ratio)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _sections(out: Path) -> dict[str, list[dict]]:
    return {s: load_datalist(out / "datalist.json", s) for s in ("training", "validation", "test")}


def _skipped(out: Path) -> dict[str, str]:
    with open(out / "skipped.csv", newline="") as f:
        return {r["id"]: r["reason"] for r in csv.DictReader(f)}


# ---------------------------------------------------------------------------------------------------- VinDr
@pytest.fixture(scope="module")
def vindr_root(tmp_path_factory) -> tuple[Path, dict]:
    """4 studies x 2 good images (study s3 is VinDr 'test'), one with a boxed lesion, plus bad rows."""
    root = tmp_path_factory.mktemp("vindr-mammo")
    breast = [["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
               "breast_birads", "breast_density", "split"]]
    finding = [["study_id", "series_id", "image_id", "finding_categories", "finding_birads", "xmin", "ymin", "xmax",
                "ymax"]]
    truth, seed = {}, 0
    for s in range(4):
        study = f"s{s}"
        for view, lat in (("CC", "L"), ("MLO", "R")):
            image = f"{study}_{lat}{view}"
            lesion = "malignant" if (s, view) == (1, "CC") else None
            m = _phantom_dicom(root / "images" / study / f"{image}.dicom", seed, view, lat, "ABCD"[seed % 4], lesion,
                               ("siemens", "hologic")[s % 2])
            truth[image] = m
            breast.append([study, "se", image, lat, view, SIZE[0], SIZE[1], "BI-RADS 4" if lesion else "BI-RADS 1",
                           f"DENSITY {m.density}", "test" if s == 3 else "training"])
            if lesion:
                finding.append([study, "se", image, "['Mass', 'Suspicious Calcification']", "BI-RADS 4", *m.bbox])
            else:
                finding.append([study, "se", image, "['No Finding']", "", "", "", "", ""])
            seed += 1
    _phantom_dicom(root / "images" / "s9" / "bad_density.dicom", 20, "CC", "L")
    _phantom_dicom(root / "images" / "s9" / "xccl.dicom", 21, "CC", "L")
    (root / "images" / "s9" / "corrupt.dicom").write_bytes(b"\0" * 128 + b"DICM" + b"\x13\x07garbage" * 40)
    for image, view, density in (("bad_density", "CC", "DENSITY X"), ("missing", "CC", "DENSITY A"),
                                 ("corrupt", "MLO", "DENSITY B"), ("xccl", "XCCL", "DENSITY C")):
        breast.append(["s9", "se", image, "L", view, SIZE[0], SIZE[1], "BI-RADS 1", density, "training"])
        finding.append(["s9", "se", image, "['No Finding']", "", "", "", "", ""])
    _write_csv(root / "breast-level_annotations.csv", breast[0], breast[1:])
    _write_csv(root / "finding_annotations.csv", finding[0], finding[1:])
    return root, truth


@pytest.fixture(scope="module")
def vindr_out(vindr_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vindr_prepared")
    # a fixed mask threshold: Otsu (the default) misses siemens-like MLO phantoms, see test_otsu_limitation
    vindr.main(["--root", str(vindr_root[0]), "--out", str(out), "--mask-threshold", "0.05", "--no-progress"])
    return out


def test_vindr_datalist(vindr_root, vindr_out):
    _, truth = vindr_root
    d = _sections(vindr_out)
    assert [Path(e["image"]).stem for e in d["test"]] == ["s3_LCC", "s3_RMLO"]  # VinDr's own test split kept
    entries = [e for s in d.values() for e in s]
    assert sorted(Path(e["image"]).stem for e in entries) == sorted(truth)
    for e in entries:
        m = truth[Path(e["image"]).stem]
        assert Path(e["image"]).is_file()
        ratio, area = _true_area(m)
        assert (e["view"], e["laterality"], e["density"], e["area"]) == (m.view, m.laterality, m.density, area)
        assert e["vendor"] == m.vendor and e["patient"] == Path(e["image"]).parent.name
        assert parse_prompt(e["prompt"]).as_dict() == {"vendor": m.vendor, "view": m.view,
                                                       "density": density_word(m.density), "area": area}
        assert e["breast_area_ratio"] == pytest.approx(ratio, abs=0.05)
        assert e["label"] == ("lesion" if m.lesion else "normal")
        assert e.get("bbox") == ([m.bbox] if m.lesion else None)
    lesion = next(e for e in entries if e["label"] == "lesion")
    assert lesion["findings"] == [["Mass", "Suspicious Calcification"]] and lesion["birads"] == "4"
    assert _skipped(vindr_out) == {"s9/bad_density": "unknown density", "s9/missing": "missing file",
                                   "s9/corrupt": "unreadable image", "s9/xccl": "unknown view"}


def test_vindr_validation_is_patient_disjoint(vindr_out):
    d = _sections(vindr_out)
    patients = {s: {e["patient"] for e in d[s]} for s in d}
    assert len(d["validation"]) == 2 and len(d["training"]) == 4  # round(0.1 * 6) -> one study of 2 images
    assert not patients["validation"] & patients["training"] and not patients["test"] & patients["training"]


def test_vindr_healthy_only_and_view_map(vindr_root, tmp_path, capsys):
    vindr.main(["--root", str(vindr_root[0]), "--out", str(tmp_path), "--healthy-only", "--map-view", "XCCL=CC",
                "--val-fraction", "0", "--no-progress"])
    report = capsys.readouterr().out
    assert "excluded by --healthy-only: 1" in report and "unknown density: 1" in report
    entries = [e for s in _sections(tmp_path).values() for e in s]
    assert len(entries) == 8 and all(e["label"] == "normal" and "bbox" not in e for e in entries)
    assert next(e for e in entries if "xccl" in e["image"])["view"] == "CC"
    assert set(_skipped(tmp_path)) == {"s9/bad_density", "s9/missing", "s9/corrupt"}


def test_workers_give_the_same_datalist(vindr_root, vindr_out, tmp_path):
    vindr.main(["--root", str(vindr_root[0]), "--out", str(tmp_path), "--mask-threshold", "0.05", "--workers", "2",
                "--no-progress"])
    assert (tmp_path / "datalist.json").read_text() == (vindr_out / "datalist.json").read_text()


# --------------------------------------------------------------------------------------------- generic CSV
def test_generic_csv_with_header_fallbacks(tmp_path, capsys):
    root = tmp_path / "dicoms"
    truth = {name: _phantom_dicom(root / f"{name}.dcm", seed, view, lat, PatientID=pid)
             for seed, (name, view, lat, pid) in enumerate([("a", "CC", "L", "P1"), ("b", "MLO", "R", "P1"),
                                                            ("c", "CC", "R", "P2"), ("d", "MLO", "L", "P3")])}
    _phantom_dicom(root / "ct.dcm", 7, "CC", "L", Modality="CT")
    _write_csv(tmp_path / "cases.csv", ["Path", "laterality", "view", "density", "vendor", "split"], [
        ["a.dcm", "", "", "B", "", ""],             # everything but density from the header
        ["b.dcm", "R", "MLO", "", "siemens", ""],   # vendor from the CSV wins over the header (HOLOGIC)
        ["c.dcm", "", "", "4", "", "test"],
        ["d.dcm", "", "", "C", "", "validation"],
        ["ct.dcm", "", "", "", "", ""],
        ["nope.dcm", "", "", "", "", ""],
    ])
    out = tmp_path / "out"
    generic.main(["--csv", str(tmp_path / "cases.csv"), "--root", str(root), "--out", str(out), "--no-progress"])
    d = _sections(out)
    assert [[Path(e["image"]).stem for e in d[s]] for s in ("training", "validation", "test")] == [["a", "b"], ["d"],
                                                                                                   ["c"]]
    e = {Path(e["image"]).stem: e for s in d.values() for e in s}
    for name, m in truth.items():
        assert (e[name]["laterality"], e[name]["view"], e[name]["area"]) == (m.laterality, m.view, _true_area(m)[1])
    assert [e[n]["vendor"] for n in "abcd"] == ["siemens", "siemens", "siemens", "hologic"]  # b: CSV over header
    assert e["b"]["density"] is None and parse_prompt(e["b"]["prompt"]).density is None
    assert e["c"]["density"] == "D" and [e[n]["patient"] for n in "abcd"] == ["P1", "P1", "P2", "P3"]
    assert "appear in both" not in capsys.readouterr().out
    assert _skipped(out) == {"line 6: ct.dcm": "wrong modality", "line 7: nope.dcm": "missing file"}


def test_area_ratio_does_not_depend_on_laterality():
    m = make_mammogram(3, SIZE, breast_area="big")
    left = breast_area_ratio(m.image.T, "L")[0]
    right = breast_area_ratio(np.ascontiguousarray(m.image[:, ::-1].T), "R")[0]
    assert left == pytest.approx(right, abs=1e-3) and breast_area_ratio(m.image.T)[1] == "L"


def test_breast_area_is_right_when_the_tissue_itself_is_bimodal():
    # 16-bit "siemens" MLO: bright pectoral muscle over dark fat; plain Otsu split the tissue instead
    m = make_mammogram(0, SIZE, view="MLO", vendor="siemens", density="A", breast_area="small")
    assert breast_area_ratio(m.image.T, "L")[0] == pytest.approx(_true_area(m)[0], abs=0.05)
    assert breast_area_ratio(m.image.T, "L", threshold=0.05)[0] == pytest.approx(_true_area(m)[0], abs=0.05)


def test_patient_split_is_disjoint_seeded_and_keeps_training():
    entries = [{"image": f"i{i}", "patient": f"p{i % 7}" if i % 5 else None} for i in range(40)]
    train, val = patient_split(entries, 0.25, seed=1)
    assert patient_split(entries, 0.25, seed=1) == (train, val) and len(train) + len(val) == 40
    assert 10 <= len(val) <= 16 and not {e["patient"] for e in val if e["patient"]} & {e["patient"] for e in train}
    one = [{"image": f"i{i}", "patient": "same"} for i in range(5)]
    assert patient_split(one, 0.5) == (one, [])


def test_nothing_usable_fails_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(BreastGenError, match="no usable image: all 1 record"):
        prepare_datalist([Record(tmp_path / "missing.dcm")], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and "missing file: 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- layout errors
def test_layout_errors_are_one_line_exit_2(vindr_root, tmp_path, capsys):
    root = tmp_path / "vindr"
    root.mkdir()
    (root / "breast-level_annotations.csv").write_text((vindr_root[0] / "breast-level_annotations.csv").read_text())
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_vindr.py"), "--root", str(root), "--out",
                        str(tmp_path / "o1")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: ") and "finding_annotations.csv: CSV file not found" in r.stderr
    # the same main_guard in-process (a second interpreter costs the torch/MONAI import again)
    _write_csv(tmp_path / "cases.csv", ["file", "view"], [["a.dcm", "CC"]])
    with pytest.raises(SystemExit) as exit_info:
        generic.main(["--csv", str(tmp_path / "cases.csv"), "--root", str(tmp_path), "--out", str(tmp_path / "o2"),
                      "--healthy-only"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0
    assert "cases.csv: missing required column(s) path, label (found: file, view)" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
