"""mammo_cigan_infill: boundary weights, losses, bounded generator, class conditioning, context-preserving
infill of patches and full mammograms, trainer schedule / resume, bad input, demo and DDP overlay."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import pydicom
import torch
from ignite.engine import Events
from monai.handlers import CheckpointSaver
from PIL import Image

from breastgen.data.patches import corrupt_with_noise, place_lesion_mask
from breastgen.data.phantoms import make_mammogram
from breastgen.data.readers import load_image
from breastgen.engines import ResumeFromLatest, load_checkpoint
from breastgen.engines.cigan import CIGANTrainer, infill_image, infill_patches, run_infill_jobs
from breastgen.errors import BreastGenError
from breastgen.losses.cigan import (BoundaryLoss, CIGANReconstructionLoss, MaskedL1Loss, PerceptualLoss,
                                    VGG19Features, boundary_weight_map, mask_rim, perceptual_weights)
from breastgen.networks.cigan import CascadedRefinementGenerator, ConditionalPatchDiscriminator
from conftest import ROOT, run_bundle_cli

BUNDLE = ROOT / "bundles" / "mammo_cigan_infill"


def _small_g(seed: int = 0) -> CascadedRefinementGenerator:
    torch.manual_seed(seed)
    return CascadedRefinementGenerator(3, widths=(16, 16, 8, 8, 8))  # 64 x 64


# ------------------------------------------------------------------------------------------------ losses
def test_boundary_weight_map_peaks_on_rim_and_decays_with_sigma_10():
    mask = np.zeros((200, 200), bool)
    mask[60:140, 60:140] = True
    w = boundary_weight_map(mask)  # sigma = 10 (paper)
    rim = mask_rim(mask)
    assert np.allclose(w[rim], 1.0) and w.max() == pytest.approx(1.0)
    assert (w[~rim] < 1.0).all()
    # along the row y = 100: outer rim at x = 59, inner rim at x = 60; distance d from the rim -> exp(-d^2/200)
    for d in (1, 5, 10, 20, 30):
        assert w[59 - d, 100] == pytest.approx(np.exp(-d * d / 200.0), rel=1e-6)  # outside
        assert w[60 + d, 100] == pytest.approx(np.exp(-d * d / 200.0), rel=1e-6)  # inside
    assert w[59 - 10, 100] == pytest.approx(np.exp(-0.5), rel=1e-6)  # one sigma
    profile = w[0:100, 100]
    assert (np.diff(profile[:60]) > 0).all() and (np.diff(profile[60:100]) < 0).all()  # rises to the rim, falls
    # batched torch input gives the same map; an empty mask has no rim
    t = torch.from_numpy(np.stack([mask, np.zeros_like(mask)])[:, None].astype(np.float32))
    wt = boundary_weight_map(t)
    assert torch.allclose(wt[0, 0], torch.from_numpy(w)) and float(wt[1].abs().max()) == 0.0
    assert boundary_weight_map(mask, sigma=5)[59 - 5, 100] == pytest.approx(np.exp(-0.5), rel=1e-6)


def test_boundary_and_masked_l1_losses_match_their_definitions():
    torch.manual_seed(0)
    fake, real = torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64)
    m = torch.zeros(2, 1, 64, 64)
    m[:, :, 20:40, 16:36] = 1
    w = torch.from_numpy(np.stack([boundary_weight_map(m[i, 0].numpy()) for i in range(2)]))[:, None]
    assert BoundaryLoss()(fake, real, m) == pytest.approx(float(1000 * (w * (fake - real).abs()).mean()), rel=1e-5)
    ref = np.mean([float((fake[i] - real[i]).abs()[m[i] > 0].mean()) for i in range(2)])
    assert MaskedL1Loss()(fake, real, m) == pytest.approx(ref, rel=1e-5)


def test_perceptual_loss_is_off_without_weights_and_uses_a_local_vgg19_file(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="breastgen.losses.cigan"):
        loss = CIGANReconstructionLoss()
    assert not loss.perceptual.enabled and "perceptual loss off" in caplog.text
    x = torch.rand(2, 1, 64, 64)
    m = torch.zeros_like(x)
    m[..., 20:40, 20:40] = 1
    assert "perceptual" not in loss(x, x, m)
    torch.manual_seed(0)
    vgg = VGG19Features()
    full = {**vgg.state_dict(), "classifier.0.weight": torch.zeros(4096, 25088 // 64)}  # torchvision-like extras
    torch.save(full, tmp_path / "vgg19.pt")
    on = CIGANReconstructionLoss(vgg_weights_path=tmp_path / "vgg19.pt")
    assert on.perceptual.enabled
    terms = on(torch.rand_like(x), x, m)
    assert float(terms["perceptual"]) > 0 and float(on(x, x, m)["perceptual"]) == 0.0
    assert len(vgg(x)) == 3 and [f.shape[-1] for f in vgg(x)] == [32, 16, 8]  # pool1..pool3
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(BreastGenError, match="not a VGG-19 state dict"):
        PerceptualLoss(tmp_path / "bad.pt")
    # the config switch: off -> no file used; on without a file -> one-line error (nothing is downloaded)
    assert perceptual_weights(False, tmp_path / "vgg19.pt") is None
    assert perceptual_weights(True, tmp_path / "vgg19.pt") == tmp_path / "vgg19.pt"
    with pytest.raises(BreastGenError, match="perceptual_loss is on but vgg_weights_path is not set"):
        perceptual_weights(True, None)


# ------------------------------------------------------------------------------------------------ networks
def test_generator_output_is_bounded_and_pasting_keeps_context_bit_identical():
    g = _small_g()
    with torch.no_grad():
        for p in g.parameters():
            p.mul_(50.0)  # push activations far out
        x = torch.rand(4, 1, 64, 64) * 1000 - 500
        out = g(x, (x > 0).float(), torch.tensor([0, 1, 2, 1]))
    assert out.min() >= 0.0 and out.max() <= 1.0 and torch.isfinite(out).all()
    patches = torch.rand(3, 1, 64, 64)
    masks = torch.zeros_like(patches)
    masks[:, :, 10:30, 30:50] = 1
    comp, raw = infill_patches(_small_g(), patches, masks, ["benign", "malignant", "normal"])
    assert torch.equal(comp[masks == 0], patches[masks == 0])  # bit for bit
    assert torch.equal(comp[masks == 1], raw[masks == 1])
    with pytest.raises(BreastGenError, match="generator input is \\(32, 32\\) but the network makes 64 x 64"):
        _small_g()(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32), torch.tensor([1]))


def test_class_conditioning_changes_only_the_infilled_region():
    g = _small_g(3)
    patch = torch.rand(1, 1, 64, 64).expand(2, -1, -1, -1)
    mask = torch.zeros_like(patch)
    mask[:, :, 20:44, 18:40] = 1
    comp, raw = infill_patches(g, patch, mask, ["benign", "malignant"], seed=0)
    diff = (comp[0] - comp[1]).abs()
    assert float(diff[mask[0] > 0].mean()) > 1e-4  # the class changes the lesion
    assert float(diff[mask[0] == 0].max()) == 0.0  # and nothing else


def test_discriminator_has_patch_logits_and_class_head():
    d = ConditionalPatchDiscriminator(3, channels=(8, 16, 16))
    adv, cls = d(torch.rand(2, 1, 64, 64), torch.zeros(2, 1, 64, 64), torch.tensor([0, 2]))
    assert adv.shape == (2, 1, 8, 8) and cls.shape == (2, 3)
    # the class head sees no class input: changing the conditioning class leaves it unchanged
    x, m = torch.rand(1, 1, 64, 64), torch.zeros(1, 1, 64, 64)
    d.eval()  # no spectral-norm power iteration between the two calls
    a0, c0 = d(x, m, torch.tensor([0]))
    a1, c1 = d(x, m, torch.tensor([2]))
    assert torch.allclose(c0, c1) and not torch.allclose(a0, a1)


# ------------------------------------------------------------------------------------------------ trainer
def _loader(n: int = 8, batch: int = 4):
    torch.manual_seed(0)
    data = []
    for i in range(n):
        m = torch.zeros(1, 64, 64)
        m[:, 16 + i:36 + i, 20:40] = 1
        data.append({"image": torch.rand(1, 64, 64), "mask": m, "label": torch.tensor(i % 3)})
    return torch.utils.data.DataLoader(data, batch_size=batch)


def _trainer(g, d, max_epochs, warmup, handlers=()):
    return CIGANTrainer("cpu", max_epochs, _loader(), g, d, torch.optim.Adam(g.parameters(), 1e-3),
                        torch.optim.Adam(d.parameters(), 1e-3), CIGANReconstructionLoss(sigma=3.0),
                        warmup_iterations=warmup, d_steps=2, train_handlers=list(handlers))


def test_trainer_warms_up_then_trains_d_and_g_on_a_fixed_schedule_with_the_class_head():
    g, d = _small_g(), ConditionalPatchDiscriminator(3, channels=(8, 16, 16))
    tr = _trainer(g, d, max_epochs=2, warmup=2)
    outputs, d_states = [], []
    tr.add_event_handler(Events.ITERATION_COMPLETED, lambda e: (outputs.append(dict(e.state.output)),
                                                                d_states.append(d.class_head.parametrizations.weight.original.clone())))
    d0 = d.class_head.parametrizations.weight.original.clone()
    tr.run()
    assert [o["warmup"] for o in outputs] == [1.0, 1.0, 0.0, 0.0]
    assert "d_loss" not in outputs[0] and torch.equal(d_states[1], d0)  # warm-up: D untouched
    assert all(k in outputs[2] for k in ("d_loss", "d_class", "g_adv", "g_class", "rec_boundary", "rec_masked_l1"))
    assert not torch.equal(d_states[2], d0)  # the class head is optimised
    assert tr.state.iteration == 4


def test_training_resumes_from_the_latest_checkpoint(tmp_path):
    def build(max_epochs):
        g, d = _small_g(), ConditionalPatchDiscriminator(3, channels=(8, 16, 16))
        tr = _trainer(g, d, max_epochs, warmup=1)
        save = {"generator": g, "discriminator": d, "optimizer_g": tr.g_optimizer, "optimizer_d": tr.d_optimizer,
                "trainer": tr}
        ResumeFromLatest(tmp_path, save).attach(tr)
        CheckpointSaver(str(tmp_path), save, save_interval=1, n_saved=1, save_final=True,
                        final_filename="model.pt").attach(tr)
        return tr, g

    tr, g = build(1)
    tr.run()
    assert tr.state.iteration == 2 and (tmp_path / "checkpoint_epoch=1.pt").is_file()
    tr2, g2 = build(2)
    seen = []
    tr2.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append(e.state.iteration))
    tr2.run()
    assert seen == [3, 4] and tr2.state.epoch == 2  # continued, did not start over
    state = load_checkpoint(tmp_path / "model.pt", {"generator": _small_g(9)})
    assert set(state) >= {"generator", "discriminator", "trainer"}


# ------------------------------------------------------------------------------------------------ infill
def _normal_mammogram(seed=5):
    m = make_mammogram(seed, (256, 208), density="C")
    return m, m.image.T.copy(), m.breast_mask.T.copy()  # MONAI (W, H)


def _lesion_mask(seed=1):
    lesion = make_mammogram(seed, (256, 208), lesion="malignant").lesion_mask.T
    return lesion


def test_infill_full_mammogram_changes_only_mask_pixels_at_full_resolution():
    m, img, breast = _normal_mammogram()
    mask = place_lesion_mask(_lesion_mask(), breast, np.random.default_rng(0), min_on_breast=1.0)
    for label in ("benign", "malignant"):
        res = infill_image(_small_g(), img, mask, label)
        out = res["image"]
        assert out.dtype == np.uint16 and out.shape == img.shape
        assert np.array_equal(out[~mask], img[~mask])  # bit-identical outside the mask
        assert (out[mask] != img[mask]).any()
    big = np.zeros_like(mask)  # a mask larger than the patch: the window grows and is resized
    big[40:130, 60:150] = breast[40:130, 60:150]
    res = infill_image(_small_g(), img, big, "benign", min_on_breast=0.5)
    assert res["window"][2] - res["window"][0] > 64 and np.array_equal(res["image"][~big], img[~big])


def test_infill_rejects_a_lesion_mask_off_the_breast_before_writing(tmp_path):
    m, img, breast = _normal_mammogram()
    Image.fromarray(m.image).save(tmp_path / "normal.png")
    off = np.zeros((256, 208), np.uint8)
    off[10:30, 170:195] = 255  # top right: background of a left breast
    Image.fromarray(off).save(tmp_path / "off.png")
    good = np.zeros((256, 208), np.uint8)
    good[120:140, 40:60] = 255
    Image.fromarray(good).save(tmp_path / "good.png")
    jobs = [{"image": str(tmp_path / "normal.png"), "mask": str(tmp_path / "good.png"), "label": "benign"},
            {"image": str(tmp_path / "normal.png"), "mask": str(tmp_path / "off.png"), "label": "malignant"}]
    with pytest.raises(BreastGenError, match="off.png: lesion mask touches no breast tissue"):
        run_infill_jobs(_small_g(), jobs, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # validated before anything was written
    with pytest.raises(BreastGenError, match="unknown lesion class 'cancer'; allowed: normal, benign, malignant"):
        run_infill_jobs(_small_g(), [{**jobs[0], "label": "cancer"}], tmp_path / "out")
    records = run_infill_jobs(_small_g(), jobs[:1], tmp_path / "out")
    assert records[0]["outside_mask_identical"]
    ds = pydicom.dcmread(tmp_path / "out" / "normal_benign.dcm")
    assert ds.PatientName == "SYNTHETIC" and "SYNTHETIC IMAGE" in ds.ImageComments
    out = load_image(tmp_path / "out" / "normal_benign.png", modalities=None)[0]
    src = load_image(tmp_path / "normal.png")[0]
    mask = load_image(tmp_path / "good.png")[0] > 0
    assert np.array_equal(out[~mask], src[~mask]) and np.array_equal(ds.pixel_array.T, out)


def test_infill_of_a_normal_patch_file(tmp_path):
    rng = np.random.default_rng(0)
    patch = (rng.random((64, 64)) * 20000 + 20000).astype(np.uint16)  # (rows, cols) 16-bit patch
    Image.fromarray(patch).save(tmp_path / "patch.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 22:38] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    rec = run_infill_jobs(_small_g(), [{"image": str(tmp_path / "patch.png"), "mask": str(tmp_path / "mask.png"),
                                        "label": "malignant", "name": "p"}], tmp_path / "out", formats=("png",))
    assert rec[0]["window"] == [0, 0, 64, 64] and rec[0]["outside_mask_identical"]
    out = np.asarray(Image.open(tmp_path / "out" / "p.png"))
    assert np.array_equal(out[mask == 0], patch[mask == 0]) and (out[mask > 0] != patch[mask > 0]).any()


def test_corruption_is_uniform_noise_inside_the_mask_only():
    img = np.full((64, 64), 0.5, np.float32)
    mask = np.zeros((64, 64), bool)
    mask[10:50, 10:50] = True
    out = corrupt_with_noise(img, mask, np.random.default_rng(0))
    assert np.array_equal(out[~mask], img[~mask])
    inside = out[mask]
    assert 0 <= inside.min() and inside.max() <= 1 and abs(inside.mean() - 0.5) < 0.03 and inside.std() > 0.25


def test_infill_cli_reports_bad_mask_in_one_line(tmp_path, bundle_demo):
    out = bundle_demo(BUNDLE)
    m, img, breast = _normal_mammogram()
    Image.fromarray(m.image).save(tmp_path / "normal.png")
    off = np.zeros((256, 208), np.uint8)
    off[5:25, 180:200] = 255
    Image.fromarray(off).save(tmp_path / "off.png")
    (tmp_path / "infill.json").write_text(json.dumps({"test": [{"image": "normal.png", "mask": "off.png",
                                                                "label": "malignant"}]}))
    cfg = BUNDLE / "configs"
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                        json.dumps([str(cfg / "inference.json"), str(cfg / "demo.json")]),
                        "--bundle_root", str(BUNDLE), "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                        "--ckpt_path", str(out / "models" / "model.pt"),
                        "--infill_jobs", "$breastgen.data.datalists.load_datalist(@data_dir + '/infill.json', 'test')"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "off.png: lesion mask touches no breast tissue" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------ bundle demo
def test_demo_infills_keep_context_and_follow_the_class(bundle_demo):
    out = bundle_demo(BUNDLE)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["context_max_abs_diff"] == 0.0 and metrics["infill_outside_identical"] == 1
    assert 0.0 <= metrics["output_min"] <= metrics["output_max"] <= 1.0
    assert metrics["conditioning_delta"] > 0
    # lesions are denser than their surroundings: conditioned on a lesion class the infill is brighter than
    # conditioned on 'normal'
    assert metrics["contrast_malignant"] > metrics["contrast_normal"], metrics
    assert metrics["contrast_benign"] > metrics["contrast_normal"], metrics
    jobs = json.loads((out / "infill" / "jobs.json").read_text())
    assert jobs and all(j["outside_mask_identical"] for j in jobs)
    for j in jobs:
        src = load_image(j["image"])[0]
        res = load_image(out / "infill" / f"{j['name']}.png", modalities=None)[0]
        assert res.shape == src.shape  # full resolution
        ds = pydicom.dcmread(out / "infill" / f"{j['name']}.dcm")
        assert ds.PatientID == "SYNTHETIC" and ds.ImageLaterality in ("L", "R")
    syn = json.loads((out / "synthetic" / "datalist.json").read_text())["training"]
    assert len(syn) == 32 and {e["label"] for e in syn} == {"benign", "malignant"}
    assert (out / "samples_conditioning.png").is_file() and list((out / "models").glob("checkpoint_epoch=*.pt"))


@pytest.mark.slow
def test_multi_gpu_overlay_runs_with_torchrun_gloo(bundle_demo, tmp_path):
    demo_out = bundle_demo(BUNDLE)
    cfg = BUNDLE / "configs"
    r = run_bundle_cli(BUNDLE, ["train.json", "demo.json", "multi_gpu_train.json"],
                       "--meta_file", str(cfg / "metadata.json"), "--logging_file", str(cfg / "logging.conf"),
                       "--output_dir", str(tmp_path / "ddp"),
                       "--patch_datalist", str(demo_out / "work" / "patches" / "datalist.json"),
                       "--max_epochs", "1", "--trainer#epoch_length", "2", "--warmup_iterations", "1",
                       nproc=2, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(tmp_path / "ddp" / "models" / "model.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 and "generator" in state
