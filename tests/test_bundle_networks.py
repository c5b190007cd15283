"""Every network a bundle ships (demo.json ``network_checks``), full size and randomly initialised, against its
metadata. (The trained demo networks' TorchScript export is in test_bundles.py, after the demos it needs.)"""

from __future__ import annotations

import json

import pytest
import torch

from breastgen.bundle import build_network, verify_network
from conftest import ROOT, network_check_params

CHECKS = network_check_params()


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
