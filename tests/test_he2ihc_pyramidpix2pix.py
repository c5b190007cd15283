"""he2ihc_pyramidpix2pix: pyramid loss, self-attention, eval-mode evaluation, BCI preparation, demo vs baseline."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from breastgen.bundle import run_configs
from breastgen.data.bci import prepare_bci, stratified_split
from breastgen.engines.gan import ImageTranslator, eval_mode, translate_files
from breastgen.errors import BreastGenError
from breastgen.losses import PyramidL1Loss, gaussian_pyramid
from breastgen.metrics.image_quality import evaluate_translation, pair_scores
from breastgen.networks.pix2pix import ResnetGenerator, SelfAttention2d, UNetGenerator, patch_discriminator
from conftest import ROOT

BUNDLE = ROOT / "bundles" / "he2ihc_pyramidpix2pix"


# ------------------------------------------------------------------------------------------------ pyramid loss

def test_pyramid_loss_equals_hand_computed_values():
    # 2x2 difference image with a single 1 at (0, 0), one octave. A 3-tap Gaussian (sigma 1) with reflect padding
    # maps a 2-sample signal [p, q] to [[w0, 2 w1], [2 w1, w0]] @ [p, q]; eigenvalues 1 (on [1, 1]) and
    # lam = w0 - 2 w1 (on [1, -1]); so 4 blurs of [1, 0] give (1 + lam^4) / 2 at sample 0, in each axis.
    w1 = math.exp(-0.5) / (1 + 2 * math.exp(-0.5))
    w0 = 1 / (1 + 2 * math.exp(-0.5))
    lam = w0 - 2 * w1
    fake = torch.zeros(1, 1, 2, 2)
    fake[0, 0, 0, 0] = 1.0
    expected = 25.0 * (1 / 4 + ((1 + lam**4) / 2) ** 2)
    got = PyramidL1Loss(num_octaves=1)(fake, torch.zeros_like(fake))
    assert float(got) == pytest.approx(expected, rel=1e-6)

    # a constant offset c survives every (normalised, reflect-padded) blur: 4 levels x 25 x |c|
    real = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert float(PyramidL1Loss()(real + 0.3, real)) == pytest.approx(25 * 4 * 0.3, rel=1e-5)
    assert float(PyramidL1Loss(num_octaves=0, weight=2.0)(real + 0.3, real)) == pytest.approx(0.6, rel=1e-5)
    assert [tuple(p.shape[-2:]) for p in gaussian_pyramid(real)] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    with pytest.raises(BreastGenError, match="differ in shape"):
        PyramidL1Loss()(real, real[..., :4])


# ------------------------------------------------------------------------------------------------ attention

def test_attention_layer_preserves_shape_and_is_identity_with_closed_gate():
    torch.manual_seed(0)
    layer = SelfAttention2d(16)
    x = torch.randn(2, 16, 12, 10)
    assert float(layer.gamma.detach()) == 0.0
    assert torch.equal(layer(x), x)  # gate 0 at init: exactly the identity

    # the attention itself is softmax(Q K^T / sqrt(d)) V, checked against a direct computation
    q = layer.query(x).flatten(2).transpose(1, 2)
    k = layer.key(x).flatten(2).transpose(1, 2)
    v = layer.value(x).flatten(2).transpose(1, 2)
    ref = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(layer.qk_channels), -1) @ v
    assert torch.allclose(layer.attend(x), ref.transpose(1, 2).reshape(x.shape), atol=1e-5)
    layer.query_chunk = 7  # chunked queries give the same result
    assert torch.allclose(layer.attend(x), ref.transpose(1, 2).reshape(x.shape), atol=1e-5)

    with torch.no_grad():
        layer.gamma.fill_(0.5)
    y = layer(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    pooled = SelfAttention2d(16, kv_grid=4)
    assert pooled(x).shape == x.shape

    # a generator with attention layers (gates closed) computes exactly what the plain generator computes
    plain = ResnetGenerator(ngf=8, n_blocks=1).eval()
    attn = ResnetGenerator(ngf=8, n_blocks=1, attention=True).eval()
    assert sum(isinstance(m, SelfAttention2d) for m in attn.modules()) == 4  # 2 down + 2 up
    missing, unexpected = attn.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(m.startswith(("down_attn.", "up_attn.")) for m in missing)
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(attn(img), plain(img))


def test_networks_shapes_and_patchgan_receptive_field():
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    for g in (ResnetGenerator(ngf=8, n_blocks=2), UNetGenerator(channels=(8, 16, 32, 64))):
        y = g.eval()(x)
        assert y.shape == x.shape and float(y.abs().max()) <= 1.0
    d = patch_discriminator(ndf=8)
    out = d(torch.cat([x, x], 1))[-1]
    assert out.shape == (1, 1, 6, 6)  # 64 px -> 6x6 patches of a 70x70 PatchGAN (pix2pix: n_layers 3)


# ------------------------------------------------------------------------------------------------ eval mode

class _StuckInTraining(torch.nn.Dropout):
    """A module whose train(False) is ignored -- how a custom layer can leave a network in train mode."""

    def train(self, mode: bool = True):
        self.training = True
        return self


def _dropout_generator() -> ResnetGenerator:
    torch.manual_seed(0)
    return ResnetGenerator(ngf=8, n_blocks=2, dropout=0.5)


def test_evaluation_runs_in_eval_mode_and_detects_a_network_left_in_train_mode():
    g = _dropout_generator()
    g.train()
    bn = next(m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(m.training)) for m in g.modules()]
    x = torch.rand(3, 48, 40)
    tr = ImageTranslator(g, roi_size=32)  # 48 x 40 > 32: sliding window
    a, b = tr(x), tr(x)
    for h in hooks:
        h.remove()
    assert seen and not any(seen)  # every module ran in eval mode
    assert torch.equal(a, b)  # no dropout noise
    assert torch.equal(bn.running_mean, stats)  # BatchNorm statistics untouched
    assert g.training  # previous mode restored

    # a network that stays in train mode anyway is refused, in the translator and in eval_mode itself
    g.blocks[0].block[4] = _StuckInTraining(0.5)
    with pytest.raises(BreastGenError, match="train mode"):
        tr(x)
    with pytest.raises(BreastGenError, match="train mode"), eval_mode(g) as net:
        net(torch.rand(1, 3, 16, 16))


def test_bundle_evaluate_config_refuses_a_network_left_in_train_mode(bundle_demo, demo_data, tmp_path):
    from monai.bundle import ConfigParser

    out = bundle_demo(BUNDLE)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in ("evaluate.json", "demo.json")])
    parser.update({"bundle_root": str(BUNDLE), "data_dir": str(demo_data), "output_dir": str(tmp_path)})
    translator = parser.get_parsed_content("translator")
    assert isinstance(translator, ImageTranslator) and translator.check_eval
    gen = translator.network
    gen.head[0] = torch.nn.Sequential(_StuckInTraining(0.5), gen.head[0])
    with pytest.raises(BreastGenError, match="train mode"):
        evaluate_translation(translator, [{"image": p, "target": p, "her2": "0"} for p in
                                          sorted((out / "ihc").glob("*.png"))[:1]], tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_failed"] == 1  # the failure is in the report, not swallowed


# ------------------------------------------------------------------------------------------------ BCI data

def _tile(path: Path, size=(16, 16), mode="RGB", value=120):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value // 2, 200)).save(path)


def _bci_replica(root: Path, n_train=12, n_test=4) -> Path:
    scores = ("0", "1+", "2+", "3+")
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(n):
            name = f"{k:05d}_{split}_{scores[k % 4]}.png"
            _tile(root / "HE" / split / name, value=100 + k)
            _tile(root / "IHC" / split / name, value=150 + k)
    return root


def test_prepare_bci_writes_a_stratified_datalist(tmp_path):
    root = _bci_replica(tmp_path / "BCI")
    path = prepare_bci(root, val_fraction=0.25, seed=3)
    assert path == root.resolve() / "he2ihc_datalist.json"
    d = json.loads(path.read_text())
    assert [len(d[s]) for s in ("training", "validation", "test")] == [8, 4, 4]  # round(0.25 * 3) = 1 per score
    assert sorted(e["her2"] for e in d["validation"]) == ["0", "1+", "2+", "3+"]
    assert all(set(e) >= {"image", "target", "her2"} for s in d.values() for e in s)
    assert all(e["image"].startswith("HE/") and e["target"] == e["image"].replace("HE/", "IHC/", 1)
               for s in d.values() for e in s)
    names = {e["name"] for e in d["training"]} | {e["name"] for e in d["validation"]}
    assert len(names) == 12 and not {e["name"] for e in d["training"]} & {e["name"] for e in d["validation"]}
    assert prepare_bci(root, val_fraction=0.25, seed=3).read_text() == path.read_text()  # reproducible
    # a score with >= 2 pairs always gets a validation pair, whatever the fraction
    held = stratified_split([{"name": str(i), "her2": s} for i, s in enumerate("0011223")], 0.01, 0)[1]
    assert sorted(h["her2"] for h in held) == ["0", "1", "2"]


def test_prepare_bci_bad_input_is_one_line_listing_the_files(tmp_path):
    root = _bci_replica(tmp_path / "BCI")
    (root / "IHC" / "train" / "00001_train_1+.png").unlink()  # unpaired
    _tile(root / "IHC" / "test" / "00002_test_2+.png", size=(16, 12))  # size mismatch
    _tile(root / "HE" / "train" / "00003_train_3+.png", mode="L")  # not RGB
    _tile(root / "HE" / "train" / "00005_train_1+.png", mode="RGBA")  # RGBA is accepted
    with pytest.raises(BreastGenError) as err:
        prepare_bci(root)
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("unpaired: HE/train/00001_train_1+.png (no IHC)", "not RGB: HE/train/00003_train_3+.png (mode L)",
                 "size mismatch: test/00002_test_2+.png (HE 16x16, IHC 16x12)"):
        assert part in msg, msg
    assert not (root / "he2ihc_datalist.json").exists()  # nothing written

    # the command line (a thin wrapper over breastgen.data.bci): one line on stderr, exit code 2
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_bci.py"), "--bci", str(root)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = r.stderr
    assert r.returncode == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "00001_train_1+.png" in err and "00003_train_3+.png" in err and "00002_test_2+.png" in err


def test_inference_refuses_non_rgb_tiles_before_writing(tmp_path):
    _tile(tmp_path / "in" / "a.png")
    _tile(tmp_path / "in" / "b.png", mode="L")
    _tile(tmp_path / "in" / "c.png", mode="I;16")
    tr = ImageTranslator(ResnetGenerator(ngf=4, n_blocks=1))
    with pytest.raises(BreastGenError, match=r"2 tile\(s\) not RGB .*b.png \(mode L\), c.png"):
        translate_files(tr, tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    written = translate_files(tr, tmp_path / "in" / "a.png", tmp_path / "out")
    assert [p.name for p in written] == ["a.png"] and Image.open(written[0]).size == (16, 16)


# ------------------------------------------------------------------------------------------------ metrics

def test_psnr_ssim_match_skimage_and_failures_are_reported(tmp_path):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    g = torch.Generator().manual_seed(0)
    t = torch.rand(3, 40, 36, generator=g)
    p = (t + 0.1 * torch.randn(3, 40, 36, generator=g)).clamp(0, 1)
    s = pair_scores(p, t)
    tn, pn = t.numpy(), p.numpy()
    assert s["psnr_float"] == pytest.approx(peak_signal_noise_ratio(tn, pn, data_range=1.0), abs=1e-3)
    ref = structural_similarity(tn, pn, data_range=1.0, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert s["ssim_float"] == pytest.approx(ref, abs=1e-4)
    tu, pu = (np.floor(tn * 255 + 0.5)).astype(np.uint8), (np.floor(pn * 255 + 0.5)).astype(np.uint8)
    assert s["psnr_u8"] == pytest.approx(peak_signal_noise_ratio(tu, pu, data_range=255), abs=1e-3)

    ok = tmp_path / "ok.png"
    small = tmp_path / "small.png"
    _tile(ok, size=(20, 20))
    _tile(small, size=(20, 16))
    data = [{"image": str(ok), "target": str(ok), "her2": "0"}, {"image": str(ok), "target": str(small), "her2": "1+"},
            {"image": str(tmp_path / "missing.png"), "target": str(ok), "her2": "1+"}]
    with pytest.raises(BreastGenError, match=r"2 of 3 pair\(s\) could not be scored"):
        evaluate_translation(lambda x: x, data, tmp_path / "ev")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n_scored"] == 1 and metrics["n_failed"] == 2
    rows = (tmp_path / "ev" / "per_image.csv").read_text().splitlines()
    assert rows[0].startswith("name,her2,status,psnr_u8") and len(rows) == 4
    assert sum(",failed," in r for r in rows) == 2 and "differ in size" in rows[2]


# ------------------------------------------------------------------------------------------------ the bundle

def test_demo_beats_the_input_baseline_and_reports_everything(bundle_demo):
    out = bundle_demo(BUNDLE)
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_failed"] == 0 and m["n_scored"] == 8 and m["network_mode"].startswith("eval")
    for metric in ("psnr_u8", "ssim_u8", "psnr_float", "ssim_float"):
        assert m[f"{metric}_mean"] > m[f"baseline_input_{metric}_mean"], (metric, m)
        assert m[f"{metric}_std"] >= 0
    for score in ("0", "1+", "2+", "3+"):
        assert m[f"her2={score}/n"] == 2 and f"her2={score}/baseline_input_ssim_u8_mean" in m
    rows = (out / "per_image.csv").read_text().splitlines()
    assert len(rows) == 9 and all(",ok," in r for r in rows[1:])
    # inference wrote one IHC tile per HE test tile, at full size (128 px > 64 px training crops: sliding window)
    tiles = sorted((out / "ihc").glob("*.png"))
    assert len(tiles) == 8 and all(Image.open(t).size == (128, 128) and Image.open(t).mode == "RGB" for t in tiles)
    assert list((out / "samples").glob("*.png"))


def test_checkpoints_load_weights_only_and_training_resumes(bundle_demo, demo_data, tmp_path):
    out = bundle_demo(BUNDLE)
    gen = torch.load(out / "models" / "generator.pt", weights_only=True)
    assert any(k.endswith("running_mean") for k in gen)
    last = max((out / "models").glob("checkpoint_epoch=*.pt"), key=lambda p: int(p.stem.split("=")[1]))
    state = torch.load(last, weights_only=True)
    assert {"generator", "discriminator", "g_optimizer", "d_optimizer", "g_scheduler", "trainer"} <= set(state)
    per_epoch = state["trainer"]["epoch_length"]
    done = state["trainer"]["iteration"] // per_epoch

    # re-running the training config with one more epoch continues from the newest checkpoint
    work = tmp_path / "resume"
    shutil.copytree(out / "models", work / "models")
    demo = json.loads((BUNDLE / "configs" / "demo.json").read_text())
    run_configs(BUNDLE, ["train.json", "demo.json"], {"data_dir": str(demo_data), "output_dir": str(work),
                                                      "n_epochs_decay": demo["n_epochs_decay"] + 1})
    resumed = torch.load(work / "models" / f"checkpoint_epoch={done + 1}.pt", weights_only=True)
    assert resumed["trainer"]["iteration"] == (done + 1) * per_epoch
    assert not (work / "models" / "checkpoint_epoch=1.pt").exists()  # continued, did not start over


@pytest.mark.parametrize("overlay", ["attention.json", "unet_baseline.json"])
def test_overlays_build_and_train(overlay, demo_data, tmp_path):
    out = tmp_path / "run"
    run_configs(BUNDLE, ["train.json", overlay, "demo.json"], {
        "data_dir": str(demo_data), "output_dir": str(out), "n_epochs": 1, "n_epochs_decay": 0, "val_interval": 1})
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in ("inference.json", overlay, "demo.json")])
    parser.update({"bundle_root": str(BUNDLE), "data_dir": str(demo_data), "output_dir": str(out)})
    gen = parser.get_parsed_content("generator")
    if overlay == "attention.json":
        assert sum(isinstance(m, SelfAttention2d) for m in gen.modules()) == 2 * gen.n_downsampling
    else:
        assert isinstance(gen, UNetGenerator)
    parser.get_parsed_content("load")  # the trained generator loads into the inference network
    assert (out / "models" / "generator.pt").is_file()


def test_multi_gpu_overlay_runs_ddp_on_cpu_with_gloo(demo_data, tmp_path):
    cfg = BUNDLE / "configs"
    files = "[" + ",".join(f"'{cfg / f}'" for f in ("train.json", "multi_gpu_train.json", "demo.json")) + "]"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
           "run", "--config_file", files, "--meta_file", str(cfg / "metadata.json"),
           "--logging_file", str(cfg / "logging.conf"), "--bundle_root", str(BUNDLE), "--data_dir", str(demo_data),
           "--output_dir", str(tmp_path), "--n_epochs", "1", "--n_epochs_decay", "0", "--val_interval", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "models" / "generator.pt").is_file()
    assert "val_psnr" in r.stdout + r.stderr
