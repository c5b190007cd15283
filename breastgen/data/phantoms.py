"""Deterministic demo phantoms: mammograms and histology tiles drawn with numpy, scipy and scikit-image.

**A phantom is not a real image.** It is not derived from, calibrated against or representative of any patient
or acquisition. Phantoms exist for two reasons only: so that every bundle (training, inference, tests) runs out
of the box without patient data, and so that demos can show that conditioning works -- every attribute below
changes the picture in a way a small network can learn, so a model conditioned on it visibly follows it.
Never use phantoms to judge clinical image quality.

Conventions: numpy arrays in (rows, cols) order (RGB tiles (rows, cols, 3)); a bounding box is
``[x0, y0, x1, y1]`` in half-open pixel coordinates with x = column and y = row. Mammograms use the usual display
convention: a **left** breast ('L') has its chest wall on the image's **left** edge (column 0) and points right;
a right breast ('R') is its mirror image. The MLO view shows the pectoral muscle as a bright triangle in the
upper chest-wall corner; CC has none. Every function takes a seed (or a ``numpy.random.Generator``) and returns
identical arrays for identical arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.color import hed2rgb
from skimage.segmentation import find_boundaries

from ..errors import BreastGenError
from ..prompts import area_class

__all__ = [
    "VIEWS", "LATERALITIES", "DENSITIES", "VENDORS", "LESIONS", "AREAS", "GRADES", "HER2_SCORES",
    "DENSE_FRACTION", "VENDOR_CURVES", "Mammogram", "make_mammogram", "make_he_tile", "make_ihc_pair",
    "make_benign_malignant_tile",
]

VIEWS = ("CC", "MLO")
LATERALITIES = ("L", "R")
DENSITIES = ("A", "B", "C", "D")
VENDORS = ("siemens", "hologic")
LESIONS = ("benign", "malignant")
AREAS = ("small", "medium", "big")
GRADES = (1, 2, 3)
HER2_SCORES = ("0", "1+", "2+", "3+")

# BI-RADS letter -> fraction of the glandular region (breast minus skin band and pectoral) that is fibroglandular
DENSE_FRACTION = {"A": 0.08, "B": 0.26, "C": 0.52, "D": 0.80}
# vendor -> (brightest value, gamma of the intensity curve, BitsStored): a 16-bit-range and a 12-bit-range look
VENDOR_CURVES = {"siemens": (60000, 1.3, 16), "hologic": (4000, 0.75, 12)}
# breast-pixel fraction drawn for each area class: well inside prompts.area_class's < 0.4 / 0.4-0.6 / > 0.6
_AREA_TARGETS = {"small": (0.24, 0.35), "medium": (0.44, 0.56), "big": (0.64, 0.74)}


@dataclass
class Mammogram:
    """A mammogram phantom and its ground truth; all masks are bool (rows, cols)."""

    image: np.ndarray  # uint16 (rows, cols); dense tissue is bright (MONOCHROME2)
    breast_mask: np.ndarray  # everything that is not background, pectoral muscle included
    lesion_mask: np.ndarray  # all False without a lesion
    pectoral_mask: np.ndarray  # all False for CC
    dense_mask: np.ndarray  # fibroglandular tissue
    bbox: list[int] | None  # [x0, y0, x1, y1] of the lesion (half-open, x = column), None without a lesion
    view: str
    laterality: str
    density: str
    vendor: str
    lesion: str | None
    area: str
    area_fraction: float  # breast pixels / image pixels
    dense_fraction: float  # fibroglandular pixels / glandular-region pixels
    bits_stored: int  # 16 or 12, per vendor

    @property
    def label(self) -> str:
        """'normal', 'benign' or 'malignant'."""
        return self.lesion or "normal"

    def meta(self) -> dict[str, Any]:
        """The non-array attributes (what a datalist entry or a DICOM header records)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not isinstance(getattr(self, f.name), np.ndarray)}


