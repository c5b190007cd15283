"""Training MONAI's ``AutoencoderKL`` with ``monai.engines.AdversarialTrainer``: L1 + KL + patch adversarial.

``AdversarialTrainer`` expects a generator that maps image -> image. ``KLAutoencoder`` adapts
``AutoencoderKL`` (which returns reconstruction, mu, sigma) and keeps the KL term of its last forward for
``ReconstructionKLLoss``. ``AdversarialTerm`` / ``DiscriminatorTerm`` wrap MONAI's ``PatchAdversarialLoss`` for
``PatchDiscriminator`` outputs, with an adversarial warm-up (weight 0 for the first iterations).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.losses import PatchAdversarialLoss
from torch import nn

__all__ = ["KLAutoencoder", "ReconstructionKLLoss", "AdversarialTerm", "DiscriminatorTerm", "kl_divergence",
           "prepare_reconstruction_batch"]
logger = logging.getLogger(__name__)


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent dims, mean over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1)
    return kl.flatten(1).sum(1).mean()


class KLAutoencoder(nn.Module):
    """``AutoencoderKL`` seen as an image -> image generator; ``self.kl`` holds the last forward's KL term."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder
        self.kl = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recon, mu, sigma = self.autoencoder(x)
        self.kl = kl_divergence(mu, sigma)
        return recon

    def state_dict(self, *args, **kwargs):  # checkpoints hold the bare AutoencoderKL weights
        return self.autoencoder.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.autoencoder.load_state_dict(state_dict, strict=strict, assign=assign)


class ReconstructionKLLoss(nn.Module):
    """``l1_weight * |x_hat - x| + kl_weight * KL + perceptual_weight * perceptual(x_hat, x)``.

    ``perceptual`` is optional: without locally configured weights the term is off (and says so once).
    """

    def __init__(self, generator: KLAutoencoder, kl_weight: float = 1e-6, l1_weight: float = 1.0,
                 perceptual: nn.Module | None = None, perceptual_weight: float = 0.0):
        super().__init__()
        self.generator, self.kl_weight, self.l1_weight = generator, kl_weight, l1_weight
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight
        if perceptual is None or perceptual_weight == 0:
            logger.info("autoencoder: perceptual loss off (no local perceptual weights configured)")

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.l1_weight * (recon.float() - target.float()).abs().mean() + self.kl_weight * self.generator.kl
        if self.perceptual is not None and self.perceptual_weight:
            loss = loss + self.perceptual_weight * self.perceptual(recon.float(), target.float()).mean()
        return loss


class _Warmup:
    def __init__(self, weight: float, warmup_iterations: int):
        self.weight, self.warmup_iterations, self.iteration = float(weight), int(warmup_iterations), 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._sync)

    def _sync(self, engine: Engine) -> None:
        self.iteration = engine.state.iteration

    @property
    def active(self) -> bool:
        return self.iteration > self.warmup_iterations and self.weight > 0


class AdversarialTerm(_Warmup):
    """Generator's adversarial loss on ``PatchDiscriminator`` logits; 0 until ``warmup_iterations`` passed.
    Attach it to the trainer (list it in ``train_handlers``) so it sees the iteration count, resumes included."""

    def __init__(self, weight: float = 0.01, warmup_iterations: int = 0, criterion: str = "least_squares"):
        super().__init__(weight, warmup_iterations)
        self.loss = PatchAdversarialLoss(criterion=criterion)

    def __call__(self, fake_logits: Any) -> torch.Tensor:
        logits = fake_logits[-1] if isinstance(fake_logits, (list, tuple)) else fake_logits
        if not self.active:
            return logits.sum() * 0.0
        return self.weight * self.loss(logits, target_is_real=True, for_discriminator=False)


class DiscriminatorTerm(_Warmup):
    """Discriminator loss (real vs fake); 0 until the warm-up has passed, so D starts with G's adversarial term."""

    def __init__(self, weight: float = 0.01, warmup_iterations: int = 0, criterion: str = "least_squares"):
        super().__init__(weight, warmup_iterations)
        self.loss = PatchAdversarialLoss(criterion=criterion)

    def __call__(self, real_logits: Any, fake_logits: Any) -> torch.Tensor:
        real = real_logits[-1] if isinstance(real_logits, (list, tuple)) else real_logits
        fake = fake_logits[-1] if isinstance(fake_logits, (list, tuple)) else fake_logits
        if not self.active:
            return (real.sum() + fake.sum()) * 0.0
        return self.weight * 0.5 * (self.loss(real, target_is_real=True, for_discriminator=True)
                                    + self.loss(fake, target_is_real=False, for_discriminator=True))


def prepare_reconstruction_batch(batch: dict, device: Any = None, non_blocking: bool = False, **kwargs) -> tuple:
    """``prepare_batch`` for autoencoders: the image is both input and target (as a plain tensor: MetaTensor
    bookkeeping on every network op only costs time here)."""
    x = batch["image"]
    x = (x.as_tensor() if hasattr(x, "as_tensor") else x).to(device=device, non_blocking=non_blocking)
    return x, x
