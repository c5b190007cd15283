"""Transforms feeding latent diffusion: prompt dropout, tokenisation, latent encoding and sampling.

Latent diffusion trains on MONAI engines without a custom trainer: the frozen autoencoder encodes each image
once (``EncodeLatentd``, deterministic, so ``CacheDataset`` caches it), a random transform draws the latent
from the posterior and scales it (``SampleLatentd``), and ``SupervisedTrainer`` + ``DiffusionPrepareBatch``
+ ``DiffusionInferer`` train the UNet on the result.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from torch import nn

from ..errors import BreastGenError
from ..prompts import build_prompt, parse_prompt

__all__ = ["DropoutTransformd", "PromptDropoutd", "AttributeDropoutd", "TokenizePromptd", "EncodeLatentd", "SampleLatentd", "LatentScaleFactor", "scale_value",
           "check_prompt"]


def _plain(x: Any) -> torch.Tensor:
    """A plain tensor: MONAI's MetaTensor adds per-op overhead that training on latents does not need."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def check_prompt(prompt: str, tokenizer: Any = None, vendors: Any = None) -> str:
    """Validate a positive prompt against the MAM-E grammar (and the tokenizer's vocabulary)."""
    kwargs = {} if vendors is None else {"vendors": vendors}
    parse_prompt(prompt, **kwargs)
    unknown = tokenizer.unknown_words(prompt) if hasattr(tokenizer, "unknown_words") else []
    if unknown:
        raise BreastGenError(f"prompt {prompt!r} has words the model was not built with: {', '.join(unknown)}")
    return prompt


