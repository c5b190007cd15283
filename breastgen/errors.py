"""One exception type for user mistakes, and the one-line reporting of it.

Every reader, transform and script raises :class:`BreastGenError` for bad input (corrupt file, wrong modality,
mask of the wrong size, unknown prompt word ...). Command-line entry points (our scripts and
``python -m monai.bundle`` once a config has imported ``breastgen``) print it as one line and exit non-zero.
Set ``BREASTGEN_TRACEBACK=1`` to see the full traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["BreastGenError", "find_breastgen_error", "one_line", "install_excepthook", "main_guard", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 2


class BreastGenError(ValueError):
    """A user-facing error: ``str(err)`` is one line, naming the file (when there is one) and the reason.

    Constructed as ``BreastGenError(reason, path=...)`` or ``BreastGenError("one line message")`` (the
    single-argument form lets PyTorch DataLoader workers re-raise it in the main process).
    """

    def __init__(self, reason: str, path: Any = None):
        reason = " ".join(str(reason).split())  # always one line
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


def find_breastgen_error(exc: BaseException | None) -> BaseException | None:
    """The first :class:`BreastGenError` in the cause/context chain of ``exc`` (MONAI and Ignite wrap errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, BreastGenError):
            return exc
        # a DataLoader worker re-raises with the worker traceback in the message; keep its last line
        msg = str(exc)
        if "BreastGenError" in msg and "Traceback" in msg:
            last = [ln for ln in msg.splitlines() if ln.strip()][-1]
            return BreastGenError(last.split("BreastGenError:", 1)[-1].strip())
        exc = exc.__cause__ or exc.__context__
    return None


def one_line(exc: BaseException) -> str:
    return f"error: {exc}"


def _hook(previous: Callable) -> Callable:
    def hook(exc_type, exc, tb):
        user_error = find_breastgen_error(exc)
        if user_error is None or os.environ.get("BREASTGEN_TRACEBACK"):
            return previous(exc_type, exc, tb)
        print(one_line(user_error), file=sys.stderr)
        sys.stderr.flush()
        os._exit(EXIT_USER_ERROR)  # sys.exit would be ignored inside an excepthook

    hook._breastgen = True  # type: ignore[attr-defined]
    return hook


def install_excepthook() -> None:
    """Make an uncaught BreastGenError (however deeply wrapped) print one line and exit with code 2."""
    if not getattr(sys.excepthook, "_breastgen", False):
        sys.excepthook = _hook(sys.excepthook)


def main_guard(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for script ``main`` functions: user errors become one line on stderr and exit code 2."""

    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only user errors are reformatted, others re-raise
            user_error = find_breastgen_error(exc)
            if user_error is None or os.environ.get("BREASTGEN_TRACEBACK"):
                raise
            print(one_line(user_error), file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None

    wrapped.__name__ = getattr(main, "__name__", "main")
    wrapped.__doc__ = main.__doc__
    return wrapped
