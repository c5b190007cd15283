"""Conditional (paired) GAN training and image-to-image inference on MONAI's engines.

Training: :class:`ConditionalGANTrainer` is MONAI's ``AdversarialTrainer`` (same constructor, events, handlers,
``g_network`` / ``d_network`` state) with a pix2pix iteration. MONAI's iteration is unconditional -- its
discriminator sees the generator *input* as "real" and never the condition -- so ``_iteration`` is replaced:

1. ``fake = G(x)``;
2. discriminator step on ``D([x, y])`` (real) vs ``D([x, fake.detach()])`` (fake) -- ``d_loss_function(real_logits,
   fake_logits)``;
3. generator step on ``recon_loss_function(fake, y) + gan_weight * g_loss_function(D([x, fake]))`` with the
   discriminator frozen.

``d_network=None`` or ``gan_weight=0`` trains the generator on the reconstruction loss only (a supervised
baseline with the same data, schedule and checkpoints). Networks may be wrapped in ``DistributedDataParallel``.

Inference: :class:`ImageTranslator` runs a generator in eval mode (checked on every module, see
:func:`eval_mode`), on [0, 1] images, with MONAI sliding-window inference for images larger than the training
size; :func:`translate_files` turns an image file or folder into translated PNGs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.engines import AdversarialTrainer
from monai.inferers import sliding_window_inference
from monai.losses import PatchAdversarialLoss
from monai.utils import AdversarialIterationEvents, AdversarialKeys
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from ..errors import BreastGenError

__all__ = ["PairedBatch", "GeneratorAdversarialLoss", "DiscriminatorAdversarialLoss", "ConditionalGANTrainer",
           "linear_decay_scheduler", "linear_decay", "eval_mode", "unwrap", "ImageTranslator", "list_images",
           "check_rgb_files", "translate_files"]
logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (or the module itself)."""
    return network.module if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else network


def _logits(out: Any) -> torch.Tensor:
    """MONAI's PatchDiscriminator returns all intermediate features; the logit map is the last one."""
    return out[-1] if isinstance(out, (list, tuple)) else out


class PairedBatch:
    """``prepare_batch`` for dict batches: ``(batch[image_key], batch[target_key])`` as plain tensors on ``device``."""

    def __init__(self, image_key: str = "image", target_key: str = "target"):
        self.image_key, self.target_key = image_key, target_key

    def __call__(self, batchdata: dict, device: Any = None, non_blocking: bool = False, **kwargs: Any):
        def get(key: str) -> torch.Tensor:
            t = batchdata[key]
            t = t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)
            return t.to(device=device, non_blocking=non_blocking, **kwargs)

        return get(self.image_key), get(self.target_key)


class GeneratorAdversarialLoss(nn.Module):
    """Generator side of the GAN loss on discriminator logits (MONAI ``PatchAdversarialLoss``; "bce" = vanilla GAN)."""

    def __init__(self, criterion: str = "bce"):
        super().__init__()
        self.loss = PatchAdversarialLoss(criterion=criterion, reduction="mean")

    def forward(self, fake_logits: Any) -> torch.Tensor:
        return self.loss(_logits(fake_logits), target_is_real=True, for_discriminator=False)


class DiscriminatorAdversarialLoss(nn.Module):
    """Discriminator side: ``weight * (loss(real -> 1) + loss(fake -> 0))``; pix2pix halves it (``weight=0.5``) to
    slow the discriminator down relative to the generator."""

    def __init__(self, criterion: str = "bce", weight: float = 0.5):
        super().__init__()
        self.loss = PatchAdversarialLoss(criterion=criterion, reduction="mean")
        self.weight = float(weight)

    def forward(self, real_logits: Any, fake_logits: Any) -> torch.Tensor:
        real = self.loss(_logits(real_logits), target_is_real=True, for_discriminator=True)
        fake = self.loss(_logits(fake_logits), target_is_real=False, for_discriminator=True)
        return self.weight * (real + fake)


