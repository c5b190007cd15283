"""MONAI datalist JSON: ``{"training": [...], "validation": [...], "test": [...]}``.

Entries are dicts with keys such as ``image``, ``label``, ``mask``, ``prompt``, ``bbox``, ``pair`` (a paired
image, e.g. the IHC tile of an H&E tile). Paths inside a datalist are relative to the datalist's folder
(``base_dir``) unless absolute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import BreastGenError
from ..io.atomic import atomic_write_json

__all__ = ["SECTIONS", "PATH_KEYS", "read_datalist_json", "load_datalist", "write_datalist"]

SECTIONS = ("training", "validation", "test")
PATH_KEYS = ("image", "mask", "pair", "target", "label_image")


def read_datalist_json(path: str | os.PathLike) -> dict[str, Any]:
    """The datalist file as a dict of sections; a missing file or malformed JSON raises one line."""
    path = Path(path)
    if not path.is_file():
        raise BreastGenError("datalist not found", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BreastGenError(f"not a valid JSON datalist ({e})", path) from None
    if not isinstance(data, dict):
        raise BreastGenError("datalist must be a JSON object with sections training / validation / test", path)
    return data


def load_datalist(path: str | os.PathLike, section: str = "training", base_dir: str | os.PathLike | None = None,
                  path_keys: tuple[str, ...] = PATH_KEYS, check_files: bool = True) -> list[dict[str, Any]]:
    """Entries of one section with file paths made absolute; a missing file raises naming it and the datalist."""
    path = Path(path)
    data = read_datalist_json(path)
    if section not in data:
        have = ", ".join(data)
        raise BreastGenError(f"datalist has no section {section!r} (it has: {have})", path)
    entries = data[section]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BreastGenError(f"section {section!r} must be a list of objects", path)
    base = Path(base_dir) if base_dir is not None else path.parent
    out = []
    for i, entry in enumerate(entries):
        e = dict(entry)
        for key in path_keys:
            if isinstance(e.get(key), str):
                p = Path(e[key]) if os.path.isabs(e[key]) else base / e[key]
                if check_files and not p.is_file():
                    raise BreastGenError(f"{section}[{i}].{key}: file not found: {p}", path)
                e[key] = str(p)
        out.append(e)
    return out


def write_datalist(path: str | os.PathLike, sections: dict[str, list[dict[str, Any]]]) -> Path:
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise BreastGenError(f"unknown datalist sections {sorted(unknown)}; allowed: {', '.join(SECTIONS)}", path)
    return atomic_write_json(path, {k: sections.get(k, []) for k in SECTIONS})
