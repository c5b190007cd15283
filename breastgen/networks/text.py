"""Prompt tokenizer, a small transformer text encoder trained with the UNet, and the text-conditioned UNet.

MAM-E fine-tunes CLIP's text encoder jointly with the UNet. Without CLIP weights offline, the default here is
a word-level tokenizer over the prompt grammar's vocabulary and a small transformer trained from scratch with
the UNet (MONAI has no text encoder). A pretrained CLIP text model from a local folder can replace both
(`breastgen.networks.hf_text`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import BreastGenError
from ..prompts import AREAS, DEFAULT_VENDORS, DENSITIES, VIEWS

__all__ = ["PromptTokenizer", "TextEncoder", "TextConditionedUNet", "GRAMMAR_WORDS"]
logger = logging.getLogger(__name__)

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
GRAMMAR_WORDS = tuple(dict.fromkeys(
    ["a", "an", "mammogram", "in", "view", "with", "and", "density", "area", "lesion", "mass", "calcification",
     "benign", "malignant", "white", "black", "background", "bright", "dark", "noise", "blurry",
     *[v.lower() for v in VIEWS], *" ".join(DENSITIES).split(), *AREAS, *DEFAULT_VENDORS]))
_WORD = re.compile(r"[a-z0-9+\-]+")


class PromptTokenizer:
    """Word-level tokenizer: lower-cased words -> ids, ``<bos> words <eos> <pad>...`` to ``max_length``.

    The vocabulary is the prompt grammar's words plus ``extra_words`` (e.g. a site's vendor names); it is
    fixed when the text encoder is built, so it is part of the model configuration. Words outside it map to
    ``<unk>`` (``unknown_words`` lists them, so callers can refuse or warn).
    """

    def __init__(self, extra_words: Iterable[str] = (), max_length: int = 24):
        words = list(dict.fromkeys([*GRAMMAR_WORDS, *(w.lower() for w in extra_words)]))
        self.vocab = [*SPECIALS, *words]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = int(max_length)

    def __len__(self) -> int:
        return len(self.vocab)

    @staticmethod
    def words(prompt: str) -> list[str]:
        return _WORD.findall(str(prompt).lower())

    def unknown_words(self, prompt: str) -> list[str]:
        return [w for w in self.words(prompt) if w not in self.index]

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        out = torch.zeros(len(batch), self.max_length, dtype=torch.long)
        for row, prompt in enumerate(batch):
            ids = [self.index["<bos>"], *(self.index.get(w, 1) for w in self.words(prompt)), self.index["<eos>"]]
            if len(ids) > self.max_length:
                raise BreastGenError(f"prompt {prompt!r} has {len(ids) - 2} words; at most {self.max_length - 2} fit")
            out[row, : len(ids)] = torch.tensor(ids)
        return out[0] if single else out


class TextEncoder(nn.Module):
    """Token ids (B, L) -> embeddings (B, L, embed_dim): token + position embeddings, a pre-norm transformer."""

    def __init__(self, vocab_size: int, embed_dim: int = 256, num_layers: int = 4, num_heads: int = 4,
                 max_length: int = 24, dropout: float = 0.0):
        super().__init__()
        self.embed_dim = embed_dim
        self.token = nn.Embedding(vocab_size, embed_dim)
        self.position = nn.Parameter(torch.zeros(1, max_length, embed_dim))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(embed_dim, num_heads, 4 * embed_dim, dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token(tokens) + self.position[:, : tokens.shape[1]]
        return self.norm(self.transformer(x, src_key_padding_mask=tokens == 0))


class TextConditionedUNet(nn.Module):
    """A MONAI ``DiffusionModelUNet`` and a text encoder trained together (one module: one optimizer, one
    checkpoint). ``context`` may be token ids (long, B x L: encoded here) or embeddings (float, B x L x D:
    used as they are, e.g. a prompt encoded once for a whole sampling loop)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(tokens)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None and not context.is_floating_point():
            context = self.encode(context)
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        return self.unet(x, timesteps=timesteps, context=context, **kwargs)
