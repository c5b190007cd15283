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
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The demo phantoms, built by the same script `make demo` uses (reused from BREASTGEN_DEMO_DATA if set)."""
    given = os.environ.get("BREASTGEN_DEMO_DATA")
    if given and (Path(given) / "mammo" / "datalist.json").is_file():
        return Path(given)
    out = tmp_path_factory.mktemp("demo_data")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--out", str(out)], check=True,
                   capture_output=True)
    return out


_demo_runs: dict[str, Path] = {}


@pytest.fixture(scope="session")
def bundle_demo(demo_data, tmp_path_factory):
    """``bundle_demo(bundle_dir)`` runs that bundle's demo stages once per session; returns its output folder.

    With ``BREASTGEN_DEMO_OUT`` set to the output folder of an earlier demo run (``make demo`` writes
    ``demo_out/<bundle>``), bundles found there are not trained again."""
    from breastgen.bundle import demo_requires, run_demo

    reuse = os.environ.get("BREASTGEN_DEMO_OUT")  # e.g. demo_out/ of an earlier `make demo` with the same code

    def run(bundle_dir: Path) -> Path:
        key = str(bundle_dir)
        done = Path(reuse) / Path(bundle_dir).name if reuse else None
        if done is not None and (done / "metrics.json").is_file():
            _demo_runs.setdefault(key, done)
        if key not in _demo_runs:
            needed = {k: str(run(ROOT / "bundles" / name)) for k, name in demo_requires(bundle_dir).items()}
            out = tmp_path_factory.mktemp(Path(bundle_dir).name)
            run_demo(bundle_dir, demo_data, out, extra_overrides=needed)
            _demo_runs[key] = out
        return _demo_runs[key]

    return run
