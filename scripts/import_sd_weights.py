#!/usr/bin/env python
"""Convert a local Stable Diffusion 1.x / 2.x folder (diffusers layout) into a MONAI checkpoint.

Usage::

    python scripts/import_sd_weights.py --sd-dir /models/stable-diffusion-v1-5 --out models/sd15_monai.pt \\
        [--text-encoder-out models/sd15_clip]

Writes (nothing is written unless everything converts):

* ``--out``: ``{"autoencoder": state_dict, "unet": state_dict, "meta": {...}}`` for
  ``breastgen.engines.load_checkpoint(path, {"autoencoder": ae, "unet": unet})`` or
  ``breastgen.networks.sd_import.load_monai_checkpoint(path)``;
* ``<out>.json`` beside it: the bundle config components to use (``autoencoder_def`` / ``unet_def`` with
  ``_target_`` and MONAI constructor arguments), ``scale_factor``, the training noise schedule, the text
  encoder's embedding size; the same JSON is printed;
* ``--text-encoder-out`` (optional): the CLIP text encoder and tokenizer copied into one folder, loadable with
  ``breastgen.networks.hf_text.HFTextEncoder`` / ``HFPromptTokenizer`` (needs ``pip install transformers``).

No network access: everything is read from ``--sd-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from breastgen.errors import BreastGenError, main_guard
from breastgen.io import atomic_write_json
from breastgen.networks.sd_import import (bundle_component, convert_sd_dir, read_scheduler_config,
                                          save_monai_checkpoint)

TEXT_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json", "model.fp16.safetensors", "pytorch_model.fp16.bin")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BreastGenError(f"cannot read JSON ({type(e).__name__}: {e})", path) from None


def text_encoder_info(sd_dir: Path, check_files: bool) -> dict | None:
    """Embedding size / token length of ``sd_dir``'s CLIP text encoder (None if it has none and
    ``check_files`` is False); with ``check_files`` every file the copy needs must be there."""
    te, tok = sd_dir / "text_encoder", sd_dir / "tokenizer"
    if not check_files and not (te / "config.json").is_file():
        return None
    for folder in (te, tok):
        if not folder.is_dir():
            raise BreastGenError(f"no {folder.name}/ folder to copy the text encoder from", sd_dir)
    if not (te / "config.json").is_file():
        raise BreastGenError("text encoder config.json not found", te)
    if check_files:
        if not any((te / n).is_file() for n in TEXT_WEIGHTS):
            raise BreastGenError(f"no text encoder weights found (expected {TEXT_WEIGHTS[0]} or {TEXT_WEIGHTS[1]})",
                                 te)
        if not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()) and not (
                tok / "tokenizer.json").is_file():
            raise BreastGenError("no tokenizer files found (expected vocab.json + merges.txt, or tokenizer.json)",
                                 tok)
        clash = {p.name for p in te.iterdir() if p.is_file()} & {p.name for p in tok.iterdir() if p.is_file()}
        if clash:
            raise BreastGenError(f"text_encoder/ and tokenizer/ both hold {sorted(clash)}; cannot merge them into "
                                 "one folder", sd_dir)
    cfg = _read_json(te / "config.json")
    tok_cfg = _read_json(tok / "tokenizer_config.json") if (tok / "tokenizer_config.json").is_file() else {}
    if not isinstance(cfg.get("hidden_size"), int):
        raise BreastGenError("text encoder config.json has no integer hidden_size (not a CLIP text model?)",
                             te / "config.json")
    max_length = tok_cfg.get("model_max_length")
    max_length = max_length if isinstance(max_length, int) and max_length <= 4096 else cfg.get(
        "max_position_embeddings", 77)
    return {"embed_dim": cfg["hidden_size"], "max_length": int(max_length),
            "num_hidden_layers": cfg.get("num_hidden_layers"), "source": str(te)}


def try_load_text_encoder(sd_dir: Path) -> str:
    """Load tokenizer + text model once (catches corrupt files before anything is written)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed: text encoder files copied without a trial load"
    from breastgen.networks.hf_text import HFPromptTokenizer, HFTextEncoder

    tokenizer, encoder = HFPromptTokenizer(sd_dir), HFTextEncoder(sd_dir)
    out = encoder(tokenizer(["a mammogram"]))
    return f"text encoder loads offline: tokens -> {tuple(out.shape)}"


