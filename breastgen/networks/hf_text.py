"""Optional pretrained text encoder: a Hugging Face CLIP text model from a local folder (no network access).

Stable Diffusion conditions its UNet on CLIP's ``last_hidden_state`` (B, 77, 768 for SD 1.x; 1024 for SD 2.x,
whose converted OpenCLIP encoder already stops at the penultimate layer). MAM-E fine-tunes that encoder with
the UNet. These two classes are drop-in replacements for :class:`breastgen.networks.text.PromptTokenizer` /
:class:`~breastgen.networks.text.TextEncoder`:

    tokenizer = HFPromptTokenizer("/models/stable-diffusion-v1-5")      # or a flat folder, see below
    encoder = HFTextEncoder("/models/stable-diffusion-v1-5")            # nn.Module, encoder.embed_dim == 768
    context = encoder(tokenizer(["a GE mammogram in CC view ..."]))     # (1, 77, 768)

``local_dir`` is either a Stable Diffusion folder in diffusers layout (``tokenizer/`` and ``text_encoder/`` are
used) or one folder holding both the tokenizer files (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``)
and the model (``config.json``, ``model.safetensors``), as ``scripts/import_sd_weights.py --text-encoder-out``
writes. ``transformers`` is optional and imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BreastGenError

__all__ = ["HFPromptTokenizer", "HFTextEncoder", "resolve_hf_dir"]


def _transformers(local_dir: Any) -> Any:
    try:
        import transformers
    except ImportError:
        raise BreastGenError("the pretrained (Hugging Face CLIP) text encoder needs the optional transformers "
                             "package: pip install transformers", local_dir) from None
    return transformers


def resolve_hf_dir(local_dir: str | Path, sub: str) -> Path:
    """``local_dir/sub`` when ``local_dir`` is a Stable Diffusion folder, else ``local_dir`` (must exist)."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise BreastGenError(f"text encoder folder not found (expected a local CLIP {sub} folder, or a Stable "
                             "Diffusion folder with tokenizer/ and text_encoder/)", local_dir)
    return local_dir / sub if (local_dir / sub).is_dir() else local_dir


def _load_error(what: str, path: Path, e: BaseException) -> BreastGenError:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return BreastGenError(f"cannot load the CLIP {what} offline ({type(e).__name__}: "
                          f"{lines[0][:200] if lines else ''})", path)


class HFPromptTokenizer:
    """CLIP tokenizer from a local folder: prompts -> token ids padded/truncated to ``max_length`` (77 in SD).

    Called with a list of prompts it returns a LongTensor (B, max_length); with a single string it returns
    (max_length,) like :class:`breastgen.networks.text.PromptTokenizer` (so per-sample transforms collate).
    """

    def __init__(self, local_dir: str | Path, max_length: int = 77):
        transformers = _transformers(local_dir)
        path = resolve_hf_dir(local_dir, "tokenizer")
        try:
            self.tokenizer = transformers.CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - missing/corrupt files surface as assorted exception types
            raise _load_error("tokenizer", path, e) from None
        limit = getattr(self.tokenizer, "model_max_length", None)
        if not isinstance(max_length, int) or max_length < 2 or (isinstance(limit, int) and max_length > limit):
            raise BreastGenError(f"tokenizer max_length must be an integer in [2, {limit}], got {max_length!r}",
                                 path)
        self.max_length = max_length
        self.path = path

    def __len__(self) -> int:
        return len(self.tokenizer)

    def unknown_words(self, prompt: str) -> list[str]:
        """Always empty: byte-level BPE encodes any word (interface of ``PromptTokenizer``)."""
        return []

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        single = isinstance(prompts, str)
        batch = [prompts] if single else [str(p) for p in prompts]
        ids = self.tokenizer(batch, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids.long()
        return ids[0] if single else ids


class HFTextEncoder(nn.Module):
    """CLIP text model from a local folder: token ids (B, L) -> ``last_hidden_state`` (B, L, embed_dim).

    Trainable like any module (MAM-E fine-tunes it); its state dict is the CLIP model's under ``model.``.
    Loaded in float32 with ``local_files_only=True``.
    """

    def __init__(self, local_dir: str | Path):
        super().__init__()
        transformers = _transformers(local_dir)
        path = resolve_hf_dir(local_dir, "text_encoder")
        try:
            self.model = transformers.CLIPTextModel.from_pretrained(str(path), local_files_only=True,
                                                                    dtype=torch.float32)
        except Exception as e:  # noqa: BLE001
            raise _load_error("text model", path, e) from None
        self.embed_dim = int(self.model.config.hidden_size)
        self.max_length = int(self.model.config.max_position_embeddings)
        self.vocab_size = int(self.model.config.vocab_size)
        self.path = path

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] > self.max_length:
            raise BreastGenError(f"text encoder expects token ids of shape (batch, <= {self.max_length}), got "
                                 f"{tuple(tokens.shape)}", self.path)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise BreastGenError(f"token ids outside the text encoder's vocabulary (0..{self.vocab_size - 1}); "
                                 "tokenizer and text encoder come from different models", self.path)
        return self.model(input_ids=tokens.long()).last_hidden_state
