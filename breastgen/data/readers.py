"""Image readers for breast imaging: DICOM (pydicom), TIFF (tifffile) and PNG/JPEG/PGM/BMP (Pillow).

All readers are :class:`monai.data.ImageReader` subclasses for ``LoadImage(reader=...)`` / ``LoadImaged``;
:class:`MammoImageReader` picks the decoder per file (by content, then suffix), so one transform loads a datalist
that mixes DICOM, TIFF and PNG. :func:`load_image` does the same without MONAI.

**Array convention** (MONAI's 2D convention, as ``PILReader(reverse_indexing=True)``): spatial axes are (W, H) --
axis 0 is x (columns, left to right), axis 1 is y (rows, top to bottom) -- so the pixel at row ``r``, column ``c``
of the file is ``array[c, r]``. Grey images are (W, H) with ``original_channel_dim = nan`` (``EnsureChannelFirst``
gives (1, W, H)); RGB images are (W, H, 3) with ``original_channel_dim = -1`` (gives (3, W, H)).
``reverse_indexing=False`` returns (H, W[, 3]) instead.

**Intensities**: integer data keeps its native dtype (16-bit stays 16-bit). DICOM grey images get the Modality LUT
(rescale slope/intercept: float32 unless the identity), optionally the VOI LUT / window (``voi_lut=True``,
float32), and MONOCHROME1 (like TIFF min-is-white) is inverted within its value range so that dense tissue is
bright (``meta["inverted"] = True``).

**Meta** -- the same keys for every format, so mixed batches collate: ``filename_or_obj``, ``format``,
``Modality``, ``Manufacturer``, ``PhotometricInterpretation`` (as stored), ``BitsStored``, ``ImageLaterality``
('L'/'R') and ``laterality_source``, ``ViewPosition`` ('CC', 'MLO', 'ML', 'LM', 'XCCL', ...) and ``view_source``,
``inverted``, ``modality_lut_applied``, ``voi_lut_applied``, ``n_frames``, ``frame``, ``spacing`` (mm, array axis
order) and ``spacing_source`` ('PixelSpacing', 'ImagerPixelSpacing' or 'default' = 1 mm; TIFF/PNG resolution
tags are ignored, they are usually a meaningless 72 dpi), ``affine`` / ``original_affine`` (diagonal pixel-to-mm,
no patient orientation), ``spatial_shape``, ``original_channel_dim``. Unknown values are ``None`` from
:func:`load_image` and MONAI's ``"none"`` from ``get_data`` (a ``None`` cannot be collated into a batch).

Laterality comes from ImageLaterality, then Laterality, then CBIS/DDSM-style tokens (``LEFT``/``RIGHT``, ``L``/``R``,
``LCC``, ``RMLO`` ...) in PatientID, SeriesDescription and the file name; the view from ViewPosition,
ViewCodeSequence, PatientOrientation (only when it holds a view code, as CBIS-DDSM's 'CC'), then the same tokens.

**Errors**: every problem with a user file (missing, empty, truncated, corrupt, not an image, wrong modality,
undecodable transfer syntax, NaN/Inf, constant or zero-size image, multi-frame without ``frame=``) is one
:class:`~breastgen.errors.BreastGenError` naming the file and the reason; no library exception escapes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.utils import TraceKeys, ensure_tuple

from ..errors import BreastGenError

__all__ = ["DICOM_SUFFIXES", "TIFF_SUFFIXES", "PIL_SUFFIXES", "MAX_PIXELS", "DecodedImage", "MammoDicomReader",
           "TiffReader", "PilImageReader", "MammoImageReader", "sniff_format", "load_image"]

DICOM_SUFFIXES = ("dcm", "dicom")
TIFF_SUFFIXES = ("tif", "tiff")
PIL_SUFFIXES = ("png", "jpg", "jpeg", "pgm", "pnm", "ppm", "bmp")
MAX_PIXELS = 2**28  # per frame: refuses corrupt Rows x Columns before allocating (mammograms are ~3e7)

_VIEWS = {"CC", "MLO", "ML", "LM", "LMO", "XCC", "XCCL", "XCCM", "FB", "SIO", "ISO", "AT", "CV"}
_NAME_VIEWS = _VIEWS - {"AT", "CV", "FB", "ISO"}  # too common as ordinary words to trust in names
_VIEW_MEANINGS = {"cranio-caudal": "CC", "medio-lateral oblique": "MLO", "medio-lateral": "ML", "latero-medial": "LM",
                  "latero-medial oblique": "LMO", "cranio-caudal exaggerated laterally": "XCCL",
                  "cranio-caudal exaggerated medially": "XCCM", "caudo-cranial (from below)": "FB",
                  "superolateral to inferomedial oblique": "SIO", "axillary tail": "AT", "cleavage": "CV"}
_SIDES = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}
_SIDE_VIEW = re.compile(r"([LR])(" + "|".join(sorted(_NAME_VIEWS, key=len, reverse=True)) + ")")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "pil", "PNG"), (b"\xff\xd8\xff", "pil", "JPEG"), (b"GIF8", "pil", "GIF"),
          (b"BM", "pil", "BMP"), (b"II*\x00", "tiff", "TIFF"), (b"MM\x00*", "tiff", "TIFF"),
          (b"II+\x00", "tiff", "TIFF"), (b"MM\x00+", "tiff", "TIFF"))
_PIL_CONVERT = {"1": "L", "LA": "L", "La": "L", **dict.fromkeys(("P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                                                                  "LAB", "HSV"), "RGB")}
_VIDEO = "it is video: extract frames with ffmpeg"
_NO_DECODER_HINT = {"MPEG": _VIDEO, "H.264": _VIDEO, "HEVC": _VIDEO}  # pydicom 3.0 has no decoder for these


@dataclass(frozen=True)
class _Options:
    frame: int | None = None
    allow_constant: bool = False
    max_pixels: int = MAX_PIXELS
    modalities: tuple[str, ...] | None = ("MG",)
    voi_lut: bool = False

    def __post_init__(self):
        if self.frame is not None and (type(self.frame) is not int or self.frame < 0):
            raise BreastGenError(f"frame must be None or a non-negative integer, got {self.frame!r}")
        if self.modalities is not None:
            mods = (self.modalities,) if isinstance(self.modalities, str) else self.modalities
            object.__setattr__(self, "modalities", tuple(str(m).upper() for m in mods))


@dataclass
class DecodedImage:
    """What ``read`` returns: pixels in file order ((rows, cols) or (rows, cols, 3)), meta, and any error.

    ``spacing_rc`` is (row spacing, column spacing) in mm; ``get_data`` puts it in the array's axis order.
    ``error`` is the problem with the file, raised by ``get_data`` (see :meth:`_MammoReader.read`).
    """

    array: np.ndarray | None
    meta: dict
    spacing_rc: tuple[float, float] = (1.0, 1.0)
    error: BreastGenError | None = None


# ----------------------------------------------------------------------------------------------------- helpers
def _suffix(path: Any) -> str:
    return Path(str(path)).suffix.lower().lstrip(".")


def _head(path: Path, n: int = 512) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _magic(head: bytes) -> tuple[str, str] | None:
    """(reader kind, format name) from a file's first bytes, or None."""
    if head[128:132] == b"DICM":
        return "dicom", "DICOM"
    if re.match(rb"P[1-7]\s", head):
        return "pil", "PNM"
    return next(((kind, name) for magic, kind, name in _MAGIC if head.startswith(magic)), None)


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    text = head.decode("utf-8", errors="replace")
    return sum(ch.isprintable() or ch in "\r\n\t" for ch in text) >= 0.95 * len(text)