def stage_text_encoder(sd_dir: Path, target: Path) -> Path:
    """Copy text_encoder/ and tokenizer/ files into a temporary folder beside ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the published folder gets the usual permissions
    try:
        for sub in ("text_encoder", "tokenizer"):
            for f in sorted((sd_dir / sub).iterdir()):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BreastGenError(f"cannot copy the text encoder ({e})", target) from None
    return tmp


def publish_dir(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target`` (an older ``target`` folder is replaced)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@main_guard
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd-dir", required=True, type=Path, help="Stable Diffusion folder (diffusers layout)")
    parser.add_argument("--out", required=True, type=Path, help="MONAI checkpoint to write (.pt)")
    parser.add_argument("--text-encoder-out", type=Path, default=None,
                        help="also copy the CLIP text encoder + tokenizer into this folder")
    args = parser.parse_args(argv)
    sd_dir, out, te_out = args.sd_dir, args.out, args.text_encoder_out
    json_out = out.with_suffix(".json")

    # validate everything before writing anything
    if not sd_dir.is_dir():
        raise BreastGenError("Stable Diffusion folder not found", sd_dir)
    if out.suffix == ".json" or out.is_dir():
        raise BreastGenError("--out must be a checkpoint file path such as models/sd15_monai.pt", out)
    if te_out is not None and te_out.exists() and not te_out.is_dir():
        raise BreastGenError("--text-encoder-out exists and is not a folder", te_out)
    text = text_encoder_info(sd_dir, check_files=te_out is not None)
    load_note = try_load_text_encoder(sd_dir) if te_out is not None else None
    autoencoder, ae_cfg, unet, unet_cfg = convert_sd_dir(sd_dir)
    cross = unet_cfg["args"]["cross_attention_dim"]
    if text is not None and text["embed_dim"] != cross:
        raise BreastGenError(f"text encoder hidden_size={text['embed_dim']} does not match the UNet's "
                             f"cross_attention_dim={cross}", sd_dir)
    scheduler = read_scheduler_config(sd_dir)
    if text is not None:
        text["dir"] = str(te_out) if te_out is not None else None

    summary = {
        "checkpoint": str(out),
        "source": str(sd_dir),
        "autoencoder_def": bundle_component(ae_cfg),
        "unet_def": bundle_component(unet_cfg),
        "scale_factor": ae_cfg["scale_factor"],
        "image_size": ae_cfg["sample_size"],
        "latent_size": unet_cfg["sample_size"],
        "scheduler": scheduler,
        "text_encoder": text,
        "notes": [
            "autoencoder: 3-channel images scaled to [-1, 1] (repeat grey mammograms over 3 channels); latents "
            "are multiplied by scale_factor before diffusion (LatentDiffusionInferer(scale_factor=...))",
            f"unet: context = CLIP last_hidden_state (batch, {text['max_length'] if text else 77}, {cross}) from "
            "breastgen.networks.hf_text.HFTextEncoder",
            "the plain MONAI classes cannot hold SD's VAE; DiffusionModelUNet loads unet_def's weights too "
            "(drop transformer_norm_eps; outputs then differ by ~1e-5)",
        ],
    }
    if load_note:
        summary["notes"].append(load_note)

    staged = stage_text_encoder(sd_dir, te_out) if te_out is not None else None
    try:
        save_monai_checkpoint(out, autoencoder, unet, ae_cfg, unet_cfg,
                              extra_meta={"scheduler": scheduler, "text_encoder": text})
        atomic_write_json(json_out, summary)
        if staged is not None:
            publish_dir(staged, te_out)
            staged = None
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out} and {json_out}" + (f"; text encoder in {te_out}" if te_out is not None else ""))
    return summary


if __name__ == "__main__":
    main()
