"""Bundle harness: every bundles/*/ (and the fixture bundle) must be valid and run its demo end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from breastgen.bundle import check_bundle, demo_stages, validate_metadata
from breastgen.errors import BreastGenError
from conftest import BUNDLES, ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "tiny_bundle"
ALL = [*BUNDLES, FIXTURE]


@pytest.mark.parametrize("bundle", ALL, ids=lambda p: p.name)
def test_bundle_layout_metadata_and_configs(bundle):
    assert check_bundle(bundle) == []
    meta = validate_metadata(bundle / "configs" / "metadata.json")
    assert meta["monai_version"].startswith("1.6") and meta["pytorch_version"].startswith("2.13")
    names = [s["name"] for s in demo_stages(bundle)]
    assert names[0].startswith("train") and "evaluate" in names


@pytest.mark.parametrize("bundle", ALL, ids=lambda p: p.name)
def test_bundle_demo_runs_and_writes_metrics_and_samples(bundle, bundle_demo):
    out = bundle_demo(bundle)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics and all(v is not None for v in metrics.values())
    assert list(out.rglob("*.png")), "a demo writes sample PNGs"


def test_fixture_bundle_learns_the_view(bundle_demo):
    # the phantoms' CC and MLO shapes differ (pectoral muscle): a working pipeline separates them
    metrics = json.loads((bundle_demo(FIXTURE) / "metrics.json").read_text())
    assert metrics["view_accuracy"] >= 0.75, metrics


def test_harness_reports_broken_bundles(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(FIXTURE, broken)
    meta = json.loads((broken / "configs" / "metadata.json").read_text())
    meta["version"] = "0.2.0"  # not in the changelog
    del meta["network_data_format"]
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    (broken / "configs" / "evaluate.json").unlink()
    (broken / "configs" / "inference.json").write_text("{ not json")
    problems = " | ".join(check_bundle(broken))
    assert "missing configs/evaluate.json" in problems
    assert "'network_data_format' is a required property" in problems
    assert "version '0.2.0' is not listed in the changelog" in problems
    assert "inference.json does not parse" in problems
    with pytest.raises(BreastGenError, match="MONAI schema"):
        validate_metadata(broken / "configs" / "metadata.json")