def make_mammogram(rng_or_seed: int | np.random.Generator = 0, size: tuple[int, int] = (256, 208), *,
                   view: str = "CC", laterality: str = "L", density: str = "B", vendor: str = "siemens",
                   lesion: str | None = None, breast_area: str | None = None) -> Mammogram:
    """Draw a mammogram phantom.

    Args:
        rng_or_seed: seed or ``numpy.random.Generator``; the same seed and arguments give identical arrays.
        size: (rows, cols), at least 64 x 64.
        view: 'CC' (rounder half-ellipse) or 'MLO' (elongated, tilted, pectoral muscle in the upper corner).
        laterality: 'L' (chest wall at the left edge) or 'R' (mirror image).
        density: BI-RADS 'A'..'D': the fraction of bright fibroglandular texture (:data:`DENSE_FRACTION`).
        vendor: 'siemens' (values up to ~60000, gamma 1.3) or 'hologic' (up to ~4000, gamma 0.75).
        lesion: None, 'benign' (smooth ellipse) or 'malignant' (irregular, spiculated); placed fully inside the
            glandular region.
        breast_area: 'small' | 'medium' | 'big' (breast-pixel fraction < 0.4, 0.4-0.6, > 0.6) or None for random.
            The breast is scaled so that the fraction lands inside the class (checked).
    """
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    view = _pick("view", str(view).upper(), VIEWS)
    laterality = _pick("laterality", str(laterality).upper()[:1], LATERALITIES)
    density = _pick("density", str(density).upper(), DENSITIES)
    vendor = _pick("vendor", str(vendor).lower(), VENDORS)
    lesion = None if lesion in (None, "", "normal", "none") else _pick("lesion", str(lesion).lower(), LESIONS)
    random_area = AREAS[rng.integers(len(AREAS))]  # always drawn: the stream must not depend on the arguments
    area = random_area if breast_area is None else _pick("breast_area", str(breast_area).lower(), AREAS)
    if np.shape(size) != (2,) or min(size) < 64:
        raise BreastGenError(f"mammogram size must be (rows, cols) of at least 64 x 64, not {size!r}")
    rows, cols = int(size[0]), int(size[1])
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    smooth = min(rows, cols) / 208.0  # texture scales with the image

    # 1. outline: elliptic distance from the chest-wall point (0, cy), tilted down for MLO, with a wobbly skin line
    mlo = view == "MLO"
    cy = rows * rng.uniform(0.36, 0.44) if mlo else rows * rng.uniform(0.45, 0.55)
    aspect = rng.uniform(0.75, 0.95) if mlo else rng.uniform(1.1, 1.5)  # nipple-direction / vertical semi-axis
    tilt = np.deg2rad(rng.uniform(10, 20)) if mlo else 0.0
    u = xx * np.cos(tilt) + (yy - cy) * np.sin(tilt)
    v = -xx * np.sin(tilt) + (yy - cy) * np.cos(tilt)
    phi = np.arctan2(v, u / aspect)
    wobble = 1 + sum(rng.uniform(0, 0.035) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    dist = np.hypot(u / aspect, v) / wobble
    pw, ph = cols * rng.uniform(0.28, 0.38), rows * rng.uniform(0.42, 0.55)
    reach = xx / pw + yy / ph  # < 1 inside the pectoral triangle, whose edge bulges slightly outwards
    pectoral = (reach <= 1 + 0.08 * np.sin(np.pi * np.clip(yy / ph, 0, 1))) if mlo else np.zeros_like(xx, bool)

    # 2. scale: the breast is the `target` fraction of pixels closest (in elliptic distance) to the chest wall
    target = rng.uniform(*_AREA_TARGETS[area])
    scale = np.quantile(np.where(pectoral, 0.0, dist), target)
    radial = dist / scale  # 0 at the chest wall centre, 1 at the skin
    breast = (radial <= 1) | pectoral
    area_fraction = float(breast.mean())
    if area_class(area_fraction) != area:  # cannot happen for sizes >= 64 x 64; guards the construction
        raise RuntimeError(f"phantom breast fraction {area_fraction:.3f} is not in the {area!r} class")
    thickness = np.sqrt(np.clip(1 - radial ** 4, 0, 1))  # compressed breast: flat, thinning at the skin

    # 3. fibroglandular tissue: smoothed noise, denser towards the centre, thresholded at the density fraction
    glandular = breast & ~pectoral & (radial < 0.92)
    fine = _noise(rng, (rows, cols), 4 * smooth)
    coarse = _noise(rng, (rows, cols), 16 * smooth)
    field = fine + 0.8 * coarse + 1.5 * (1 - radial)
    fraction = float(np.clip(DENSE_FRACTION[density] + rng.uniform(-0.03, 0.03), 0.02, 0.95))
    dense = glandular & (field >= np.quantile(field[glandular], 1 - fraction))
    dense_fraction = float(dense.sum() / glandular.sum())

    # 4. attenuation-like signal t in [0, 1]: fat, fibroglandular texture, pectoral muscle, noise
    grain = _noise(rng, (rows, cols), 1.2 * smooth)
    soft_dense = ndimage.gaussian_filter(dense.astype(np.float64), 2.0 * smooth)
    t = (0.18 + 0.2 * thickness + 0.34 * soft_dense * (0.8 + 0.1 * np.tanh(fine) + 0.1 * grain)
         + 0.02 * grain) * breast
    t = np.where(pectoral, 0.8 + 0.12 * np.clip(1 - reach, 0, 1) + 0.015 * grain, t)
    t += np.where(breast, rng.normal(0, 0.006, t.shape), np.abs(rng.normal(0, 0.004, t.shape)))

    # 5. lesion, drawn last so that the same seed gives the same breast with or without it
    lesion_mask = np.zeros_like(breast)
    if lesion is not None:
        lesion_mask, signal = _mass(rng, lesion, glandular, yy, xx, smooth)
        t += signal
        if not (lesion_mask <= glandular).all():
            raise RuntimeError("phantom lesion left the breast")

    peak, gamma, bits = VENDOR_CURVES[vendor]
    image = np.round(peak * np.clip(t, 0, 1) ** gamma).astype(np.uint16)
    arrays = [image, breast, lesion_mask, pectoral, dense]
    if laterality == "R":
        arrays = [np.ascontiguousarray(a[:, ::-1]) for a in arrays]
    return Mammogram(*arrays, bbox=_bbox(arrays[2]), view=view, laterality=laterality, density=density,
                     vendor=vendor, lesion=lesion, area=area, area_fraction=area_fraction,
                     dense_fraction=dense_fraction, bits_stored=bits)


def _mass(rng: np.random.Generator, kind: str, inside: np.ndarray, yy: np.ndarray, xx: np.ndarray,
          smooth: float) -> tuple[np.ndarray, np.ndarray]:
    """A benign (smooth ellipse) or malignant (irregular core + spicules) mass fully inside ``inside``."""
    radius = rng.uniform(7, 11) * smooth
    reach = 2.6 if kind == "malignant" else 1.0  # outermost extent in radii (spicules reach 2.5)
    depth = ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]  # the image border counts as outside
    while not (depth > reach * radius + 2).any():
        radius *= 0.8
    candidates = np.argwhere(depth > reach * radius + 2)
    cy, cx = candidates[rng.integers(len(candidates))]
    angle = rng.uniform(0, np.pi)
    du = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    dv = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    if kind == "benign":
        mask = np.hypot(du / radius, dv / (radius * rng.uniform(0.65, 1.0))) <= 1
        return mask, 0.22 * ndimage.gaussian_filter(mask.astype(np.float64), 0.8)
    theta = np.arctan2(dv, du)
    edge = 1 + sum(rng.uniform(0.03, 0.1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in range(3, 9))
    core = np.hypot(du, dv) <= radius * edge
    spicules = np.zeros_like(core)
    for a in rng.uniform(0, 2 * np.pi, rng.integers(7, 13)):
        steps = np.linspace(0, radius * rng.uniform(1.5, 2.5), int(6 * radius))
        spicules[np.round(cy + steps * np.sin(a)).astype(int), np.round(cx + steps * np.cos(a)).astype(int)] = True
    signal = 0.28 * ndimage.gaussian_filter(core.astype(np.float64), 0.6) + 0.14 * (spicules & ~core)
    return core | spicules, signal


# ------------------------------------------------------------------------------------------------ histology
# H&E-like tiles are mixed from stain concentrations (haematoxylin, eosin, DAB) with skimage's hed2rgb, so
# skimage.color.rgb2hed recovers them: nuclei are haematoxylin (purple-blue), stroma eosin (pink), HER2
# membranes DAB (brown).
_BASE_RADIUS = 3.0  # px, grade-1 nucleus
_GRADE_STYLE = {  # radius multiples, area covered by nuclei, shape irregularity, haematoxylin darkness, elongation
    1: dict(scale=(0.9, 1.15), coverage=0.14, irregular=0.03, dark=(0.9, 1.05), elong=(1.0, 1.15)),
    2: dict(scale=(1.5, 2.0), coverage=0.20, irregular=0.08, dark=(1.0, 1.2), elong=(1.0, 1.3)),
    3: dict(scale=(2.2, 3.3), coverage=0.28, irregular=0.2, dark=(1.3, 1.6), elong=(1.0, 1.5)),
}
# HER2 score -> (fraction of tumour cells stained, DAB intensity, fraction of each membrane stained)
_HER2_STYLE = {"0": (0.1, 0.12, 0.4), "1+": (0.5, 0.3, 0.55), "2+": (0.85, 0.6, 0.9), "3+": (1.0, 1.0, 1.0)}


def make_he_tile(seed: int | np.random.Generator = 0, size: int = 128, grade: int = 1) -> dict[str, Any]:
    """An H&E-like RGB tile whose nuclei follow a nuclear grade (1, 2, 3).

    Grade 1: small uniform round nuclei (~1x base radius); grade 2: 1.5-2x, mildly irregular; grade 3: 2.2-3.3x,
    pleomorphic (irregular outlines, variable sizes, elongated) and darker. Returns ``image`` uint8 (size, size, 3),
    ``nuclei_mask`` uint8 (0 background, 1 nucleus) and ``grade``.
    """
    rng = _rng(seed)
    grade = int(_pick("grade", grade, GRADES, key=lambda g: int(g) if str(g).isdigit() else g))
    tissue = _tissue(rng, _tile_size(size), grade)
    return {"image": _render(rng, tissue), "nuclei_mask": (tissue["labels"] > 0).astype(np.uint8), "grade": grade}


def make_ihc_pair(seed: int | np.random.Generator = 0, size: int = 128, her2: str = "0",
                  grade: int = 2) -> dict[str, Any]:
    """An H&E tile and the matching HER2 IHC tile of the same tissue layout (as BCI's paired sections).

    The IHC tile has a light haematoxylin counterstain and brown DAB on tumour-cell membranes; the share of
    stained cells, the intensity and the completeness of the membranes grow with the score '0' < '1+' < '2+' <
    '3+' (3+ also thicker). Returns ``he`` and ``ihc`` uint8 (size, size, 3), ``nuclei_mask``,
    ``membrane_mask`` (uint8 0/1: stained membrane) and ``her2``.
    """
    rng = _rng(seed)
    her2 = _pick("her2", str(her2).strip(), HER2_SCORES)
    grade = int(_pick("grade", grade, GRADES, key=lambda g: int(g) if str(g).isdigit() else g))
    tissue = _tissue(rng, _tile_size(size), grade)
    labels = tissue["labels"]
    he = _render(rng, tissue)
    # cells: pixels within a few px of a nucleus belong to the nearest one; membranes are the cell outlines
    depth, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    cells = np.where(depth <= 4, labels[iy, ix], 0)
    membrane = find_boundaries(cells, mode="inner") & (cells > 0) & (labels == 0)
    stained_share, intensity, completeness = _HER2_STYLE[her2]
    stained_cells = np.flatnonzero(rng.random(labels.max() + 1) < stained_share)  # same draws for every score
    gaps = _noise(rng, labels.shape, 2.0)
    membrane &= np.isin(cells, stained_cells[stained_cells > 0]) & (gaps >= np.quantile(gaps, 1 - completeness))
    if her2 == "3+":
        membrane = ndimage.binary_dilation(membrane) & (labels == 0)
    dab = 0.12 * intensity * ndimage.gaussian_filter(membrane.astype(np.float64), 0.5) / 0.6
    ihc = _render(rng, {**tissue, "h": 0.5 * tissue["h"], "e": 0.05 * tissue["e"]}, dab=dab)
    return {"he": he, "ihc": ihc, "nuclei_mask": (labels > 0).astype(np.uint8),
            "membrane_mask": membrane.astype(np.uint8), "her2": her2}


def make_benign_malignant_tile(seed: int | np.random.Generator = 0, size: int = 128,
                               label: str = "benign") -> dict[str, Any]:
    """A benign (glands: lumens lined by small regular nuclei in stroma) or malignant (dense sheet of large
    pleomorphic nuclei, no glands) H&E-like tile. Returns ``image``, ``nuclei_mask`` and ``label``."""
    rng = _rng(seed)
    label = _pick("label", str(label).lower(), ("benign", "malignant"))
    size = _tile_size(size)
    if label == "malignant":
        tissue = _tissue(rng, size, 3, coverage=0.34)
    else:
        tissue = _tissue(rng, size, 1, coverage=0.0)
        centres, radii = [], []
        for _ in range(max(1, round(size * size / 2500))):  # glands: a lumen ringed by epithelial nuclei
            lumen_r = rng.uniform(6, 11)
            outer = lumen_r + 2 * _BASE_RADIUS * 1.3 + 2
            spot = _free_spot(rng, size, outer, centres, radii)
            if spot is None:
                continue
            centres.append(spot), radii.append(outer)
            n = int(2 * np.pi * (lumen_r + 3.5) / (2 * _BASE_RADIUS + 1.5))
            for a in np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, np.pi):
                ring = lumen_r + 1 + _BASE_RADIUS
                _nucleus(rng, tissue, (spot[0] + ring * np.sin(a), spot[1] + ring * np.cos(a)),
                         _BASE_RADIUS * rng.uniform(0.9, 1.1), 0.03, rng.uniform(1.0, 1.2), rng.uniform(0.9, 1.05))
            yy, xx = np.ogrid[:size, :size]
            tissue["lumen"] |= np.hypot(yy - spot[0], xx - spot[1]) <= lumen_r
        for _ in range(round(size * size / 1200)):  # sparse spindle-shaped stromal nuclei between the glands
            spot = _free_spot(rng, size, 2 * _BASE_RADIUS, centres, radii)
            if spot is not None:
                centres.append(spot), radii.append(2 * _BASE_RADIUS)
                _nucleus(rng, tissue, spot, 0.7 * _BASE_RADIUS, 0.02, rng.uniform(2.0, 3.0), rng.uniform(0.8, 1.0))
    return {"image": _render(rng, tissue), "nuclei_mask": (tissue["labels"] > 0).astype(np.uint8), "label": label}