def sniff_format(path: str | Path) -> str:
    """The reader a file needs -- ``'dicom'``, ``'tiff'`` or ``'pil'`` -- by content, then suffix, else DICOM."""
    try:
        found = _magic(_head(Path(path), 132))
    except OSError:
        found = None
    suffix = _suffix(path)
    return found[0] if found else "tiff" if suffix in TIFF_SUFFIXES else "pil" if suffix in PIL_SUFFIXES else "dicom"


def _is_library_error(exc: BaseException) -> bool:
    """True for errors of decoders on corrupt data (pyo3 decoders such as pylibjpeg-rle raise ``PanicException``,
    a BaseException); False for KeyboardInterrupt and friends."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _describe(exc: BaseException, path: Path) -> str:
    text = " ".join(str(exc).replace(str(path), path.name).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _show(value: Any, limit: int = 48) -> str:
    """A header value fit for a one-line message (corrupt files hold control characters and long garbage)."""
    text = "".join(ch if ch.isprintable() else "?" for ch in str(value))
    return text if len(text) <= limit else text[:limit] + "..."


def _check_path(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BreastGenError("file not found", path) from None
    except OSError as exc:
        raise BreastGenError(f"cannot access file: {exc.strerror or exc}", path) from None
    if stat.S_ISDIR(st.st_mode):
        raise BreastGenError("is a directory, expected an image file", path)
    if not stat.S_ISREG(st.st_mode):
        raise BreastGenError("not a regular file", path)
    if st.st_size == 0:
        raise BreastGenError("empty file (0 bytes)", path)


def _frame_index(n_frames: int, frame: int | None, path: Path) -> int:
    if frame is None and n_frames > 1:
        raise BreastGenError(f"multi-frame image ({n_frames} frames) where a 2D image is expected; "
                             "pass frame=0 to read the first frame", path)
    if (frame or 0) >= n_frames:
        raise BreastGenError(f"frame {frame} requested but the file has {n_frames} frame(s)", path)
    return frame or 0


def _check_size(rows: int, cols: int, opts: _Options, path: Path) -> None:
    if rows <= 0 or cols <= 0:
        raise BreastGenError(f"zero-size image ({rows} rows x {cols} columns)", path)
    if rows * cols > opts.max_pixels:
        raise BreastGenError(f"image too large: {rows} x {cols} pixels is more than max_pixels={opts.max_pixels}", path)


def _side_and_view(text: str) -> tuple[str | None, str | None]:
    """Laterality and view from CBIS/DDSM-style tokens (``..._LEFT_CC``, ``_R_MLO``, ``LMLO``); None if ambiguous."""
    sides, views = set(), set()
    for tok in re.split(r"[^A-Z0-9]+", text.upper()):
        if tok in _SIDES:
            sides.add(_SIDES[tok])
        elif tok in _NAME_VIEWS:
            views.add(tok)
        elif m := _SIDE_VIEW.fullmatch(tok):
            sides.add(m.group(1))
            views.add(m.group(2))
    return (sides.pop() if len(sides) == 1 else None), (views.pop() if len(views) == 1 else None)


def _resolve(sides: Sequence[tuple[str, str | None]], views: Sequence[tuple[str, str | None]],
             texts: Sequence[tuple[str, str | None]]) -> dict:
    """The first laterality / view among (source, value) candidates, else from tokens in free texts."""
    out: dict[str, str | None] = dict.fromkeys(("ImageLaterality", "laterality_source", "ViewPosition", "view_source"))
    for source, value in sides:
        if side := _SIDES.get((value or "").strip().upper()):
            out.update(ImageLaterality=side, laterality_source=source)
            break
    for source, value in views:
        code = re.sub(r"[\s_-]+", "", value or "").upper()
        if view := code if code in _VIEWS else (m.group(2) if (m := _SIDE_VIEW.fullmatch(code)) else None):
            out.update(ViewPosition=view, view_source=source)
            break
    for source, text in texts:
        side, view = _side_and_view(text or "")
        if side and not out["ImageLaterality"]:
            out.update(ImageLaterality=side, laterality_source=source)
        if view and not out["ViewPosition"]:
            out.update(ViewPosition=view, view_source=source)
    return out


def _base_meta(path: Path, fmt: str, **values: Any) -> dict:
    meta = dict(filename_or_obj=str(path), format=fmt, Modality=None, Manufacturer=None,
                PhotometricInterpretation=None, BitsStored=None, inverted=False, modality_lut_applied=False,
                voi_lut_applied=False, n_frames=1, frame=0, spacing_source="default",
                **_resolve((), (), [("filename", path.stem)]))
    meta.update(values)
    return meta


def _int_range(dtype: np.dtype, bits: int) -> tuple[int, int] | None:
    """The values an integer encoding with ``bits`` significant bits can hold (None for floats)."""
    if dtype.kind not in "iu":
        return None
    bits = min(bits, 8 * dtype.itemsize)
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if dtype.kind == "i" else (0, 2**bits - 1)


def _invert(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Mirror intensities within [lo, hi] (the encoding's value range) so that dark becomes bright; keeps dtype."""
    if arr.dtype.kind == "u" and lo == 0:
        return arr.dtype.type(hi) - np.minimum(arr, arr.dtype.type(hi))
    if arr.dtype.kind == "i" and lo + hi == -1:
        return np.invert(np.clip(arr, lo, hi))  # ~x == -1 - x
    if arr.dtype.kind in "iu":
        return (int(lo + hi) - np.clip(arr, lo, hi).astype(np.int64)).astype(arr.dtype)
    return (np.float32(lo + hi) - arr).astype(np.float32)


