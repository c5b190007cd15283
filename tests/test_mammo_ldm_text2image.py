"""mammo_ldm_text2image: the demo model follows its prompts; inference outputs, determinism, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser

from breastgen.errors import BreastGenError, find_breastgen_error
from breastgen.engines.diffusion import check_request
from conftest import ROOT, run_bundle_cli

BUNDLE = ROOT / "bundles" / "mammo_ldm_text2image"
CONFIGS = BUNDLE / "configs"


@pytest.fixture(scope="module")
def demo(bundle_demo) -> Path:
    return bundle_demo(BUNDLE)


@pytest.fixture(scope="module")
def pipeline(demo, demo_data):
    p = ConfigParser()
    p.read_config([str(CONFIGS / f) for f in ("train.json", "inference.json", "demo.json")])
    p.update({"bundle_root": str(BUNDLE), "data_dir": str(demo_data), "output_dir": str(demo)})
    p.get_parsed_content("load")
    return p.get_parsed_content("pipeline")


def test_demo_samples_follow_the_area_prompt(demo):
    m = json.loads((demo / "metrics.json").read_text())
    small, medium, big = m["area_ratio_small_medium_big"]
    assert m["samples_per_prompt"] == 16
    assert small < medium < big, m["area_ratio_small_medium_big"]


def test_demo_samples_follow_the_view_prompt(demo):
    m = json.loads((demo / "metrics.json").read_text())
    # 16 CC + 16 MLO samples; the attribute classifier (trained on real phantoms) tells them apart above chance
    assert m["classifier_real_view_accuracy"] >= 0.75
    assert m["view_accuracy"] > 0.6, m


def test_demo_evaluation_outputs(demo):
    m = json.loads((demo / "metrics.json").read_text())
    assert np.isfinite(m["fid"]) and m["fid"] > 0
    rows = (demo / "diversity.csv").read_text().splitlines()
    assert rows[0] == "guidance_scale,ms_ssim,n" and len(rows) == 1 + 3
    assert all(0 < float(r.split(",")[1]) <= 1 for r in rows[1:])
    for f in ("diversity.png", "fidelity.csv", "fidelity_samples.png", "fid_generated_vs_real.png"):
        assert (demo / f).is_file(), f


def test_inference_writes_png_tiff_and_synthetic_dicom(demo):
    manifest = json.loads((demo / "generated" / "generated.json").read_text())
    assert len(manifest) == 2 * 2  # two prompts x num_samples 2 (demo)
    entry = manifest[0]
    from PIL import Image
    import tifffile

    png = np.asarray(Image.open(entry["files"]["png"]))
    tif = tifffile.imread(entry["files"]["tiff"])
    assert png.dtype == np.uint8 and png.shape == (64, 64)
    assert tif.dtype == np.uint16 and tif.shape == (64, 64) and len(np.unique(tif)) > 256
    ds = pydicom.dcmread(entry["files"]["dcm"])
    assert ds.Modality == "MG" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.BurnedInAnnotation == "NO" and ds.PatientIdentityRemoved == "YES"
    assert "SYNTHETIC" in str(ds.ImageComments).upper()
    for key in ("prompt", "seed", "sampler", "guidance_scale"):
        assert str(entry[key]) in str(ds.ImageComments)
    assert ds.pixel_array.shape == (64, 64) and ds.ViewPosition == "CC"


def test_same_seed_same_image_and_negative_prompt_matters(pipeline):
    prompt = ["a mammogram in MLO view with big area"]
    a = pipeline.sample(prompt, [7], num_inference_steps=10)
    b = pipeline.sample(prompt, [7], num_inference_steps=10)
    c = pipeline.sample(prompt, [8], num_inference_steps=10)
    d = pipeline.sample(prompt, [7], negative_prompt="a mammogram with small area", num_inference_steps=10)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)
    # a batch does not change an image: image k depends on its own seed only
    ab = pipeline.sample(prompt * 2, [8, 7], num_inference_steps=10)
    assert torch.allclose(ab[1], a, atol=1e-5)


@pytest.mark.parametrize("kwargs,needle", [
    ({"prompts": ["a canon mammogram"]}, "unknown vendor 'canon'"),
    ({"prompts": ["a mammogram with huge area"]}, "unknown area 'huge'"),
    ({"guidance_scale": -1.0}, "guidance_scale must be >= 0"),
    ({"num_inference_steps": 0}, "num_inference_steps must be at least 1"),
    ({"sampler": "ddpm", "num_inference_steps": 20}, "DDPM sampling runs all 1000 training steps"),
    ({"sampler": "euler"}, "unknown sampler 'euler'"),
    ({"laterality": "X"}, "unknown laterality"),
])
def test_bad_requests_are_refused_before_any_work(pipeline, kwargs, needle):
    args = {"prompts": ["a mammogram in CC view"], **kwargs}
    with pytest.raises(BreastGenError, match=needle):
        check_request(pipeline, **args)


def _run_cli(demo, demo_data, *extra):
    return run_bundle_cli(BUNDLE, ["train.json", "inference.json", "demo.json"], "--data_dir", str(demo_data), *extra)


def test_cli_bad_input_is_one_line_and_writes_nothing(demo, demo_data, tmp_path):
    out = tmp_path / "run"
    r = _run_cli(demo, demo_data, "--output_dir", str(demo), "--generated_dir", str(out),
                 "--prompts", "['a mammogram in AP view']")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == "error: unknown view 'ap'; allowed: 'CC', 'MLO'"
    assert not out.exists()
    r = _run_cli(demo, demo_data, "--output_dir", str(tmp_path / "nowhere"))
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "autoencoder.pt: checkpoint not found" in last


def test_bfloat16_unet_halves_the_weights_and_keeps_the_images(pipeline, demo, demo_data):
    """inference.json's unet_dtype: the UNet + text encoder built directly in bfloat16 (no float32 copy),
    sampled inside the float32 loop; images match float32 ones closely."""
    p = ConfigParser()
    p.read_config([str(CONFIGS / f) for f in ("train.json", "inference.json", "demo.json")])
    p.update({"bundle_root": str(BUNDLE), "data_dir": str(demo_data), "output_dir": str(demo), "unet_dtype": "bfloat16"})
    p.get_parsed_content("initialize")
    assert torch.get_default_dtype() == torch.float32  # restored after building
    p.get_parsed_content("load")
    half = p.get_parsed_content("pipeline")
    assert {q.dtype for q in half.network.parameters()} == {torch.bfloat16}
    assert {q.dtype for q in half.autoencoder.parameters()} == {torch.float32}
    prompts = ["a mammogram in CC view with small area", "a mammogram in MLO view with big area"]
    a = pipeline.sample(prompts, [0, 1], num_inference_steps=10)
    b = half.sample(prompts, [0, 1], num_inference_steps=10)
    assert b.dtype == torch.float32 and (a - b).abs().mean() < 0.02, float((a - b).abs().mean())
    p.update({"unet_dtype": "float64"})
    with pytest.raises(Exception) as e:  # MONAI wraps it; the excepthook prints our one line
        p.get_parsed_content("initialize")
    assert "unknown dtype 'float64'" in str(find_breastgen_error(e.value))
    torch.set_default_dtype(torch.float32)


def test_torchscript_export_of_the_text_conditioned_unet(pipeline, tmp_path):
    from breastgen.networks.export import export_torchscript

    net = pipeline.network
    x = torch.randn(2, *pipeline.latent_shape)
    t = torch.tensor([10, 500])
    ctx = pipeline.encode_prompts(["a mammogram in CC view", ""])
    path = export_torchscript(net, {"x": x, "timesteps": t, "context": ctx}, tmp_path / "unet.ts")
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, ctx), net(x, timesteps=t, context=ctx), atol=1e-4)


def test_multi_gpu_overlay_trains_with_torchrun_on_cpu(demo, demo_data, tmp_path):
    """DDP overlay: two CPU processes (gloo) train one diffusion epoch from the demo autoencoder."""
    import shutil

    (tmp_path / "models").mkdir()
    shutil.copy(demo / "models" / "autoencoder.pt", tmp_path / "models" / "autoencoder.pt")
    r = run_bundle_cli(BUNDLE, ["train.json", "train_diffusion.json", "demo.json", "demo_diffusion.json",
                                "multi_gpu_train_diffusion.json"],
                       "--data_dir", str(demo_data), "--output_dir", str(tmp_path), "--epochs", "1",
                       "--val_interval", "1000", nproc=2, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(tmp_path / "models" / "diffusion.pt", weights_only=True)
    assert set(state) == {"network", "scale"} and float(state["scale"]["value"]) > 0