def _tissue(rng: np.random.Generator, size: int, grade: int, coverage: float | None = None) -> dict[str, Any]:
    """Stroma (eosin field, white spaces) plus non-touching nuclei of ``grade``'s style."""
    style = _GRADE_STYLE[grade]
    fibres = _noise(rng, (size, size), (1.0, 4.0))
    fibres = fibres if rng.random() < 0.5 else fibres.T
    spaces = _noise(rng, (size, size), 6.0)
    tissue = {"labels": np.zeros((size, size), np.int32), "h": np.zeros((size, size)),
              "e": 0.75 + 0.25 * np.tanh(fibres), "lumen": spaces > np.quantile(spaces, 0.93)}
    coverage = style["coverage"] if coverage is None else coverage
    mean_r = _BASE_RADIUS * np.mean(style["scale"])
    radii = np.sort(_BASE_RADIUS * rng.uniform(*style["scale"], int(coverage * size * size / (np.pi * mean_r ** 2))))
    centres: list = []
    reach: list = []
    for r in radii[::-1]:  # largest first: packs better
        irregular, elong = style["irregular"], rng.uniform(*style["elong"])
        extent = r * np.sqrt(elong) * (1 + 3 * irregular)
        spot = _free_spot(rng, size, extent, centres, reach)
        if spot is not None:
            centres.append(spot), reach.append(extent)
            _nucleus(rng, tissue, spot, r, irregular, elong, rng.uniform(*style["dark"]))
    return tissue


