"""Shared fixtures: the demo phantoms (built once per session) and bundle demo runs (once per bundle)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p for p in (ROOT / "bundles").glob("*") if (p / "configs").is_dir())
FIXTURE = ROOT / "tests" / "fixtures" / "tiny_bundle"  # the harness's own minimal bundle


def network_check_params() -> list:
    """pytest params (bundle, check) for every demo.json ``network_checks`` entry of every bundle and the fixture."""
    from breastgen.bundle import network_checks

    return [pytest.param(b, c, id=f"{b.name}-{c['name']}") for b in [*BUNDLES, FIXTURE] for c in network_checks(b)]
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def run_bundle_cli(bundle: Path, configs: list[str], *args: str, nproc: int = 1,
                   timeout: float | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` with ``bundle``'s ``configs`` (names in its configs/) and further arguments,
    one torch thread; ``nproc`` > 1 runs it under ``torch.distributed.run`` (CPU processes, gloo, a free port).
    Returns the finished process (stdout / stderr as text)."""
    files = [str(Path(bundle) / "configs" / f) for f in configs]
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"] \
        if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "monai.bundle", "run", "--config_file", str(files), "--bundle_root",
           str(bundle), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=timeout)


def free_port() -> int:
    """A free localhost TCP port (torchrun rendezvous, servers): fixed ports collide between parallel workers."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _shared_dir(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this run sees (the per-worker base temp's parent), else the base temp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _once(folder: Path, build) -> Path:
    """``build(folder)`` exactly once across pytest-xdist workers (file lock + done marker); a failure is recorded,
    so the other workers fail with the same reason instead of running it again."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    done, failed = folder.with_name(folder.name + ".done"), folder.with_name(folder.name + ".failed")
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.is_file():
            raise RuntimeError(f"{folder.name} failed in another worker: {failed.read_text()}")
        if not done.is_file():
            try:
                build(folder)
            except BaseException as e:
                failed.write_text(f"{type(e).__name__}: {e}")
                raise
            done.touch()
    return folder


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The demo phantoms, built by the same script `make demo` uses (reused from BREASTGEN_DEMO_DATA if set);
    built once per test run, shared by pytest-xdist workers."""
    given = os.environ.get("BREASTGEN_DEMO_DATA")
    if given and (Path(given) / "mammo" / "datalist.json").is_file():
        return Path(given)
    return _once(_shared_dir(tmp_path_factory) / "demo_data", lambda out: subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--out", str(out)], check=True,
        capture_output=True))


_demo_runs: dict[str, Path] = {}


@pytest.fixture(scope="session")
def bundle_demo(demo_data, tmp_path_factory):
    """``bundle_demo(bundle_dir)`` runs that bundle's demo stages once per test run (shared by pytest-xdist
    workers); returns its output folder.

    With ``BREASTGEN_DEMO_OUT`` set to the output folder of an earlier demo run (``make demo`` writes
    ``demo_out/<bundle>``), bundles found there are not trained again."""
    from breastgen.bundle import demo_requires, run_demo

    reuse = os.environ.get("BREASTGEN_DEMO_OUT")  # e.g. demo_out/ of an earlier `make demo` with the same code
    shared = _shared_dir(tmp_path_factory) / "demos"

    def run(bundle_dir: Path) -> Path:
        key = str(bundle_dir)
        done = Path(reuse) / Path(bundle_dir).name if reuse else None
        if done is not None and (done / "metrics.json").is_file():
            _demo_runs.setdefault(key, done)
        if key not in _demo_runs:
            needed = {k: str(run(ROOT / "bundles" / name)) for k, name in demo_requires(bundle_dir).items()}
            name = Path(bundle_dir).name if Path(bundle_dir).parent == ROOT / "bundles" else \
                f"{Path(bundle_dir).parent.name}_{Path(bundle_dir).name}"
            _demo_runs[key] = _once(shared / name,
                                    lambda out: run_demo(bundle_dir, demo_data, out, extra_overrides=needed))
        return _demo_runs[key]

    return run
