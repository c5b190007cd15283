"""MAM-E prompt grammar: build and parse text prompts for mammogram synthesis.

Canonical form (any attribute may be omitted)::

    a {vendor} mammogram in {CC|MLO} view with {very low|low|high|very high} density and {small|medium|big} area

The parser also accepts MAM-E's other order ("... with {area} area and {density} density"), BI-RADS letters
in :func:`build_prompt`, and any capitalisation. Unknown words raise :class:`~breastgen.errors.BreastGenError`
listing the allowed ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import BreastGenError

__all__ = [
    "VIEWS", "DENSITIES", "AREAS", "DEFAULT_VENDORS", "BIRADS_TO_DENSITY", "AREA_THRESHOLDS",
    "PromptAttributes", "build_prompt", "parse_prompt", "density_word", "area_class", "vendor_word",
    "PATHOLOGIES", "LESION_TYPES", "NORMAL_PROMPT", "build_lesion_prompt", "parse_lesion_prompt",
]

VIEWS = ("CC", "MLO")
DENSITIES = ("very low", "low", "high", "very high")
AREAS = ("small", "medium", "big")
# MAM-E's two vendors first; sites add theirs with `vendors=`
DEFAULT_VENDORS = ("siemens", "hologic", "ge", "philips", "fujifilm", "planmed", "agfa", "kodak")
BIRADS_TO_DENSITY = {"A": "very low", "B": "low", "C": "high", "D": "very high"}
# MAM-E: breast-pixel ratio < 0.4 small, < 0.6 medium, else big
AREA_THRESHOLDS = (0.4, 0.6)
_MANUFACTURER_HINTS = {"siemens": "siemens", "hologic": "hologic", "lorad": "hologic", "ge ": "ge", "ge_": "ge",
                       "general electric": "ge", "philips": "philips", "fuji": "fujifilm", "planmed": "planmed",
                       "agfa": "agfa", "kodak": "kodak", "carestream": "kodak"}


@dataclass(frozen=True)
class PromptAttributes:
    vendor: str | None = None
    view: str | None = None
    density: str | None = None
    area: str | None = None

    def as_dict(self) -> dict:
        return {"vendor": self.vendor, "view": self.view, "density": self.density, "area": self.area}


def _allowed(kind: str, allowed: Iterable[str], got: object) -> BreastGenError:
    return BreastGenError(f"unknown {kind} {got!r}; allowed: {', '.join(repr(a) for a in allowed)}")


def density_word(value: object) -> str:
    """BI-RADS density (A-D, 1-4, 'DENSITY C', or already a word) -> 'very low' | 'low' | 'high' | 'very high'."""
    s = " ".join(str(value).strip().lower().replace("_", " ").split())
    if s in DENSITIES:
        return s
    s = s.removeprefix("density").removeprefix("birads").removeprefix("bi-rads").strip().upper()
    if s in BIRADS_TO_DENSITY:
        return BIRADS_TO_DENSITY[s]
    if s in ("1", "2", "3", "4"):
        return DENSITIES[int(s) - 1]
    raise _allowed("density", list(BIRADS_TO_DENSITY) + list(DENSITIES), value)


def area_class(ratio: float, thresholds: tuple[float, float] = AREA_THRESHOLDS) -> str:
    """Breast-pixel ratio in [0, 1] -> 'small' | 'medium' | 'big' (MAM-E's classes)."""
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise BreastGenError(f"breast area ratio must be in [0, 1], got {ratio}")
    return "small" if ratio < thresholds[0] else "medium" if ratio < thresholds[1] else "big"


def vendor_word(manufacturer: object, vendors: Iterable[str] = DEFAULT_VENDORS) -> str | None:
    """DICOM Manufacturer ('HOLOGIC, Inc.', 'SIEMENS', 'GE MEDICAL SYSTEMS', ...) -> prompt vendor word or None."""
    if manufacturer is None:
        return None
    m = f"{str(manufacturer).strip().lower()} "
    vendors = tuple(vendors)
    for hint, word in _MANUFACTURER_HINTS.items():
        if m.startswith(hint) or (len(hint) > 3 and hint in m):
            return word if word in vendors else None
    first = m.split()[0].strip(",.") if m.strip() else ""
    return first if first in vendors else None


def _norm_view(view: object) -> str:
    v = str(view).strip().upper()
    if v not in VIEWS:
        raise _allowed("view", VIEWS, view)
    return v


def build_prompt(vendor: str | None = None, view: str | None = None, density: object = None,
                 area: str | None = None, vendors: Iterable[str] = DEFAULT_VENDORS) -> str:
    """Build a canonical MAM-E prompt; omitted (None) attributes are left out of the sentence."""
    vendors = tuple(v.lower() for v in vendors)
    parts = ["a"]
    if vendor is not None:
        v = str(vendor).strip().lower()
        if v not in vendors:
            raise _allowed("vendor", vendors, vendor)
        parts.append(v)
    parts.append("mammogram")
    if view is not None:
        parts += ["in", _norm_view(view), "view"]
    tail = []
    if density is not None:
        tail.append(f"{density_word(density)} density")
    if area is not None:
        a = str(area).strip().lower()
        if a not in AREAS:
            raise _allowed("area", AREAS, area)
        tail.append(f"{a} area")
    if tail:
        parts += ["with", " and ".join(tail)]
    return " ".join(parts)


_PROMPT_RE = re.compile(
    r"^an? (?:(?P<vendor>[a-z0-9\-]+) )?mammogram(?: in (?P<view>[a-z]+) view)?(?: with (?P<tail>.+))?$")
_TAIL_RE = re.compile(r"^(?P<value>.+?) (?P<kind>density|area)$")


def parse_prompt(prompt: str, vendors: Iterable[str] = DEFAULT_VENDORS) -> PromptAttributes:
    """Parse a MAM-E prompt into its attributes; raises BreastGenError naming the offending word."""
    vendors = tuple(v.lower() for v in vendors)
    text = " ".join(str(prompt).strip().lower().rstrip(".").split())
    m = _PROMPT_RE.match(text)
    if m is None:
        raise BreastGenError(
            f"cannot parse prompt {prompt!r}; expected 'a [vendor] mammogram [in CC|MLO view] "
            f"[with <density> density] [and <area> area]'")
    vendor = m.group("vendor")
    if vendor is not None and vendor not in vendors:
        raise _allowed("vendor", vendors, vendor)
    view = _norm_view(m.group("view")) if m.group("view") else None
    found: dict[str, str] = {}
    if m.group("tail"):
        for clause in m.group("tail").split(" and "):
            t = _TAIL_RE.match(clause.strip())
            if t is None:
                raise BreastGenError(f"cannot parse {clause!r} in prompt {prompt!r}; expected '<value> density' "
                                     f"(one of {', '.join(DENSITIES)}) or '<value> area' (one of {', '.join(AREAS)})")
            kind, value = t.group("kind"), t.group("value")
            if kind in found:
                raise BreastGenError(f"prompt {prompt!r} gives the {kind} twice")
            allowed = DENSITIES if kind == "density" else AREAS
            if value not in allowed:
                raise _allowed(kind, allowed, value)
            found[kind] = value
    return PromptAttributes(vendor=vendor, view=view, density=found.get("density"), area=found.get("area"))


# ------------------------------------------------------------------------------------ lesion inpainting
# MAM-E's inpainting prompt is always "a mammogram with a lesion"; the attributes are its proposed extension.
PATHOLOGIES = ("benign", "malignant")
LESION_TYPES = ("lesion", "mass", "calcification")
NORMAL_PROMPT = "a mammogram"  # a fill of normal tissue (random masks on lesion-free images)
_LESION_RE = re.compile(r"^a mammogram(?: with an? (?P<words>.+))?$")


def build_lesion_prompt(pathology: object = None, lesion_type: object = "lesion") -> str:
    """``"a mammogram with a [benign|malignant] {lesion|mass|calcification}"``; ``lesion_type=None`` gives the
    normal-tissue prompt ``"a mammogram"``. A datalist label 'normal' / '' / None means no pathology word."""
    if lesion_type is None:
        return NORMAL_PROMPT
    kind = str(lesion_type).strip().lower()
    if kind not in LESION_TYPES:
        raise _allowed("lesion type", LESION_TYPES, lesion_type)
    path = None if pathology is None else str(pathology).strip().lower()
    if path in ("", "normal", "none", "unknown"):
        path = None
    if path is not None and path not in PATHOLOGIES:
        raise _allowed("pathology", PATHOLOGIES, pathology)
    return f"a mammogram with a {path + ' ' if path else ''}{kind}"


def parse_lesion_prompt(prompt: str) -> dict:
    """Parse an inpainting prompt -> ``{"lesion_type": ..., "pathology": ...}`` (both None for the normal prompt)."""
    text = " ".join(str(prompt).strip().lower().rstrip(".").split())
    m = _LESION_RE.match(text)
    words = m.group("words").split() if m and m.group("words") else []
    if m is None or len(words) > 2:
        raise BreastGenError(f"cannot parse inpainting prompt {prompt!r}; expected '{NORMAL_PROMPT}' or 'a mammogram "
                             f"with a [{'|'.join(PATHOLOGIES)}] {{{'|'.join(LESION_TYPES)}}}'")
    if not words:
        return {"lesion_type": None, "pathology": None}
    if words[-1] not in LESION_TYPES:
        raise _allowed("lesion type", LESION_TYPES, words[-1])
    if len(words) == 2 and words[0] not in PATHOLOGIES:
        raise _allowed("pathology", PATHOLOGIES, words[0])
    return {"lesion_type": words[-1], "pathology": words[0] if len(words) == 2 else None}
