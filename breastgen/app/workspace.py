"""The app's temporary folder (uploads and outputs), upload checks and in-page messages.

Gradio stores uploads under ``GRADIO_TEMP_DIR``; the app points it into its own temporary folder, writes its
outputs there too, and removes the folder when it stops. Handlers run under :func:`guarded`: a user error
(:class:`~breastgen.errors.BreastGenError`, however deeply wrapped) becomes a one-line message in the tab's
status box, any other exception is logged with its traceback and reported in one line; the server keeps running.
"""

from __future__ import annotations

import functools
import html
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import BreastGenError, find_breastgen_error

__all__ = ["Workspace", "guarded", "status_html", "notice_html"]

logger = logging.getLogger(__name__)


class Workspace:
    """One temporary folder for everything the app writes: ``uploads/`` (Gradio's upload and cache folder) and
    ``outputs/<request>/``. Output folders older than ``keep_seconds`` are deleted as new ones are made."""

    def __init__(self, max_upload_mb: float = 50.0, keep_seconds: float = 3600.0, parent: str | None = None):
        if not max_upload_mb > 0:
            raise BreastGenError(f"upload size limit must be > 0 MB, got {max_upload_mb}")
        self.root = Path(tempfile.mkdtemp(prefix="breastgen-app-", dir=parent)).resolve()
        self.uploads = self.root / "uploads"
        self.outputs = self.root / "outputs"
        self.uploads.mkdir()
        self.outputs.mkdir()
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        self.keep_seconds = float(keep_seconds)
        os.environ["GRADIO_TEMP_DIR"] = str(self.uploads)  # read by gradio when the app is built

    def new_output_dir(self) -> Path:
        now = time.time()
        for old in self.outputs.iterdir():
            if now - old.stat().st_mtime > self.keep_seconds:
                shutil.rmtree(old, ignore_errors=True)
        out = self.outputs / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        out.mkdir()
        return out

    def guarded(self, n_outputs: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """:func:`guarded` showing uploads by their file name."""
        return guarded(n_outputs, self.uploads)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def upload(self, value: Any, examples: Mapping[str, Path], example: str | None, what: str,
               suffixes: Sequence[str], required: bool = True) -> Path | None:
        """The file to use: an upload (checked: inside this workspace, allowed suffix, size limit) or else a demo
        example picked by name (paths of examples never come from the browser). None when neither is given
        and ``required`` is false."""
        if value:
            path = Path(value if isinstance(value, (str, os.PathLike)) else getattr(value, "name", value)).resolve()
            if not path.is_relative_to(self.root) or not path.is_file():
                raise BreastGenError(f"the uploaded {what} is not in the app's upload folder", path.name)
            if path.suffix.lower() not in suffixes:
                raise BreastGenError(f"unsupported {what} file type {path.suffix or '(none)'!r}; allowed: "
                                     f"{', '.join(suffixes)}", path.name)
            size = path.stat().st_size
            if size > self.max_upload_bytes:
                raise BreastGenError(f"the uploaded {what} has {size / 2**20:.1f} MB; the limit is "
                                     f"{self.max_upload_bytes / 2**20:.0f} MB", path.name)
            return path
        if example and example in examples:
            return Path(examples[example])
        if required:
            raise BreastGenError(f"no {what}: upload one" + (" or pick a demo example" if examples else ""))
        return None


def _box(kind: str, text: str) -> str:
    return f"<div class='bg-status bg-{kind}'>{html.escape(text)}</div>"


def status_html(text: str, error: bool = False) -> str:
    """The status line of a tab: ``error: <reason>`` for failures."""
    return _box("error", f"error: {text}") if error else _box("ok", text)


def notice_html(text: str) -> str:
    """A notice at the top of a tab (missing bundle or checkpoint)."""
    return _box("notice", text)


def guarded(n_outputs: int, uploads: Path | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a Gradio handler whose first output is the status box: on any exception return the error message
    there and ``None`` for the other ``n_outputs - 1`` outputs (stale results are cleared). Paths of uploads
    (``<uploads>/<hash>/name``) are shown as their file name."""
    hide = re.compile(re.escape(str(uploads)) + r"/[^/\s:]+(?:/|: )") if uploads is not None else None

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - every failure is shown in the page; the server goes on
                user = find_breastgen_error(exc)
                if user is not None:
                    logger.info("%s: %s", fn.__name__, user)
                    message = str(user)
                else:
                    logger.exception("%s failed", fn.__name__)
                    message = f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:300]} (details in the server log)"
                if hide is not None:
                    message = hide.sub("", message)
                return (status_html(message, error=True), *([None] * (n_outputs - 1)))

        return wrapper

    return deco
