"""Every network a bundle ships (demo.json ``network_checks``): full size against its metadata, trained demo
network exported to TorchScript, MONAI's verify_net_in_out / ckpt_export where the network has one input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from breastgen.bundle import (build_network, check_bundle, example_inputs, export_network, network_checks,
                              verify_network)
from breastgen.engines.checkpoints import load_checkpoint
from breastgen.errors import BreastGenError
from conftest import BUNDLES, FIXTURE, ROOT

CHECKS = [pytest.param(b, c, id=f"{b.name}-{c['name']}") for b in [*BUNDLES, FIXTURE] for c in network_checks(b)]
# the networks MONAI's own verify_net_in_out / ckpt_export handle: one "image" input, a "pred" output
ONE_INPUT = [p for p in CHECKS if list(p.values[1]["inputs"].values()) == ["image"] and p.values[1]["output"] == "pred"]


@pytest.mark.parametrize("bundle,check", CHECKS)
def test_full_size_network_takes_and_returns_what_the_metadata_says(bundle, check):
    """The default (full-size) network of every check, randomly initialised, on metadata-shaped inputs."""
    shapes = verify_network(bundle, check)  # raises on a shape / dtype mismatch or non-finite output
    out = json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]
    entry = out[check["output"]]
    assert torch.Size(shapes["output"]).numel() == entry["num_channels"] * torch.Size(entry["spatial_shape"]).numel()


@pytest.mark.parametrize("overlay", ["attention.json", "unet_baseline.json"])
def test_generator_variants_take_and_return_what_the_metadata_says(overlay):
    bundle = ROOT / "bundles" / "he2ihc_pyramidpix2pix"
    assert verify_network(bundle, "generator", overlays=[overlay])["output"] == (1, 3, 512, 512)
    net = build_network(bundle, "generator", overlays=[overlay])[0]
    assert type(net).__name__ == ("UNetGenerator" if overlay == "unet_baseline.json" else "ResnetGenerator")
    assert any("Attention" in type(m).__name__ for m in net.modules()) == (overlay == "attention.json")


def _eager(bundle, check, ckpt):
    net, _, check, fmt = build_network(bundle, check, demo=True)
    load_checkpoint(ckpt, {check.get("key_in_ckpt", "model"): net})
    return (getattr(net, check["method"]) if check.get("method") else net), fmt


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
        untrained = (getattr(fresh, check["method"]) if check.get("method") else fresh)(**x)
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