class DropoutTransformd(Randomizable, MapTransform):
    """Base of the conditioning dropouts (classifier-free guidance training): ``prob`` checked to lie in [0, 1];
    ``randomize`` draws whether this sample's conditioning is dropped (``self._drop``)."""

    what = "dropout"

    def __init__(self, keys: KeysCollection, prob: float, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        if not 0.0 <= prob <= 1.0:
            raise BreastGenError(f"{self.what} probability must be in [0, 1], got {prob}")
        self.prob = prob
        self._drop = False

    def randomize(self, data: Any = None) -> None:
        self._drop = self.R.random() < self.prob


class PromptDropoutd(DropoutTransformd):
    """Replace the prompt with the empty prompt with probability ``prob`` (classifier-free guidance training)."""

    what = "prompt dropout"

    def __init__(self, keys: KeysCollection = "prompt", prob: float = 0.1, allow_missing_keys: bool = False):
        super().__init__(keys, prob, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        self.randomize()
        if self._drop:
            for key in self.key_iterator(d):
                d[key] = ""
        return d


class AttributeDropoutd(DropoutTransformd):
    """Leave out each attribute of a MAM-E prompt (vendor, view, density, area) with probability ``prob``, so
    that the model also learns partial prompts such as 'a mammogram with small area'. Prompts outside the
    grammar pass unchanged."""

    what = "attribute dropout"

    def __init__(self, keys: KeysCollection = "prompt", prob: float = 0.2, vendors: Any = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, prob, allow_missing_keys)
        self.vendors = vendors
        self._keep = np.ones(4, dtype=bool)

    def randomize(self, data: Any = None) -> None:
        self._keep = self.R.random(4) >= self.prob

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        self.randomize()
        kw = {} if self.vendors is None else {"vendors": self.vendors}
        for key in self.key_iterator(d):
            if not d[key]:
                continue
            try:
                attrs = parse_prompt(d[key], **kw).as_dict()
            except BreastGenError:
                continue
            kept = {k: (v if keep else None) for (k, v), keep in zip(attrs.items(), self._keep)}
            d[key] = build_prompt(**kept, **kw)
        return d


class TokenizePromptd(MapTransform):
    """``prompt`` (str) -> ``tokens`` (LongTensor L) with the model's tokenizer."""

    def __init__(self, keys: KeysCollection = "prompt", tokenizer: Any = None, output_key: str = "tokens",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if tokenizer is None:
            raise BreastGenError("TokenizePromptd needs a tokenizer")
        self.tokenizer, self.output_key = tokenizer, output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = self.tokenizer(str(d[key]))
        return d


class EncodeLatentd(MapTransform):
    """Encode ``keys`` (a 1 x W x H image in [0, 1]) with a frozen ``AutoencoderKL``: writes ``<key>_mu`` and
    ``<key>_sigma`` (latent C x w x h). Deterministic, so a CacheDataset runs the encoder once per image."""

    def __init__(self, keys: KeysCollection = "image", autoencoder: nn.Module | None = None,
                 device: str | torch.device = "cpu", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if autoencoder is None:
            raise BreastGenError("EncodeLatentd needs an autoencoder")
        self.autoencoder, self.device = autoencoder.eval(), torch.device(device)

    @torch.no_grad()
    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = _plain(d[key]).float()[None].to(self.device)
            mu, sigma = self.autoencoder.encode(x)
            d[f"{key}_mu"], d[f"{key}_sigma"] = mu[0].cpu(), sigma[0].cpu()
        return d


class LatentScaleFactor(nn.Module):
    """The latent scale factor (1 / std of the latents, as in Stable Diffusion), fitted on the training data
    and stored as a buffer, so it is saved in and restored from the diffusion checkpoint."""

    def __init__(self, value: float | None = None):
        super().__init__()
        self.register_buffer("value", torch.tensor(float("nan") if value is None else float(value)))

    @property
    def fitted(self) -> bool:
        return bool(torch.isfinite(self.value))

    def fit(self, dataset: Any, key: str = "image", max_items: int = 512) -> float:
        """Fit on the latents of ``dataset`` (items after ``SampleLatentd`` with this, still unfitted, scale:
        unscaled posterior samples). A fitted scale (e.g. restored from a checkpoint) is kept as it is."""
        if self.fitted:
            return float(self.value)
        samples = []
        for i in range(min(len(dataset), max_items)):
            item = dataset[i]
            item = item[0] if isinstance(item, list) else item
            samples.append(torch.as_tensor(item[key]).flatten().float())
        if not samples:
            raise BreastGenError("cannot fit the latent scale factor on an empty dataset")
        std = float(torch.cat(samples).std())
        if not np.isfinite(std) or std <= 0:
            raise BreastGenError(f"latent standard deviation is {std}: the autoencoder output is degenerate")
        self.value.fill_(1.0 / std)
        return float(self.value)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.value


def scale_value(scale: "LatentScaleFactor | float") -> float:
    """The latent scale as a number; an unfitted :class:`LatentScaleFactor` (not restored from the checkpoint)
    is an error."""
    if isinstance(scale, LatentScaleFactor):
        if not scale.fitted:
            raise BreastGenError("the latent scale factor was not restored: the diffusion checkpoint lacks it")
        return float(scale.value)
    return float(scale)


class SampleLatentd(Randomizable, MapTransform):
    """Draw ``z = (mu + sigma * eps) * scale`` from the cached posterior into ``output_key`` (default: the key
    itself, so ``DiffusionPrepareBatch`` finds the latent under ``image``)."""

    def __init__(self, keys: KeysCollection = "image", scale: LatentScaleFactor | float | None = None,
                 output_key: str | None = None, sample: bool = True, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.scale, self.output_key, self.sample = scale, output_key, sample
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        self.randomize()
        scale = self.scale
        if isinstance(scale, LatentScaleFactor):
            scale = float(scale.value) if scale.fitted else 1.0
        scale = 1.0 if scale is None else float(scale)
        for key in self.key_iterator(d):
            mu, sigma = d[f"{key}_mu"], d[f"{key}_sigma"]
            z = mu
            if self.sample:
                g = torch.Generator().manual_seed(self._seed)
                z = mu + sigma * torch.randn(mu.shape, generator=g, dtype=mu.dtype)
            d[self.output_key or key] = z * scale
        return d