# ----------------------------------------------------------------------------------------------------- DICOM
def _tag(ds, keyword: str) -> str | None:
    """A tag value as str (multiple values joined by '\\'); None when absent, empty or unreadable."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed optional tag counts as absent
        return None
    if value is not None and not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
        value = "\\".join(str(v) for v in value)
    return None if value is None or str(value) == "" else str(value)


def _dicom_int(ds, keyword: str, path: Path, default: int | None = None) -> int:
    try:
        return int(ds.get(keyword, default))
    except Exception:  # noqa: BLE001
        raise BreastGenError(f"missing or invalid {keyword} in the DICOM header", path) from None


def _dicom_float(ds, keyword: str, default: float, path: Path) -> float:
    try:
        value = ds.get(keyword)
        return default if value is None or value == "" else float(value)
    except Exception:  # noqa: BLE001
        raise BreastGenError(f"invalid {keyword} in the DICOM header", path) from None


def _dicom_spacing(ds) -> tuple[tuple[float, float], str]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            values = [float(v) for v in ds.get(keyword) or ()]
        except Exception:  # noqa: BLE001 - malformed: try the next source
            continue
        if len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values):
            return (values[0], values[1]), keyword
    return (1.0, 1.0), "default"


def _view_code(ds) -> str | None:
    try:
        return _VIEW_MEANINGS.get(str(ds.ViewCodeSequence[0].CodeMeaning).strip().lower())
    except Exception:  # noqa: BLE001 - absent or malformed
        return None


def _read_dataset(path: Path):
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    found = _magic(_head(path))
    if found and found[0] != "dicom":
        raise BreastGenError(f"not a DICOM file: the content is a {found[1]} image", path)
    not_dicom = "not a DICOM file (no 'DICM' marker at byte 128, no readable DICOM header)"
    try:  # files without the Part 10 preamble are read only if they parse into an image dataset
        ds = pydicom.dcmread(path, force=not found)
    except Exception as exc:  # noqa: BLE001
        raise BreastGenError(f"corrupt or truncated DICOM header: {_describe(exc, path)}" if found else not_dicom,
                             path) from exc
    if not found and not ("Rows" in ds and "PixelData" in ds):
        raise BreastGenError(not_dicom, path)
    if "TransferSyntaxUID" not in ds.file_meta:  # ACR-NEMA style file: the encoding it was parsed with
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _check_transfer_syntax(ds, path: Path):
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(str(ds.file_meta.TransferSyntaxUID))
    convert = "convert the file to an uncompressed transfer syntax (GDCM gdcmconv --raw, dcmtk dcmdjpeg)"
    if not uid.is_transfer_syntax:
        if uid.startswith("1.2.840.10008.1.2."):  # a standard syntax newer than the installed pydicom
            raise BreastGenError(f"unsupported transfer syntax {uid}: unknown to this pydicom; {convert}", path)
        raise BreastGenError(f"unknown transfer syntax {_show(uid)} (corrupt header or private encoding)", path)
    name = f"'{uid.name}' ({uid})"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        hint = next((h for key, h in _NO_DECODER_HINT.items() if key in uid.name), convert)
        raise BreastGenError(f"unsupported transfer syntax {name}: pydicom has no decoder; {hint}", path) from None
    if not decoder.is_available:
        raise BreastGenError(f"cannot decode transfer syntax {name}: install one of: "
                             + "; ".join(decoder.missing_dependencies), path)
    return uid


def _decode_dicom(path: Path, opts: _Options) -> DecodedImage:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
    from pydicom.pixels.utils import get_expected_length, get_nr_frames

    ds = _read_dataset(path)
    pixel_kw = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    if pixel_kw is None:
        sop = getattr(ds.get("SOPClassUID"), "name", None)
        why = "not an image" if sop and "Image" not in sop and "Rows" not in ds else "the file is probably truncated"
        raise BreastGenError(f"DICOM without pixel data: {why} (SOP class {_show(sop)})", path)
    modality = _tag(ds, "Modality")
    if opts.modalities is not None and (modality or "").upper() not in opts.modalities:
        raise BreastGenError(f"{f'modality {_show(modality)}' if modality else 'no Modality (0008,0060)'}, expected "
                             f"{'/'.join(opts.modalities)} (pass modalities=None to accept any modality)", path)
    uid = _check_transfer_syntax(ds, path)
    rows, cols = _dicom_int(ds, "Rows", path), _dicom_int(ds, "Columns", path)
    samples, bits_alloc = _dicom_int(ds, "SamplesPerPixel", path), _dicom_int(ds, "BitsAllocated", path)
    bits_stored = _dicom_int(ds, "BitsStored", path, bits_alloc)
    if pixel_kw == "PixelData":
        _dicom_int(ds, "PixelRepresentation", path)
    photometric = (_tag(ds, "PhotometricInterpretation") or "").upper()
    _check_size(rows, cols, opts, path)
    if bits_alloc not in (1, 8, 16, 32, 64) or not 0 < bits_stored <= bits_alloc:
        raise BreastGenError(f"invalid BitsAllocated/BitsStored {bits_alloc}/{bits_stored}", path)
    grey = photometric in ("MONOCHROME1", "MONOCHROME2")
    if not (grey or photometric in ("PALETTE COLOR", "RGB") or photometric.startswith("YBR_")):
        raise BreastGenError(f"unsupported PhotometricInterpretation '{_show(photometric)}'", path)
    if samples != (1 if grey or photometric == "PALETTE COLOR" else 3):
        raise BreastGenError(f"SamplesPerPixel {samples} does not fit PhotometricInterpretation {_show(photometric)}",
                             path)
    n_frames = get_nr_frames(ds, warn=False)
    index = _frame_index(n_frames, opts.frame, path)
    if not uid.is_encapsulated:
        expected, actual = get_expected_length(ds, "bytes"), len(ds[pixel_kw].value or b"")
        if not expected <= actual <= expected + 1:  # + 1: padding to even length
            raise BreastGenError(
                f"pixel data length {actual} bytes inconsistent with Rows {rows} x Columns {cols} x BitsAllocated "
                f"{bits_alloc} x SamplesPerPixel {samples} x {n_frames} frame(s) = {expected} bytes"
                + (" (truncated file?)" if actual < expected else ""), path)
    try:
        arr = pixel_array(ds, index=index if n_frames > 1 else None)
    except BaseException as exc:  # noqa: BLE001
        if not _is_library_error(exc):
            raise
        raise BreastGenError(f"cannot decode pixel data ({uid.name}): {_describe(exc, path)}", path) from exc
    if arr.shape[:2] != (rows, cols):
        raise BreastGenError(f"decoded pixel data has shape {arr.shape}, expected {rows} x {cols}", path)

    meta: dict[str, Any] = {}
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    elif grey:
        slope = _dicom_float(ds, "RescaleSlope", 1.0, path)
        intercept = _dicom_float(ds, "RescaleIntercept", 0.0, path)
        lut = "ModalityLUTSequence" in ds
        rescale = not lut and (slope, intercept) != (1.0, 0.0)
        voi = opts.voi_lut and ("VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds))

        def transform(x: np.ndarray) -> np.ndarray:  # stored values -> modality values (-> VOI)
            if lut:
                x = apply_modality_lut(x, ds)
            elif rescale:
                with np.errstate(invalid="ignore", over="ignore"):  # a non-finite result is reported below
                    x = (x.astype(np.float64) * slope + intercept).astype(np.float32)
            return apply_voi_lut(x, ds, prefer_lut=True).astype(np.float32) if voi else x

        value_range = _int_range(arr.dtype, bits_stored)
        ends = None if value_range is None else transform(np.array(value_range, dtype=arr.dtype))
        arr = transform(arr)
        if photometric == "MONOCHROME1":  # invert within the transformed value range of the encoding
            arr = _invert(arr, *((ends.min(), ends.max()) if ends is not None else (arr.min(), arr.max())))
        meta.update(inverted=photometric == "MONOCHROME1", modality_lut_applied=lut or rescale, voi_lut_applied=voi)

    spacing, spacing_source = _dicom_spacing(ds)
    meta.update(_resolve(
        [("ImageLaterality", _tag(ds, "ImageLaterality")), ("Laterality", _tag(ds, "Laterality"))],
        [("ViewPosition", _tag(ds, "ViewPosition")), ("ViewCodeSequence", _view_code(ds)),
         ("PatientOrientation", _tag(ds, "PatientOrientation"))],
        [("PatientID", _tag(ds, "PatientID")), ("SeriesDescription", _tag(ds, "SeriesDescription")),
         ("filename", path.stem)]))
    meta = _base_meta(path, "DICOM", Modality=modality, Manufacturer=_tag(ds, "Manufacturer"),
                      BitsStored=bits_stored, PhotometricInterpretation=photometric, n_frames=n_frames, frame=index,
                      spacing_source=spacing_source, **meta)
    return DecodedImage(arr, meta, spacing)


# ----------------------------------------------------------------------------------------------------- TIFF, PIL
def _decode_tiff(path: Path, opts: _Options) -> DecodedImage:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        pages = [page for page in tif.pages if not page.subfiletype & 1]  # skip reduced-resolution copies
        if not pages:
            raise BreastGenError("TIFF file without images", path)
        index = _frame_index(len(pages), opts.frame, path)
        page = pages[index]
        shape, axes = tuple(page.shape), page.axes
        spatial = [n for n, a in zip(shape, axes) if a != "S"]
        if len(spatial) != 2:
            raise BreastGenError(f"{len(spatial)} spatial dimensions {shape} ({axes}) where 2D is expected", path)
        _check_size(*spatial, opts, path)
        name, bits, colormap = getattr(page.photometric, "name", str(page.photometric)), page.bitspersample, None
        if name == "PALETTE":
            colormap = page.colormap
        arr = page.asarray()
    if axes.startswith("S") and arr.ndim == 3:  # planar configuration: samples first
        arr = np.moveaxis(arr, 0, -1)
    if name == "PALETTE" and colormap is not None and arr.ndim == 2:
        arr, name = np.moveaxis(np.asarray(colormap)[:, arr], 0, -1), "RGB"
    elif name in ("MINISBLACK", "MINISWHITE") and arr.ndim == 3:
        arr = arr[..., 0]  # grey + extra samples (alpha)
    elif name in ("RGB", "YCBCR") and arr.ndim == 3 and arr.shape[-1] >= 3:
        arr = arr[..., :3]  # drop alpha
    elif name not in ("MINISBLACK", "MINISWHITE", "RGB", "YCBCR"):
        raise BreastGenError(f"unsupported TIFF photometric interpretation {name}", path)
    arr = arr.astype(np.uint8) if arr.dtype == bool else arr
    if name == "MINISWHITE":
        arr = _invert(arr, *(_int_range(arr.dtype, int(bits)) or (arr.min(), arr.max())))
    pi = {"MINISWHITE": "MONOCHROME1", "MINISBLACK": "MONOCHROME2"}.get(name, "RGB")
    return DecodedImage(arr, _base_meta(path, "TIFF", PhotometricInterpretation=pi, BitsStored=int(bits),
                                        inverted=name == "MINISWHITE", n_frames=len(pages), frame=index))


def _decode_pil(path: Path, opts: _Options) -> DecodedImage:
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        raise BreastGenError("not a readable image: unknown format or corrupt header", path) from None
    with im:
        fmt, n_frames = im.format or "image", int(getattr(im, "n_frames", 1) or 1)
        index = _frame_index(n_frames, opts.frame, path)
        im.seek(index) if index else None
        _check_size(im.height, im.width, opts, path)
        im.load()
        if im.mode in _PIL_CONVERT:
            im = im.convert(_PIL_CONVERT[im.mode])
        elif im.mode not in ("L", "RGB", "I", "F") and not im.mode.startswith("I;16"):
            raise BreastGenError(f"unsupported {fmt} pixel mode {im.mode}", path)
        arr = np.array(im)
    if arr.dtype == np.int32 and arr.size and arr.min() >= 0 and arr.max() <= 65535:  # 16-bit PNG/PGM read as 'I'
        arr = arr.astype(np.uint16)
    return DecodedImage(arr, _base_meta(path, fmt, PhotometricInterpretation="RGB" if arr.ndim == 3 else "MONOCHROME2",
                                        BitsStored=8 * arr.dtype.itemsize, n_frames=n_frames, frame=index))


_DECODERS: dict[str, tuple[str, Callable[[Path, _Options], DecodedImage]]] = {
    "dicom": ("DICOM", _decode_dicom), "tiff": ("TIFF", _decode_tiff), "pil": ("image", _decode_pil)}


# ----------------------------------------------------------------------------------------------------- readers
def _swap_xy(a: np.ndarray, block: int = 256) -> np.ndarray:
    """Contiguous copy with axes 0 and 1 swapped, in row blocks: about 2x faster than ``np.ascontiguousarray``
    of a transposed full-field mammogram, whose column-wise reads miss the cache."""
    out = np.empty((a.shape[1], a.shape[0], *a.shape[2:]), dtype=a.dtype)
    for i in range(0, a.shape[0], block):
        out[:, i:i + block] = np.swapaxes(a[i:i + block], 0, 1)
    return out


class _MammoReader(ImageReader):
    """Shared ``verify_suffix`` / ``read`` / ``get_data``; subclasses set ``suffixes`` and ``_kind``.

    Args:
        reverse_indexing: True (default): arrays are (W, H[, 3]) as in MONAI; False: (H, W[, 3]).
        frame: the frame to read from multi-frame files; None (default) rejects multi-frame files.
        allow_constant: accept images whose pixels are all equal (rejected by default: blank exports).
        max_pixels: refuse images with more pixels per frame (guards against corrupt size fields).
    """

    suffixes: tuple[str, ...] = ()
    _kind = ""

    def __init__(self, reverse_indexing: bool = True, frame: int | None = None, allow_constant: bool = False,
                 max_pixels: int = MAX_PIXELS, **options: Any):
        super().__init__()
        self.reverse_indexing = reverse_indexing
        self.options = _Options(frame=frame, allow_constant=allow_constant, max_pixels=max_pixels, **options)

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        """True if every file name ends with a suffix this reader handles."""
        names = ensure_tuple(filename)
        return bool(names) and all(_suffix(name) in self.suffixes for name in names)

    def read(self, data: Sequence[str] | str, **kwargs: Any) -> DecodedImage | list[DecodedImage]:
        """Decode one file (or several, stacked as channels by ``get_data``); ``kwargs`` override the options.

        A problem with a file is not raised here but kept in ``DecodedImage.error`` and raised by ``get_data``:
        when ``read`` raises, MONAI's ``LoadImage`` silently retries with its other readers, which would bypass
        these checks (modality, constant image ...) and load the file with other conventions.
        """
        opts = dataclasses.replace(self.options, **kwargs) if kwargs else self.options
        images = []
        for name in ensure_tuple(data):
            try:
                images.append(self._read_one(Path(str(name)), opts))
            except BreastGenError as err:
                images.append(DecodedImage(None, {"filename_or_obj": str(name)}, error=err))
        return images if len(images) > 1 else images[0]

    def get_data(self, img: DecodedImage | Sequence[DecodedImage]) -> tuple[np.ndarray, dict]:
        """The array (W, H[, C]) and meta (unknown values are ``"none"``); raises the file's BreastGenError."""
        array, meta = self._assemble(img)
        return array, {k: TraceKeys.NONE if v is None else v for k, v in meta.items()}

    def _read_one(self, path: Path, opts: _Options) -> DecodedImage:
        _check_path(path)
        label = "image"
        try:
            found = _magic(head := _head(path))
            if not found and _looks_like_text(head):
                raise BreastGenError("not an image file: it contains text", path)
            kind = (found[0] if found else sniff_format(path)) if self._kind == "any" else self._kind
            label = found[1] if found and found[0] == kind else _DECODERS[kind][0]
            label = _suffix(path).upper() if label == "image" and _suffix(path) else label
            img = _DECODERS[kind][1](path, opts)
            arr = np.asarray(img.array)
            arr = arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))
        except BreastGenError:
            raise
        except MemoryError:
            raise BreastGenError("not enough memory to decode the image", path) from None
        except BaseException as exc:  # noqa: BLE001 - any library failure on a user file is a user error
            if not _is_library_error(exc):
                raise
            raise BreastGenError(f"cannot read {label} file: {_describe(exc, path)}", path) from exc
        if arr.size == 0:
            raise BreastGenError(f"zero-size image (shape {arr.shape})", path)
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
            raise BreastGenError(f"image of shape {arr.shape} where a 2D grey or RGB image is expected", path)
        if arr.dtype.kind not in "uif":
            raise BreastGenError(f"unsupported pixel type {arr.dtype}", path)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise BreastGenError(f"image contains NaN or Inf values ({int((~np.isfinite(arr)).sum())} pixels)", path)
        if not opts.allow_constant and arr.min() == arr.max():
            raise BreastGenError(f"constant image (all pixels equal {arr.flat[0]}); pass allow_constant=True to "
                                 "accept it", path)
        img.array = arr
        return img

    def _assemble(self, img: DecodedImage | Sequence[DecodedImage]) -> tuple[np.ndarray, dict]:
        """Arrays in the requested axis order plus MONAI's meta keys; several files are stacked as channels."""
        arrays, metas = [], []
        for im in ensure_tuple(img):
            if im.error is not None:
                raise im.error
            arr = _swap_xy(im.array) if self.reverse_indexing else im.array
            spacing = np.asarray(im.spacing_rc[::-1] if self.reverse_indexing else im.spacing_rc, dtype=np.float64)
            affine = np.diag([*spacing, 1.0])
            arrays.append(arr)
            metas.append(dict(im.meta, spacing=spacing, affine=affine, original_affine=affine.copy(),
                              spatial_shape=np.asarray(arr.shape[:2]),
                              original_channel_dim=-1 if arr.ndim == 3 else float("nan")))
        meta = metas[0]
        if len(arrays) == 1:
            return arrays[0], meta
        if len({a.shape for a in arrays}) != 1:
            raise BreastGenError("cannot stack images of different shapes "
                                 + ", ".join(str(a.shape) for a in arrays), meta["filename_or_obj"])
        if arrays[0].ndim == 3:
            return np.concatenate(arrays, axis=-1), meta
        meta["original_channel_dim"] = 0
        return np.stack(arrays), meta


