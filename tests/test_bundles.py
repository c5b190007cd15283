"""Bundle harness: every bundles/*/ (and the fixture bundle) must be valid and run its demo end to end."""

from __future__ import annotations

import json
import shutil

import pytest

from breastgen.bundle import check_bundle, demo_stages, validate_metadata
from breastgen.errors import BreastGenError
from conftest import BUNDLES, FIXTURE, ROOT

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


def test_run_demo_runs_required_demos_first_and_in_parallel(tmp_path, demo_data):
    """scripts/run_demo.py's scheduler on stand-in bundles whose one stage writes its start/end times."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_demo", ROOT / "scripts" / "run_demo.py")
    run_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_demo)
    stage = {"imports": ["$import json", "$import pathlib", "$import time"], "bundle_root": ".", "data_dir": "",
             "output_dir": "", "unused_dir": "",
             "run": ["$pathlib.Path(@output_dir).mkdir(parents=True, exist_ok=True)",
                     "$pathlib.Path(@output_dir, 'start').write_text(str(time.time()))",
                     "$time.sleep(3)",
                     "$pathlib.Path(@output_dir, 'metrics.json').write_text(json.dumps({'end': time.time()}))"]}
    bundles = []
    for name, requires in (("a", None), ("b", None), ("c_needs_a", "a"), ("d_broken", None), ("e_needs_d", "d_broken")):
        b = tmp_path / "bundles" / name
        shutil.copytree(FIXTURE, b)
        (b / "configs" / "train.json").write_text(json.dumps(stage) if name != "d_broken" else "{ not json")
        demo = {"demo_stages": [{"name": "train", "configs": ["train.json"]}]}
        if requires:
            demo["demo_requires"] = {"unused_dir": requires}
        (b / "configs" / "demo.json").write_text(json.dumps(demo))
        bundles.append(b)
    out = tmp_path / "out"
    results = run_demo.run_all(bundles, demo_data, out, jobs=2)
    assert set(results) == {b.name for b in bundles}
    times = {n: (float((out / n / "start").read_text()), json.loads((out / n / "metrics.json").read_text())["end"])
             for n in ("a", "b", "c_needs_a")}
    assert times["a"][0] < times["b"][1] and times["b"][0] < times["a"][1]  # a and b ran side by side
    assert times["c_needs_a"][0] >= times["a"][1]  # c waited for a
    assert "error" in results["d_broken"] and (out / "d_broken" / "demo.log").is_file()
    assert results["e_needs_d"] == {"error": "needs the d_broken demo, which failed"}
    assert not (out / "e_needs_d").exists()