def linear_decay(n_constant: int = 100, n_decay: int = 100) -> Callable[[int], float]:
    """Learning-rate factor per epoch: 1 for ``n_constant`` epochs, then linearly down towards 0 over ``n_decay``
    epochs (the pix2pix "linear" policy)."""
    n_constant, n_decay = int(n_constant), int(n_decay)

    def factor(epoch: int) -> float:
        return 1.0 - max(0, epoch + 1 - n_constant) / float(n_decay + 1)

    return factor


def linear_decay_scheduler(optimizer: torch.optim.Optimizer, n_constant: int = 100,
                           n_decay: int = 100) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :func:`linear_decay`; step it once per epoch (MONAI ``LrScheduleHandler``). The factor is a
    plain function, so a checkpoint keeps the scheduler's position but the schedule always comes from the config."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, linear_decay(n_constant, n_decay))


def _set_requires_grad(network: nn.Module | None, flag: bool) -> None:
    if network is not None:
        for p in network.parameters():
            p.requires_grad_(flag)


class ConditionalGANTrainer(AdversarialTrainer):
    """pix2pix-style paired GAN training on MONAI's ``AdversarialTrainer`` (see the module docstring).

    Extra arguments: ``gan_weight`` (weight of the generator's adversarial term; 0 = reconstruction only),
    ``condition_discriminator`` (discriminator input is ``[input, output]`` concatenated on channels; False gives an
    unconditional discriminator on the output alone). ``recon_loss_function(fake, target)`` should include its own
    weight (e.g. :class:`breastgen.losses.PyramidL1Loss`, weight 25). ``engine.state.output`` holds ``image``,
    ``label``, ``pred`` and the loss terms (``loss``, ``g_loss``, ``d_loss``, ``reconstruction_loss``) as floats.
    """

    def __init__(self, *args: Any, gan_weight: float = 1.0, condition_discriminator: bool = True,
                 prepare_batch: Callable | None = None, **kwargs: Any):
        kwargs.setdefault("g_loss_function", GeneratorAdversarialLoss())
        kwargs.setdefault("d_loss_function", DiscriminatorAdversarialLoss())
        kwargs.setdefault("d_network", None)
        kwargs.setdefault("d_optimizer", None)
        kwargs.setdefault("decollate", False)
        super().__init__(*args, prepare_batch=prepare_batch or PairedBatch(), **kwargs)
        self.gan_weight = float(gan_weight)
        self.condition_discriminator = bool(condition_discriminator)
        if self.gan_weight > 0 and (self.state.d_network is None or self.state.d_optimizer is None):
            raise BreastGenError("gan_weight > 0 needs d_network and d_optimizer (set gan_weight to 0 for a "
                                 "reconstruction-only baseline)")

    def _complete_state_dict_user_keys(self) -> None:
        # MONAI would put the networks/optimizers themselves into the engine's state_dict, which then cannot be
        # loaded with weights_only=True; checkpoints save them by their own state_dicts via the save_dict instead.
        return None

    def _d_input(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return torch.cat([inputs, outputs], dim=1) if self.condition_discriminator else outputs

    def _iteration(self, engine: ConditionalGANTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        g, d = engine.state.g_network, engine.state.d_network
        adversarial = d is not None and engine.gan_weight > 0
        autocast = torch.autocast("cuda", **engine.amp_kwargs) if engine.amp else contextlib.nullcontext()

        g.train()
        with autocast:
            fakes = engine.g_inferer(inputs, g)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets, Keys.PRED: fakes,
                               AdversarialKeys.REALS: targets, AdversarialKeys.FAKES: fakes}
        engine.fire_event(AdversarialIterationEvents.GENERATOR_FORWARD_COMPLETED)

        d_loss = torch.zeros((), device=inputs.device)
        if adversarial:
            d.train()
            _set_requires_grad(d, True)
            engine.state.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            with autocast:
                real_logits = engine.d_inferer(engine._d_input(inputs, targets), d)
                engine.fire_event(AdversarialIterationEvents.DISCRIMINATOR_REALS_FORWARD_COMPLETED)
                fake_logits = engine.d_inferer(engine._d_input(inputs, fakes.detach()), d)
                engine.fire_event(AdversarialIterationEvents.DISCRIMINATOR_FAKES_FORWARD_COMPLETED)
                d_loss = engine.state.d_loss_function(real_logits, fake_logits).mean()
            engine.fire_event(AdversarialIterationEvents.DISCRIMINATOR_LOSS_COMPLETED)
            engine._step(d_loss, engine.state.d_optimizer, engine.state.d_scaler)
            engine.fire_event(AdversarialIterationEvents.DISCRIMINATOR_BACKWARD_COMPLETED)
            _set_requires_grad(d, False)

        engine.state.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with autocast:
            recon = engine.state.recon_loss_function(fakes, targets).mean()
            engine.fire_event(AdversarialIterationEvents.RECONSTRUCTION_LOSS_COMPLETED)
            g_adv = torch.zeros((), device=inputs.device)
            if adversarial:
                # the frozen discriminator is called unwrapped: its parameters get no gradient here, which a
                # DistributedDataParallel wrapper would wait for
                g_adv = engine.state.g_loss_function(unwrap(d)(engine._d_input(inputs, fakes))).mean()
            engine.fire_event(AdversarialIterationEvents.GENERATOR_LOSS_COMPLETED)
            loss = recon + engine.gan_weight * g_adv
        engine._step(loss, engine.state.g_optimizer, engine.state.g_scaler)
        engine.fire_event(AdversarialIterationEvents.GENERATOR_BACKWARD_COMPLETED)
        engine.fire_event(AdversarialIterationEvents.GENERATOR_MODEL_COMPLETED)
        if adversarial:
            _set_requires_grad(d, True)

        engine.state.output.update({Keys.LOSS: loss.item(), AdversarialKeys.RECONSTRUCTION_LOSS: recon.item(),
                                    AdversarialKeys.GENERATOR_LOSS: g_adv.item(),
                                    AdversarialKeys.DISCRIMINATOR_LOSS: d_loss.item()})
        if not all(np.isfinite(engine.state.output[k]) for k in (Keys.LOSS, AdversarialKeys.DISCRIMINATOR_LOSS)):
            raise BreastGenError(f"training diverged at iteration {engine.state.iteration}: loss "
                                 f"{engine.state.output[Keys.LOSS]}, d_loss "
                                 f"{engine.state.output[AdversarialKeys.DISCRIMINATOR_LOSS]} (lower the learning rate)")
        return engine.state.output

    def _step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        if self.amp and scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()


# --------------------------------------------------------------------------------------------------- inference

def _refuse_training(module: nn.Module, args: Any) -> None:
    if module.training:
        raise BreastGenError(f"{type(module).__name__} ran in train mode during evaluation/inference (BatchNorm "
                             "would use batch statistics, dropout would be active); call network.eval()")


@contextlib.contextmanager
def eval_mode(network: nn.Module, check: bool = True) -> Iterator[nn.Module]:
    """Put ``network`` in eval mode for the block and, with ``check``, refuse (BreastGenError) any forward of a
    module that is in train mode anyway (e.g. a submodule that overrides ``train()`` or switches itself on in
    ``forward``). The previous mode of every module is restored afterwards."""
    modes = [(m, m.training) for m in network.modules()]
    network.eval()
    handles = [m.register_forward_pre_hook(_refuse_training) for m in network.modules()] if check else []
    try:
        with torch.no_grad():
            yield network
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode


class ImageTranslator:
    """Apply an image-to-image generator to [0, 1] images ``(C, W, H)`` or batches ``(B, C, W, H)``.

    The network works on ``in_range`` (default [-1, 1], tanh output) and runs in eval mode under
    :func:`eval_mode`. Images larger than ``roi_size`` (the training crop) along any axis go through MONAI's
    ``sliding_window_inference`` (``overlap``, ``mode`` = "gaussian" blending); others run in one pass, padded
    by reflection to a multiple of the network's ``size_multiple``. Returns [0, 1] float tensors on the CPU.
    """

    def __init__(self, network: nn.Module, roi_size: int | Sequence[int] | None = None, overlap: float = 0.25,
                 mode: str = "gaussian", sw_batch_size: int = 1, device: Any = "cpu",
                 in_range: Sequence[float] = (-1.0, 1.0), check_eval: bool = True):
        self.network = network
        self.roi_size = None if roi_size is None else tuple(int(r) for r in np.broadcast_to(roi_size, (2,)))
        self.overlap, self.mode, self.sw_batch_size = float(overlap), mode, int(sw_batch_size)
        self.device = torch.device(device)
        self.lo, self.hi = float(in_range[0]), float(in_range[1])
        self.check_eval = check_eval

    def _pad_run(self, x: torch.Tensor) -> torch.Tensor:
        m = int(getattr(unwrap(self.network), "size_multiple", 1))
        w, h = x.shape[-2:]
        pw, ph = (-w) % m, (-h) % m
        if pw or ph:
            mode = "reflect" if pw < w and ph < h else "replicate"
            x = torch.nn.functional.pad(x, (0, ph, 0, pw), mode=mode)
        return self.network(x)[..., :w, :h]

    def __call__(self, image: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        single = x.ndim == 3
        x = (x[None] if single else x).float().to(self.device)
        x = x * (self.hi - self.lo) + self.lo
        with eval_mode(self.network, self.check_eval):
            if self.roi_size is not None and any(s > r for s, r in zip(x.shape[-2:], self.roi_size)):
                y = sliding_window_inference(x, self.roi_size, self.sw_batch_size, self._pad_run,
                                             overlap=self.overlap, mode=self.mode, padding_mode="reflect")
            else:
                y = self._pad_run(x)
        y = ((y.float() - self.lo) / (self.hi - self.lo)).clamp(0, 1).cpu()
        y = y.as_tensor() if hasattr(y, "as_tensor") else y
        return y[0] if single else y


def list_images(path: str | os.PathLike, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """One image file, or the image files of a folder (sorted, not recursive); none found -> BreastGenError."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise BreastGenError("input not found (give an image file or a folder of images)", path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise BreastGenError(f"no images ({', '.join(suffixes)}) in folder", path)
    return files


def check_rgb_files(files: Sequence[str | os.PathLike], what: str = "tile") -> None:
    """Read every file's header: unreadable or non-RGB files -> one BreastGenError listing all of them."""
    from PIL import Image

    bad = []
    for f in files:
        try:
            with Image.open(f) as im:
                if im.mode not in ("RGB", "RGBA"):
                    bad.append(f"{Path(f).name} (mode {im.mode})")
        except Exception as e:  # noqa: BLE001 - any decoding problem is reported with the file
            bad.append(f"{Path(f).name} ({type(e).__name__})")
    if bad:
        folder = Path(files[0]).parent if len({Path(f).parent for f in files}) == 1 else None
        raise BreastGenError(f"{len(bad)} {what}(s) not RGB or unreadable: {', '.join(bad)}", folder)


def load_rgb(path: str | os.PathLike) -> torch.Tensor:
    """An RGB image file as a float (3, W, H) tensor in [0, 1] (alpha dropped)."""
    from ..data.readers import load_image

    arr, _ = load_image(path)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise BreastGenError(f"expected an RGB image, got array of shape {arr.shape}", path)
    scale = 255.0 if arr.dtype == np.uint8 else float(np.iinfo(arr.dtype).max) if arr.dtype.kind == "u" else 1.0
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr[..., :3], -1, 0)).astype(np.float32) / scale)


def translate_files(translator: Callable[[torch.Tensor], torch.Tensor], inputs: str | os.PathLike,
                    output_dir: str | os.PathLike, suffix: str = ".png") -> list[Path]:
    """Translate an image file or every image of a folder; writes ``<output_dir>/<stem><suffix>`` (8-bit PNG,
    atomically). All inputs are checked (readable, RGB) before anything is written."""
    from ..io import save_png

    files = list_images(inputs)
    check_rgb_files(files)
    out = []
    for f in files:
        y = translator(load_rgb(f))
        out.append(save_png(y, Path(output_dir) / f"{f.stem}{suffix}"))
    logger.info("translated %d image(s) into %s", len(out), output_dir)
    return out