def _free_spot(rng: np.random.Generator, size: int, extent: float, centres: list, reach: list,
               tries: int = 40) -> tuple[float, float] | None:
    """A random centre whose disc of radius ``extent`` keeps 1.5 px from the discs already placed."""
    c, r = np.asarray(centres, float).reshape(-1, 2), np.asarray(reach, float)
    for spot in rng.uniform(0, size, (tries, 2)):
        if (np.hypot(*(c - spot).T) > r + extent + 1.5).all():
            return float(spot[0]), float(spot[1])
    return None


def _nucleus(rng: np.random.Generator, tissue: dict, centre: tuple[float, float], radius: float, irregular: float,
             elong: float, dark: float) -> None:
    """Rasterise one nucleus (rotated ellipse with a harmonic outline) into ``labels`` and haematoxylin ``h``."""
    labels = tissue["labels"]
    angle = rng.uniform(0, np.pi)
    harmonics = [(rng.uniform(0, irregular) * 2 / k, k, rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5)]
    extent = int(np.ceil(radius * np.sqrt(elong) * (1 + 3 * irregular))) + 1
    y0, x0 = max(int(centre[0]) - extent, 0), max(int(centre[1]) - extent, 0)
    y1, x1 = min(int(centre[0]) + extent + 2, labels.shape[0]), min(int(centre[1]) + extent + 2, labels.shape[1])
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1] - np.asarray(centre)[:, None, None]
    u = (xx * np.cos(angle) + yy * np.sin(angle)) / (radius * np.sqrt(elong))
    v = (-xx * np.sin(angle) + yy * np.cos(angle)) / (radius / np.sqrt(elong))
    theta = np.arctan2(v, u)
    inside = np.hypot(u, v) <= 1 + sum(a * np.cos(k * theta + p) for a, k, p in harmonics)
    inside &= labels[y0:y1, x0:x1] == 0
    labels[y0:y1, x0:x1][inside] = labels.max() + 1
    chromatin = 1 + 0.15 * rng.standard_normal(inside.shape)
    tissue["h"][y0:y1, x0:x1][inside] = (dark * chromatin)[inside]


