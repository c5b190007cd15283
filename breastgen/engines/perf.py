"""Small performance helpers for benchmarks and training scripts (CPU-oriented, no extra dependency).

* :func:`num_threads` -- context manager setting ``torch.set_num_threads`` and restoring it.
* :func:`physical_cores` -- CPU cores this process may use (affinity-aware).
* :func:`to_channels_last` -- put a network's 4-D parameters (and, through a forward pre-hook, its 4-D inputs)
  in ``torch.channels_last`` memory format.
* :func:`matmul_gflops` -- fp32 ``torch.mm`` throughput, the reference "peak" of this machine.
* :func:`count_flops` -- FLOPs of a callable (e.g. one forward + backward) with ``FlopCounterMode``.
* :class:`CallCounter` -- a module wrapper counting forward calls (e.g. UNet evaluations of a sampler).
* :class:`Stopwatch` -- wall-clock and process CPU time of a block. On a shared machine a single-threaded
  process's CPU time excludes the time it was descheduled, so it is far less noisy than wall time.
* :func:`timed` / :func:`median` -- wall-clock timing of repeated calls.
* :func:`load_average` -- ``os.getloadavg()`` rounded, to be reported with every figure on a shared machine.
* :func:`write_doc_block` -- replace a benchmark's marked block in a Markdown file (``docs/benchmarks.md``).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import BreastGenError

__all__ = ["num_threads", "physical_cores", "to_channels_last", "matmul_gflops", "count_flops", "CallCounter",
           "Stopwatch", "timed", "median", "load_average", "write_doc_block"]


def physical_cores() -> int:
    """Number of CPUs this process may run on (``sched_getaffinity``, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def num_threads(n: int | None, blas: bool = False) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(n)`` (None: leave as is); restores the previous value.

    With ``blas`` also limit the BLAS pools of NumPy / SciPy (OpenBLAS, MKL) to ``n`` threads through
    ``threadpoolctl`` when it is installed (e.g. the NumPy products of KID).
    """
    before = torch.get_num_threads()
    if n is not None:
        if int(n) < 1:
            raise BreastGenError(f"number of threads must be >= 1, got {n}")
        torch.set_num_threads(int(n))
    limiter: Any = contextlib.nullcontext()
    if blas and n is not None:
        try:
            from threadpoolctl import threadpool_limits

            limiter = threadpool_limits(limits=int(n), user_api="blas")
        except ImportError:
            pass
    try:
        with limiter:
            yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _channels_last_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    x = args[0] if args else kwargs.get("x")
    if isinstance(x, torch.Tensor) and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
        if args:
            args = (x, *args[1:])
        else:
            kwargs = {**kwargs, "x": x}
    return args, kwargs


def to_channels_last(module: nn.Module, inputs: bool = True) -> nn.Module:
    """Convert ``module`` in place to ``channels_last`` (4-D weights); with ``inputs`` also convert its 4-D
    first input on every call, so convolutions run in NHWC from the first layer on. Returns ``module``."""
    module.to(memory_format=torch.channels_last)
    if inputs and not getattr(module, "_breastgen_channels_last", False):
        module.register_forward_pre_hook(_channels_last_input, with_kwargs=True)
        module._breastgen_channels_last = True  # type: ignore[attr-defined]
    return module


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.wall`` and ``sw.cpu`` (process CPU seconds, all threads)."""

    def __enter__(self) -> "Stopwatch":
        self.wall = self.cpu = float("nan")
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def timed(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(max(0, warmup)):
        fn()
    out = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(values: Sequence[float]) -> float:
    if not values:
        raise BreastGenError("median of no values")
    return float(statistics.median(values))


def matmul_gflops(size: int = 2048, repeats: int = 5, threads: int | None = None, warmup: int = 1,
                  cpu_time: bool = False) -> list[float]:
    """fp32 ``torch.mm`` of two ``size x size`` matrices: GFLOP/s (2 n^3 FLOPs per product) of each repeat,
    from wall time, or with ``cpu_time`` from process CPU time (meaningful for one thread only)."""
    if size < 1:
        raise BreastGenError(f"matrix size must be >= 1, got {size}")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g)
    b = torch.randn(size, size, generator=g)
    out = torch.empty(size, size)
    secs = []
    with num_threads(threads):
        for i in range(max(0, warmup) + max(1, repeats)):
            with Stopwatch() as sw:
                torch.mm(a, b, out=out)
            if i >= warmup:
                secs.append(sw.cpu if cpu_time else sw.wall)
    return [2.0 * size**3 / max(s, 1e-9) / 1e9 for s in secs]


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs ``torch.utils.flop_counter.FlopCounterMode`` counts while running ``fn`` once (matmuls,
    convolutions and attention, forward and backward; element-wise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


class CallCounter(nn.Module):
    """Wraps a network and counts its forward calls (``calls``) and the batch rows it saw (``rows``).

    Attribute access falls through to the wrapped module for methods such as ``encode`` (text encoders), so
    the wrapper can replace a pipeline's network transparently.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.calls = 0
        self.rows = 0

    def reset(self) -> None:
        self.calls = self.rows = 0

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.rows += int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim else 1
        return self.module(x, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


def load_average() -> tuple[float, float, float]:
    """``os.getloadavg()`` rounded to 2 decimals ((nan, nan, nan) where unavailable)."""
    try:
        return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]
    except (AttributeError, OSError):
        return (float("nan"),) * 3  # type: ignore[return-value]


def write_doc_block(path: str | os.PathLike, name: str, body: str) -> None:
    """Put ``body`` between ``<!-- <name>:start -->`` and ``<!-- <name>:end -->`` in the Markdown file ``path``
    (replacing what was there, or appending the block), written atomically; the rest of the file is kept."""
    from pathlib import Path

    from ..io.atomic import atomic_write_text

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text and text.index(start) < text.index(end):
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, text)
