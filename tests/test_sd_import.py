"""Stable Diffusion weight import (diffusers layout -> MONAI) and the optional local CLIP text encoder.

Small randomly initialised diffusers models with SD's layout are saved with ``save_pretrained``, converted,
and the MONAI networks must reproduce diffusers' outputs to <= 1e-4 (VAE encode mean / log-variance and
decode; UNet noise prediction for SD 1.x-style and SD 2.x-style configs). The CLIP tokenizer is built offline
from a tiny hand-made byte-level BPE vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from breastgen.errors import BreastGenError
from breastgen.networks.sd_import import (SDAutoencoderKL, SDDiffusionModelUNet, load_monai_checkpoint,
                                          monai_autoencoder_from_diffusers, monai_unet_from_diffusers)

diffusers = pytest.importorskip("diffusers")  # test dependency (the DPM-Solver++ tests use it too)
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
CROSS_DIM = 32
VAE_FILE = "diffusion_pytorch_model.safetensors"


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random biases and norm affines too (defaults 0 / 1 would hide swapped norms or dropped biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_vae(seed: int = 0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=8, sample_size=32)
    return _perturb(vae, seed)


UNET_STYLES = {
    # SD 1.x: attention_head_dim is the number of heads (one value), conv 1x1 projections
    "sd1": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2, attention_head_dim=4,
                use_linear_projection=False, upcast_attention=False),
    # SD 2.x: heads per level, linear projections, upcast attention, several transformer layers
    "sd2": dict(block_out_channels=(32, 64, 64),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True,
                transformer_layers_per_block=2),
}


def make_unet(style: str, seed: int = 1):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, norm_num_groups=8,
                                          cross_attention_dim=CROSS_DIM, **UNET_STYLES[style])
    return _perturb(unet, seed)


# ------------------------------------------------------------------------------------------ tiny CLIP offline

def _byte_chars() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (bytes that print as themselves keep their code)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]


def write_tiny_clip(tok_dir: Path, te_dir: Path) -> None:
    import transformers
    chars = _byte_chars()
    merges = [("m", "a"), ("ma", "m"), ("o", "g"), ("r", "a"), ("i", "n</w>"), ("c", "c</w>")]
    vocab = [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in merges), "<|startoftext|>", "<|endoftext|>"]
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                        encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>"}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **specials}))
    (tok_dir / "special_tokens_map.json").write_text(json.dumps(specials))
    torch.manual_seed(2)
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=CROSS_DIM, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                      bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1,
                                      pad_token_id=len(vocab) - 1)
    _perturb(transformers.CLIPTextModel(cfg), 2).save_pretrained(te_dir)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    """A miniature Stable Diffusion folder in diffusers layout (random weights)."""
    root = tmp_path_factory.mktemp("sd") / "tiny-sd"
    make_vae().save_pretrained(root / "vae")
    make_unet("sd1").save_pretrained(root / "unet")
    try:  # test-only dependency (requirements-dev.txt); the CLIP tests skip without it
        write_tiny_clip(root / "tokenizer", root / "text_encoder")
    except ImportError:
        pass
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
         "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "steps_offset": 1}))
    return root


def load_script():
    """``scripts/import_sd_weights.py`` as a module (its ``main`` takes an argv list)."""
    spec = importlib.util.spec_from_file_location("import_sd_weights", ROOT / "scripts" / "import_sd_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def check_vae(reference, net) -> dict[str, float]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    z = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        dist = reference.encode(x).latent_dist
        mu, sigma = net.encode(x)
        dev = {"mean": _diff(mu, dist.mean), "logvar": _diff(2 * torch.log(sigma), dist.logvar),
               "decode": _diff(net.decode(z), reference.decode(z).sample)}
    assert dist.mean.abs().max() > 0.1 and dist.logvar.abs().max() > 0.1  # non-trivial outputs
    assert max(dev.values()) <= TOL, dev
    return dev


def check_unet(reference, net, seed: int = 4) -> float:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([17, 803])
    ctx = torch.randn(2, 9, CROSS_DIM, generator=gen)
    with torch.no_grad():
        ref = reference(x, t, encoder_hidden_states=ctx).sample
        out = net(x, timesteps=t, context=ctx)
        other = reference(x, t, encoder_hidden_states=torch.randn(2, 9, CROSS_DIM, generator=gen)).sample
    assert _diff(ref, other) > 1e-3  # the context matters, so cross-attention is really compared
    dev = _diff(out, ref)
    assert dev <= TOL, dev
    return dev


# ---------------------------------------------------------------------------------------------- equivalence

def test_vae_matches_diffusers(sd_dir):
    net, cfg = monai_autoencoder_from_diffusers(sd_dir / "vae")
    assert isinstance(net, SDAutoencoderKL) and not net.training
    assert cfg["scale_factor"] == pytest.approx(0.18215)
    assert cfg["args"]["channels"] == [32, 64] and cfg["args"]["latent_channels"] == 4
    check_vae(make_vae(), net)
    rebuilt = SDAutoencoderKL(**cfg["args"])  # the recorded constructor arguments rebuild the same network
    rebuilt.load_state_dict(net.state_dict())


@pytest.mark.parametrize("style", sorted(UNET_STYLES))
def test_unet_matches_diffusers(style, tmp_path):
    reference = make_unet(style)
    reference.save_pretrained(tmp_path / "unet")
    net, cfg = monai_unet_from_diffusers(tmp_path / "unet")
    assert isinstance(net, SDDiffusionModelUNet)
    args = cfg["args"]
    if style == "sd1":  # 4 heads at every level -> channels per head = channels / 4
        assert args["num_head_channels"] == [8, 16] and args["attention_levels"] == [True, False]
        assert args["upcast_attention"] is False and args["transformer_num_layers"] == 1
    else:  # heads (2, 4, 4) over (32, 64, 64) channels -> 16 channels per head
        assert args["num_head_channels"] == [16, 16, 16] and args["attention_levels"] == [True, True, False]
        assert args["upcast_attention"] is True and args["transformer_num_layers"] == 2
    assert args["cross_attention_dim"] == CROSS_DIM and args["transformer_norm_eps"] == 1e-6
    check_unet(reference, net)


def test_legacy_attention_names_and_bin_weights(tmp_path):
    """Older SD 1.x VAE files name attention query/key/value/proj_attn; .bin loads with weights_only."""
    reference = make_vae(5)
    reference.save_pretrained(tmp_path / "vae", safe_serialization=False)
    path = tmp_path / "vae" / "diffusion_pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in state.items():
        for new, old in renames.items():
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None] if value.ndim == 2 else value  # some old files: 1x1 convs
        legacy[key] = value
    assert any(".query." in k for k in legacy)
    torch.save(legacy, path)
    net, _ = monai_autoencoder_from_diffusers(tmp_path / "vae")
    check_vae(reference, net)


# configs as published with SD 1.5 (older diffusers: many keys absent) and SD 2.1 (768 px, v-prediction)
SD15_UNET = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
             "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
             "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
             "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
             "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SD21_UNET = {**SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
             "use_linear_projection": True, "upcast_attention": True, "dual_cross_attention": False,
             "num_class_embeds": None, "only_cross_attention": False, "resnet_time_scale_shift": "default",
             "class_embed_type": None}
SD_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
          "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
          "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
          "up_block_types": ["UpDecoderBlock2D"] * 4}


@pytest.mark.parametrize("name, cfg, heads", [("sd15", SD15_UNET, [40, 80, 160, 160]),
                                              ("sd21", SD21_UNET, [64, 64, 64, 64])])
def test_full_size_sd_configs_map_every_tensor(name, cfg, heads):
    """Real SD sizes, on the meta device (shapes only, no memory): every tensor has its MONAI place."""
    from breastgen.networks.sd_import import autoencoder_state_from_diffusers, unet_state_from_diffusers

    def build(cls, config):
        with torch.device("meta"):
            return cls(**{k: v for k, v in config.items() if not k.startswith("_")})

    reference = build(diffusers.UNet2DConditionModel, cfg)
    state, args = unet_state_from_diffusers(reference.state_dict(), cfg)
    assert args["num_head_channels"] == heads
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in reference.parameters())
    if name == "sd15":
        state, args = autoencoder_state_from_diffusers(build(diffusers.AutoencoderKL, SD_VAE).state_dict(), SD_VAE)
        assert args["num_res_blocks"] == [2, 2, 2, 2] and sum(t.numel() for t in state.values()) == 83_653_863


# ----------------------------------------------------------------------------------------- CLI + checkpoint

def test_import_script_roundtrip(sd_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import_sd_weights = load_script()
    out, clip_dir = tmp_path / "models" / "tiny_monai.pt", tmp_path / "models" / "tiny_clip"
    summary = import_sd_weights.main(["--sd-dir", str(sd_dir), "--out", str(out), "--text-encoder-out", str(clip_dir)])
    printed = capsys.readouterr().out
    assert '"unet_def"' in printed and "SDDiffusionModelUNet" in printed

    written = json.loads(out.with_suffix(".json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["autoencoder_def"]["_target_"] == "breastgen.networks.sd_import.SDAutoencoderKL"
    assert written["unet_def"]["_target_"] == "breastgen.networks.sd_import.SDDiffusionModelUNet"
    assert written["scale_factor"] == pytest.approx(0.18215)
    assert written["scheduler"]["monai_schedule"] == "scaled_linear_beta"
    assert written["text_encoder"]["embed_dim"] == CROSS_DIM and written["text_encoder"]["max_length"] == 77
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    autoencoder, unet, meta = load_monai_checkpoint(out)
    assert meta["unet"] == written["unet_def"] and meta["scheduler"]["prediction_type"] == "epsilon"
    check_vae(make_vae(), autoencoder)
    check_unet(make_unet("sd1"), unet)

    # the lead's generic loader fills networks built from the printed bundle components
    from breastgen.engines import load_checkpoint

    nets = {}
    for key in ("autoencoder", "unet"):
        args = dict(written[f"{key}_def"])
        cls = SDAutoencoderKL if args.pop("_target_").endswith("SDAutoencoderKL") else SDDiffusionModelUNet
        nets[key] = cls(**args)
    load_checkpoint(out, nets)
    check_unet(make_unet("sd1"), nets["unet"].eval(), seed=6)

    from breastgen.networks.hf_text import HFPromptTokenizer, HFTextEncoder

    tokens = HFPromptTokenizer(clip_dir)(["a mammogram in cc view"])
    reference = transformers.CLIPTextModel.from_pretrained(sd_dir / "text_encoder", local_files_only=True)
    with torch.no_grad():
        assert _diff(HFTextEncoder(clip_dir)(tokens), reference(input_ids=tokens).last_hidden_state) == 0


def test_import_script_one_line_error(tmp_path, sd_dir, capsys):
    """User errors end the script with one line on stderr and exit code 2, before anything is written."""
    main = load_script().main
    for argv, words in [(["--sd-dir", str(tmp_path / "missing-sd")], "missing-sd: Stable Diffusion folder not found"),
                        (["--sd-dir", str(copy_of(sd_dir / "unet", tmp_path).parent)], "no vae/ folder")]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", str(tmp_path / "out" / "x.pt")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------- text encoder

def test_hf_text_encoder_matches_transformers(sd_dir):
    transformers = pytest.importorskip("transformers")
    from breastgen.networks.hf_text import HFPromptTokenizer, HFTextEncoder

    prompts = ["a GE mammogram in CC view with big area and fatty density", "white background"]
    tokenizer = HFPromptTokenizer(sd_dir)  # SD folder: uses tokenizer/
    tokens = tokenizer(prompts)
    reference_tok = transformers.CLIPTokenizer.from_pretrained(sd_dir / "tokenizer", local_files_only=True)
    expected = reference_tok(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    assert tokens.dtype == torch.long and tokens.shape == (2, 77) and torch.equal(tokens, expected)
    assert tokenizer(prompts[0]).shape == (77,) and torch.equal(tokenizer(prompts[0]), tokens[0])
    assert tokenizer.unknown_words("anything at all") == []

    encoder = HFTextEncoder(sd_dir / "text_encoder")
    assert isinstance(encoder, torch.nn.Module) and encoder.embed_dim == CROSS_DIM
    reference = transformers.CLIPTextModel.from_pretrained(sd_dir / "text_encoder", local_files_only=True).eval()
    with torch.no_grad():
        out = encoder(tokens)
        assert out.shape == (2, 77, CROSS_DIM)
        assert _diff(out, reference(input_ids=tokens).last_hidden_state) == 0
    assert any(p.requires_grad for p in encoder.parameters())  # trainable, as MAM-E fine-tunes it

    with pytest.raises(BreastGenError, match="vocabulary"):
        encoder(torch.full((1, 5), 10_000))
    with pytest.raises(BreastGenError, match="max_length"):
        HFPromptTokenizer(sd_dir, max_length=100)


def test_hf_text_errors(tmp_path, sd_dir, monkeypatch):
    pytest.importorskip("transformers")
    from breastgen.networks.hf_text import HFPromptTokenizer, HFTextEncoder

    with pytest.raises(BreastGenError, match="text encoder folder not found") as err:
        HFTextEncoder(tmp_path / "no-clip")
    assert "no-clip" in str(err.value) and "\n" not in str(err.value)
    broken = copy_of(sd_dir / "text_encoder", tmp_path)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(BreastGenError, match="cannot load the CLIP text model offline") as err:
        HFTextEncoder(broken)
    assert "\n" not in str(err.value)

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(BreastGenError, match="pip install transformers"):
        HFPromptTokenizer(sd_dir)


# --------------------------------------------------------------------------------------------- bad input

def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_folders_and_files(tmp_path, sd_dir):
    with pytest.raises(BreastGenError, match="VAE folder not found") as err:
        monai_autoencoder_from_diffusers(tmp_path / "nowhere" / "vae")
    assert "nowhere" in _one_line(err)
    with pytest.raises(BreastGenError, match="UNet folder not found"):
        monai_unet_from_diffusers(tmp_path / "nowhere" / "unet")
    vae = copy_of(sd_dir / "vae", tmp_path)
    (vae / VAE_FILE).unlink()
    with pytest.raises(BreastGenError, match="no weights file found"):
        monai_autoencoder_from_diffusers(vae)
    (vae / "config.json").unlink()
    with pytest.raises(BreastGenError, match="config.json not found"):
        monai_autoencoder_from_diffusers(vae)


@pytest.mark.parametrize("content", [b"not a safetensors file", b""])
def test_corrupt_weights(tmp_path, sd_dir, content):
    vae = copy_of(sd_dir / "vae", tmp_path)
    (vae / VAE_FILE).write_bytes(content)
    with pytest.raises(BreastGenError, match="cannot read weights") as err:
        monai_autoencoder_from_diffusers(vae)
    assert VAE_FILE in _one_line(err)


@pytest.mark.parametrize("what, key, value", [
    ("unet", "resnet_time_scale_shift", "scale_shift"),
    ("unet", "mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("unet", "transformer_layers_per_block", [1, 2]),
    ("unet", "up_block_types", ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
    ("unet", "attention_head_dim", 5),
    ("unet", "addition_embed_type", "text_time"),
    ("vae", "shift_factor", 0.1159),
    ("vae", "down_block_types", ["DownEncoderBlock2D", "DownBlock2D"]),
])
def test_unsupported_config_names_the_setting(tmp_path, sd_dir, what, key, value):
    folder = copy_of(sd_dir / what, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    convert = monai_unet_from_diffusers if what == "unet" else monai_autoencoder_from_diffusers
    with pytest.raises(BreastGenError, match=f"unsupported {what.upper() if what == 'vae' else 'UNet'} setting "
                                             f"{key}=") as err:
        convert(folder)
    assert "config.json" in _one_line(err)


def test_weights_not_matching_config(tmp_path, sd_dir):
    unet = copy_of(sd_dir / "unet", tmp_path)
    weights = unet / VAE_FILE
    state = load_file(str(weights))

    missing = dict(state)
    del missing["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    save_file(missing, str(weights))
    with pytest.raises(BreastGenError, match=r"lack 'mid_block\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k"):
        monai_unet_from_diffusers(unet)

    save_file({**state, "extra_head.weight": torch.zeros(3)}, str(weights))
    with pytest.raises(BreastGenError, match="no place in the MONAI network: extra_head.weight"):
        monai_unet_from_diffusers(unet)

    save_file(state, str(weights))
    cfg = json.loads((unet / "config.json").read_text())
    cfg["cross_attention_dim"] = 48
    (unet / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BreastGenError, match=r"has shape \(32, 32\).*needs \(32, 48\)") as err:
        monai_unet_from_diffusers(unet)
    _one_line(err)
