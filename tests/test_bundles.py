"""Bundle harness: every bundles/*/ (and the fixture bundle) must be valid and run its demo end to end."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from breastgen.bundle import (build_network, check_bundle, demo_stages, example_inputs, export_network,
                              network_callable, validate_metadata, verify_network)
from breastgen.engines.checkpoints import load_checkpoint
from breastgen.errors import BreastGenError
from conftest import BUNDLES, FIXTURE, ROOT, network_check_params

ALL = [*BUNDLES, FIXTURE]
CHECKS = network_check_params()
# the networks MONAI's own verify_net_in_out / ckpt_export handle: one "image" input, a "pred" output
ONE_INPUT = [p for p in CHECKS if list(p.values[1]["inputs"].values()) == ["image"] and p.values[1]["output"] == "pred"]


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


# after the demo tests above (pytest keeps a module in order, on one worker): the demos are trained by now
def _eager(bundle, check, ckpt):
    net, _, check, fmt = build_network(bundle, check, demo=True)
    load_checkpoint(ckpt, {check.get("key_in_ckpt", "model"): net})
    return network_callable(net, check), fmt


@pytest.mark.parametrize("bundle,check", CHECKS)
def test_trained_demo_network_exports_to_torchscript(bundle, check, bundle_demo, tmp_path):
    from monai.data import load_net_with_metadata

    ckpt = bundle_demo(bundle) / check["checkpoint"]
    path = export_network(bundle, check, ckpt, tmp_path / "net.ts", demo=True)
    traced, meta, extra = load_net_with_metadata(str(path), more_extra_files=("inputs.json", "network_check.json"))
    assert meta["version"] == json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    assert json.loads(extra["inputs.json"]) == list(check["inputs"]) and "pytorch_version" in meta
    eager, fmt = _eager(bundle, check, ckpt)
    x = example_inputs(fmt, check, batch=3, seed=7)  # other values and batch size than the traced example
    with torch.no_grad():
        got, want = traced(*x.values()), eager(**x)
        fresh, _, _, _ = build_network(bundle, check, demo=True)  # untrained: the export must differ from it
        untrained = network_callable(fresh, check)(**x)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert not torch.allclose(untrained, got, atol=1e-3)


@pytest.mark.parametrize("bundle,check", ONE_INPUT)
def test_monai_verify_net_in_out_and_ckpt_export_on_one_input_networks(bundle, check, bundle_demo, tmp_path):
    """MONAI's own tools (what ``python -m monai.bundle verify_net_in_out`` / ``ckpt_export`` run), in-process."""
    from monai.bundle import ckpt_export, verify_net_in_out

    ckpt = bundle_demo(bundle) / check["checkpoint"]
    common = {"meta_file": str(bundle / "configs" / "metadata.json"), "bundle_root": str(bundle),
              "config_file": [str(bundle / "configs" / f) for f in [*check["configs"], "demo.json"]]}
    verify_net_in_out(check["net_id"], device="cpu", **common)
    ckpt_export(check["net_id"], filepath=str(tmp_path / "model.ts"), ckpt_file=str(ckpt),
                key_in_ckpt=check.get("key_in_ckpt", ""), use_trace=True, **common)
    eager, fmt = _eager(bundle, check, ckpt)
    x = example_inputs(fmt, check, batch=2, seed=3)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(tmp_path / "model.ts"))(*x.values()), eager(**x), atol=1e-5)


def test_network_checks_catch_wrong_metadata_and_bad_checkpoints(tmp_path, bundle_demo, capsys):
    from breastgen.bundle import main

    broken = tmp_path / "broken"
    shutil.copytree(FIXTURE, broken)
    meta_file = broken / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 3  # the classifier has 2 classes
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(BreastGenError, match=r"returns \(1, 2\) torch.float32; the metadata output 'pred' says "
                                             r"\(1, 3\)"):
        verify_network(broken, "classifier")
    demo = json.loads((broken / "configs" / "demo.json").read_text())
    demo["network_checks"][0]["inputs"] = {"x": "picture"}
    (broken / "configs" / "demo.json").write_text(json.dumps(demo))
    assert "network check 'classifier': 'picture' is not a metadata input" in check_bundle(broken)
    # the CLI (main): bad requests are refused in one line with exit code 2, and nothing is written
    other = bundle_demo(ROOT / "bundles" / "mammo_patch_classifier") / "models" / "model.pt"
    ours = bundle_demo(FIXTURE) / "models" / "model.pt"
    for ckpt, more, reason in ((tmp_path / "missing.pt", [], "no such checkpoint"),
                               (other, [], "does not fit the configured network"),
                               (ours, ["--overlay", "nosuch.json"], "nosuch.json: no such config file"),
                               (ours, ["--network", "unet"], "no network 'unet'; this bundle has: classifier")):
        with pytest.raises(SystemExit) as exit_:
            main(["export", str(FIXTURE), "--network", "classifier", "--ckpt", str(ckpt), "--out",
                  str(tmp_path / "x.ts"), "--demo", *more])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and reason in err and len(err.strip().splitlines()) == 1, err
        assert not list(tmp_path.glob("*x.ts*"))
    main(["export", str(FIXTURE), "--network", "classifier", "--ckpt", str(ours), "--out", str(tmp_path / "x.ts"),
          "--demo"])
    assert torch.jit.load(str(tmp_path / "x.ts"))(torch.rand(2, 1, 64, 64)).shape == (2, 2)
    main(["verify", str(FIXTURE)])
    assert "classifier: x (1, 1, 64, 64) -> (1, 2) as in the metadata" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip() == f"error: {tmp_path}/nowhere/configs/demo.json: no such file: " \
                                                    "is this a bundle folder?", err


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