def _render(rng: np.random.Generator, tissue: dict, dab: np.ndarray | None = None) -> np.ndarray:
    """Stain concentrations -> uint8 RGB; slight per-tile stain variation as between real slides."""
    nuclei = tissue["labels"] > 0
    h_scale, e_scale = rng.uniform(0.9, 1.1, 2)
    h = h_scale * (0.075 * ndimage.gaussian_filter(tissue["h"], 0.5) + 0.01)
    e = e_scale * 0.024 * tissue["e"] * np.where(tissue["lumen"] & ~nuclei, 0.12, 1.0) * np.where(nuclei, 0.6, 1.0)
    stains = np.stack([h, e, np.zeros_like(h) if dab is None else dab], axis=-1)
    return np.round(255 * hed2rgb(stains)).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ helpers
def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _pick(name: str, value: Any, allowed: tuple, key=lambda v: v) -> Any:
    value = key(value)
    if value not in allowed:
        raise BreastGenError(f"unknown {name} {value!r}; allowed: {', '.join(map(repr, allowed))}")
    return value


def _tile_size(size: Any) -> int:
    if not isinstance(size, (int, np.integer)) or size < 32:
        raise BreastGenError(f"tile size must be an integer of at least 32, not {size!r}")
    return int(size)


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: Any) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to zero mean and unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (field - field.mean()) / (field.std() + 1e-12)


def _bbox(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1] half-open bounding box of a bool mask (x = column), None if empty."""
    if not mask.any():
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