class MammoDicomReader(_MammoReader):
    """DICOM reader (pydicom + pylibjpeg: native, RLE, JPEG, JPEG-lossless, JPEG-LS, JPEG 2000 via Pillow).

    Args:
        modalities: accepted Modality values (default ``("MG",)``); None accepts any.
        voi_lut: apply the file's VOI LUT / window (float32 output); default False keeps the modality values.
        reverse_indexing, frame, allow_constant, max_pixels: as for every reader (see ``_MammoReader``).
    """

    suffixes = DICOM_SUFFIXES
    _kind = "dicom"

    def __init__(self, modalities: Sequence[str] | None = ("MG",), voi_lut: bool = False, **kwargs: Any):
        super().__init__(modalities=modalities, voi_lut=voi_lut, **kwargs)


class TiffReader(_MammoReader):
    """TIFF reader (tifffile): 8/16-bit grey (e.g. BCDR mammograms), float, RGB, palette; min-is-white inverted."""

    suffixes = TIFF_SUFFIXES
    _kind = "tiff"


class PilImageReader(_MammoReader):
    """PNG / JPEG / PGM / BMP reader (Pillow) that keeps 16-bit grey ('I;16' PNG, 16-bit PGM) as uint16."""

    suffixes = PIL_SUFFIXES
    _kind = "pil"


class MammoImageReader(MammoDicomReader):
    """One reader for DICOM, TIFF and PNG/JPEG/PGM/BMP, chosen per file by content, then suffix (else DICOM).

    Takes the arguments of :class:`MammoDicomReader`; ``modalities`` and ``voi_lut`` concern DICOM files only.
    """

    suffixes = DICOM_SUFFIXES + TIFF_SUFFIXES + PIL_SUFFIXES
    _kind = "any"


def load_image(path: str | Path, **options: Any) -> tuple[np.ndarray, dict]:
    """Read one image file of any supported format without MONAI: ``(array, meta)`` as ``get_data`` returns them,
    except that unknown meta values are ``None``.

    ``options`` are those of :class:`MammoImageReader` (``modalities=("MG",)``, ``voi_lut=False``,
    ``reverse_indexing=True``, ``frame=None``, ``allow_constant=False``, ``max_pixels``). Raises
    :class:`~breastgen.errors.BreastGenError` for any problem with the file.
    """
    reader = MammoImageReader(**options)
    return reader._assemble(reader.read(path))
