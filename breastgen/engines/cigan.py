"""ciGAN training and use: a MONAI trainer with a fixed D/G schedule, lesion infilling of patches and full
mammograms (pasted back, outside-mask pixels untouched), synthetic patch sets and evaluation.

:class:`CIGANTrainer` is a :class:`monai.engines.Trainer` (MONAI's ``GanTrainer`` feeds the generator latent
codes drawn independently of the batch, which cannot express conditional infilling, hence this subclass). One
iteration, given a batch of patches ``x`` in [0, 1], lesion masks ``m`` and classes ``y``:

1. the generator input is ``x`` with the masked pixels replaced by uniform noise; ``G`` infills it;
   ``composite = m * G + (1 - m) * x``;
2. warm-up (the first ``warmup_iterations``, paper 1000): the generator is trained on the reconstruction losses
   only (boundary, masked L1, perceptual), the discriminator is not touched;
3. afterwards, a fixed schedule -- ``d_steps`` discriminator updates, then one generator update, every iteration
   (the reference switched on loss thresholds) -- with the non-saturating adversarial loss and the auxiliary
   class head: D learns the class of real patches, G is asked to make composites of class ``y``.

Networks, losses and optimisers come from the config; ``ResumeFromLatest`` / ``CheckpointSaver`` handle
checkpoints. Works with DDP-wrapped networks (multi_gpu_train.json).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.engines import Trainer
from monai.engines.utils import default_metric_cmp_fn
from torch import nn

from ..data.patches import CLASSES, check_mask_on_breast, load_mask_pool, place_lesion_mask
from ..data.readers import load_image
from ..data.transforms import ScaleIntensityMammo, breast_mask
from ..errors import BreastGenError
from ..io.atomic import atomic_write_json
from ..io.images import make_grid, save_png, save_png16
from ..losses.cigan import (CIGANReconstructionLoss, boundary_weight_map, d_adversarial_loss, g_adversarial_loss,
                            mask_rim)

__all__ = ["CIGANTrainer", "class_index", "infill_patches", "infill_image", "run_infill_jobs", "make_infill_jobs",
           "balancing_counts", "synthesize_patches", "evaluate_cigan"]
logger = logging.getLogger(__name__)


def class_index(label: Any, classes: Sequence[str] = CLASSES) -> int:
    """Index of a class name ('normal', 'benign', 'malignant') or pass an index through; one-line error otherwise."""
    if isinstance(label, (int, np.integer)) and 0 <= int(label) < len(classes):
        return int(label)
    key = str(label).strip().lower()
    if key not in classes:
        raise BreastGenError(f"unknown lesion class {label!r}; allowed: {', '.join(classes)}")
    return classes.index(key)


def _unwrap(net: nn.Module) -> nn.Module:
    return net.module if hasattr(net, "module") and isinstance(getattr(net, "module"), nn.Module) else net


class CIGANTrainer(Trainer):
    """Conditional infilling GAN trainer (see the module docstring).

    Args:
        device, max_epochs, train_data_loader, epoch_length, non_blocking, train_handlers, amp: as MONAI trainers.
        generator / discriminator: networks (may be DDP-wrapped); g_optimizer / d_optimizer their optimisers.
        recon_loss: :class:`~breastgen.losses.cigan.CIGANReconstructionLoss`.
        warmup_iterations: generator-only iterations on the reconstruction losses (paper: 1000).
        d_steps: discriminator updates before each generator update (fixed schedule).
        adv_weight / class_weight: weights of the adversarial and the class-head terms.
        image_key / mask_key / label_key: batch keys (labels are class indices).
    """

    def __init__(self, device: torch.device | str, max_epochs: int, train_data_loader: Iterable,
                 generator: nn.Module, discriminator: nn.Module, g_optimizer: torch.optim.Optimizer,
                 d_optimizer: torch.optim.Optimizer, recon_loss: CIGANReconstructionLoss | None = None,
                 warmup_iterations: int = 1000, d_steps: int = 1, adv_weight: float = 1.0, class_weight: float = 1.0,
                 epoch_length: int | None = None, non_blocking: bool = False, train_handlers: Sequence | None = None,
                 amp: bool = False, image_key: str = "image", mask_key: str = "mask", label_key: str = "label"):
        if d_steps < 1 or warmup_iterations < 0:
            raise BreastGenError(f"d_steps must be >= 1 and warmup_iterations >= 0, not {d_steps} / {warmup_iterations}")
        super().__init__(device=device, max_epochs=max_epochs, data_loader=train_data_loader,
                         epoch_length=epoch_length, non_blocking=non_blocking, handlers=train_handlers, amp=amp,
                         metric_cmp_fn=default_metric_cmp_fn, decollate=False)
        self.generator, self.discriminator = generator, discriminator
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.recon_loss = recon_loss if recon_loss is not None else CIGANReconstructionLoss()
        self.warmup_iterations, self.d_steps = int(warmup_iterations), int(d_steps)
        self.adv_weight, self.class_weight = float(adv_weight), float(class_weight)
        self.keys = (image_key, mask_key, label_key)

    def _batch(self, batchdata: Mapping) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.state.device
        x, m, y = (torch.as_tensor(batchdata[k]) for k in self.keys)
        x = x.as_subclass(torch.Tensor).to(dev, torch.float32, non_blocking=self.non_blocking)
        m = (m.as_subclass(torch.Tensor) > 0.5).to(dev, torch.float32, non_blocking=self.non_blocking)
        return x, m, y.as_subclass(torch.Tensor).long().reshape(-1).to(dev)

    def _iteration(self, engine: "CIGANTrainer", batchdata: Mapping) -> dict:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        x, m, y = engine._batch(batchdata)
        G, D = engine.generator, engine.discriminator
        G.train()
        noisy = x * (1 - m) + torch.rand_like(x) * m
        fake = G(noisy, m, y)
        composite = m * fake + (1 - m) * x
        warm = engine.state.iteration <= engine.warmup_iterations
        out: dict[str, float] = {"warmup": float(warm)}
        if not warm:
            D.train()
            xs, ms, ys = torch.cat([x, composite.detach()]), torch.cat([m, m]), torch.cat([y, y])
            for _ in range(engine.d_steps):
                engine.d_optimizer.zero_grad(set_to_none=True)
                adv, cls = D(xs, ms, ys)
                real_adv, fake_adv = adv.chunk(2)
                d_adv = d_adversarial_loss(real_adv, fake_adv)
                d_cls = F.cross_entropy(cls[: len(y)], y)
                d_loss = d_adv + engine.class_weight * d_cls
                d_loss.backward()
                engine.d_optimizer.step()
            out.update(d_loss=d_loss.item(), d_adv=d_adv.item(), d_class=d_cls.item(),
                       d_class_acc=float((cls[: len(y)].argmax(1) == y).float().mean()))
        engine.g_optimizer.zero_grad(set_to_none=True)
        terms = engine.recon_loss(fake, x, m)
        g_loss = terms["total"]
        if not warm:
            adv, cls = D(composite, m, y)
            g_adv, g_cls = g_adversarial_loss(adv), F.cross_entropy(cls, y)
            g_loss = g_loss + engine.adv_weight * g_adv + engine.class_weight * g_cls
            out.update(g_adv=g_adv.item(), g_class=g_cls.item())
        g_loss.backward()
        engine.g_optimizer.step()
        out.update(g_loss=g_loss.item(), **{f"rec_{k}": v.item() for k, v in terms.items() if k != "total"})
        return out


# ------------------------------------------------------------------------------------------------ infilling
@torch.no_grad()
def infill_patches(generator: nn.Module, patches: torch.Tensor, masks: torch.Tensor, labels: Any,
                   seed: int | None = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Infill (B, 1, P, P) patches in [0, 1] under (B, 1, P, P) masks with classes ``labels``.

    Returns ``(composite, raw)``: ``composite`` has the generator's pixels inside the mask and the input's pixels,
    bit for bit, outside it; ``raw`` is the generator output (in [0, 1]). ``seed`` fixes the corruption noise.
    """
    g = _unwrap(generator)
    dev = next(g.parameters()).device
    x = torch.as_tensor(patches, dtype=torch.float32).to(dev)
    m = (torch.as_tensor(masks).to(dev) > 0.5).to(torch.float32)
    y = torch.as_tensor([class_index(v) for v in labels] if not torch.is_tensor(labels) else labels).long().to(dev)
    if y.numel() == 1 and x.shape[0] > 1:
        y = y.expand(x.shape[0])
    gen = torch.Generator(device="cpu").manual_seed(int(seed)) if seed is not None else None
    noise = torch.rand(x.shape, generator=gen).to(dev)
    was_training = g.training
    g.eval()
    raw = g(x * (1 - m) + noise * m, m, y)
    g.train(was_training)
    return torch.where(m > 0, raw, x), raw


def _value_range(img: np.ndarray, meta: Mapping, is_patch: bool) -> tuple[float, float]:
    if is_patch and img.dtype.kind in "ui":
        bits = int(meta.get("BitsStored") or 8 * img.dtype.itemsize)
        return 0.0, float(2 ** bits - 1)
    from monai.data import MetaTensor

    # the same percentile range patch extraction scales with (ScaleIntensityMammo records it in the meta data)
    scaled = ScaleIntensityMammo()(MetaTensor(torch.as_tensor(img.astype(np.float32, copy=False))))
    lo, hi = scaled.meta["intensity_range"]
    return float(lo), float(hi)


def infill_image(generator: nn.Module, image: np.ndarray, mask: np.ndarray, label: Any, *, meta: Mapping | None = None,
                 breast: np.ndarray | None = None, min_on_breast: float = 0.9, seed: int = 0,
                 max_fill: float = 0.8, src: Any = None) -> dict:
    """Synthesise a lesion of class ``label`` under ``mask`` in a patch or a full mammogram (both (W, H), native
    intensities); returns ``image`` (same dtype, only mask pixels changed), ``window`` [x0, y0, x1, y1],
    ``on_breast`` and ``patch`` (the generator's composite window in [0, 1]).

    A window around the mask (the generator's patch size, larger -- and resized -- when the mask fills more than
    ``max_fill`` of it) is scaled to [0, 1] with the image's intensity range, infilled, scaled back, and only the
    pixels under ``mask`` are written into a copy of the image at full resolution.
    """
    g = _unwrap(generator)
    P = int(getattr(g, "out_size", 256))
    img = np.asarray(image)
    if img.ndim != 2:
        raise BreastGenError(f"expected a grey 2D image, got shape {img.shape}", src)
    m = np.asarray(mask) > 0
    m = m[0] if m.ndim == 3 else m
    if m.shape != img.shape:
        raise BreastGenError(f"lesion mask size {m.shape[0]} x {m.shape[1]} differs from the image size "
                             f"{img.shape[0]} x {img.shape[1]} (W x H)", src)
    W, H = img.shape
    if W < P or H < P:
        raise BreastGenError(f"image {W} x {H} is smaller than the generator's {P} x {P} patches", src)
    is_patch = (W, H) == (P, P)
    lo, hi = _value_range(img, meta or {}, is_patch)
    scaled = np.clip((img.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
    if breast is None:
        breast = scaled > 0.05 if is_patch else breast_mask(img)
    on = check_mask_on_breast(m, breast, src, min_on_breast)
    xs, ys = np.nonzero(m)
    bw, bh = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
    S = min(max(P, math.ceil(max(bw, bh) / max_fill)), W, H)
    if max(bw, bh) > S:
        raise BreastGenError(f"lesion mask ({bw} x {bh}) is larger than the image allows ({S} x {S} window)", src)
    cx, cy = (xs.min() + xs.max() + 1) // 2, (ys.min() + ys.max() + 1) // 2
    x0, y0 = int(np.clip(cx - S // 2, 0, W - S)), int(np.clip(cy - S // 2, 0, H - S))
    win = torch.from_numpy(scaled[x0:x0 + S, y0:y0 + S])[None, None]
    wm = torch.from_numpy(m[x0:x0 + S, y0:y0 + S].astype(np.float32))[None, None]
    if S != P:
        win_in = F.interpolate(win, size=(P, P), mode="area")
        m_in = (F.interpolate(wm, size=(P, P), mode="area") > 0.5).float()
        if not m_in.any():
            m_in = (F.interpolate(wm, size=(P, P), mode="area") > 0).float()
    else:
        win_in, m_in = win, wm
    composite, raw = infill_patches(g, win_in, m_in, [class_index(label)], seed=seed)
    out_win = raw.cpu() if S == P else F.interpolate(raw.cpu(), size=(S, S), mode="bilinear", align_corners=False)
    values = lo + out_win[0, 0].numpy().astype(np.float64) * (hi - lo)
    if img.dtype.kind in "ui":
        info = np.iinfo(img.dtype)
        values = np.clip(np.round(values), info.min, info.max)
    out = img.copy()
    region = out[x0:x0 + S, y0:y0 + S]
    inside = m[x0:x0 + S, y0:y0 + S]
    region[inside] = values[inside].astype(img.dtype)
    return {"image": out, "window": [x0, y0, x0 + S, y0 + S], "on_breast": on,
            "patch": composite[0, 0].cpu().numpy() if S == P else np.where(inside, out_win[0, 0].numpy(),
                                                                             scaled[x0:x0 + S, y0:y0 + S])}


def make_infill_jobs(datalist: str | os.PathLike, section: str = "test", n: int = 4,
                     classes: Sequence[str] = ("benign", "malignant"), mask_section: str = "training",
                     zoom_range: Sequence[float] = (0.75, 1.25), seed: int = 0) -> list[dict]:
    """Demo jobs: ``n`` normal mammograms of ``section`` each paired with a lesion mask of ``mask_section`` (its
    lesion cases), randomly zoomed and placed on breast tissue, classes cycling through ``classes``.
    Masks are given inline (``mask_array``), nothing is written."""
    from ..data.datalists import load_datalist

    rng = np.random.default_rng(seed)
    normals = [e for e in load_datalist(datalist, section) if e.get("label", "normal") == "normal"][:n]
    lesions = [e for e in load_datalist(datalist, mask_section) if e.get("mask")]
    if not normals or not lesions:
        raise BreastGenError(f"need normal images in '{section}' and lesion masks in '{mask_section}'", datalist)
    jobs = []
    for i, e in enumerate(normals):
        img, _ = load_image(e["image"], modalities=None)
        lesion = load_image(lesions[i % len(lesions)]["mask"], modalities=None, allow_constant=True)[0] > 0
        placed = place_lesion_mask(lesion, breast_mask(img), rng, zoom_range, min_on_breast=1.0)
        jobs.append({"image": e["image"], "mask_array": placed, "mask_source": lesions[i % len(lesions)]["mask"],
                     "label": classes[i % len(classes)], "name": f"{Path(e['image']).stem}_{classes[i % len(classes)]}"})
    return jobs


def _preview(before: np.ndarray, after: np.ndarray, mask: np.ndarray, window: Sequence[int]) -> np.ndarray:
    """(3, W, H) grid: input, mask outline, result, and the window zoomed (all 8-bit display)."""
    lo, hi = float(before.min()), float(max(before.max(), after.max()))
    b = (before.astype(np.float32) - lo) / max(hi - lo, 1)
    a = (after.astype(np.float32) - lo) / max(hi - lo, 1)
    rim = mask_rim(mask)
    over = np.stack([np.maximum(b, rim), b * ~rim, b * ~rim])
    x0, y0, x1, y1 = window
    zoom = [b[x0:x1, y0:y1], a[x0:x1, y0:y1]]
    scale = max(1, min(b.shape) // max(1, x1 - x0))
    zoom = [np.kron(z, np.ones((scale, scale), np.float32)) for z in zoom]
    return make_grid([b, over, a, *zoom], ncol=5)


def run_infill_jobs(generator: nn.Module, jobs: Sequence[Mapping], output_dir: str | os.PathLike,
                    formats: Sequence[str] = ("png", "dcm"), min_on_breast: float = 0.9, seed: int = 0,
                    params: Mapping | None = None) -> list[dict]:
    """Infill each job -- ``image`` (a patch or a full mammogram), ``mask`` (file) or ``mask_array``, ``label``
    (benign / malignant / normal), optional ``breast`` (file), ``name`` -- and write ``<name>.png`` (16-bit),
    ``<name>.dcm`` (synthetic DICOM, no source patient data), ``<name>_preview.png`` and ``jobs.json``.

    Every job is validated (files, mask size, mask on breast, class) before anything is written.
    """
    from ..io.dicom import write_synthetic_dicom

    out_dir = Path(output_dir)
    loaded = []
    for i, job in enumerate(jobs):
        src = job.get("image")
        img, meta = load_image(src, modalities=None)
        if img.ndim != 2:
            raise BreastGenError(f"expected a grey image, got shape {img.shape}", src)
        if job.get("mask_array") is not None:
            mask = np.asarray(job["mask_array"]) > 0
        elif job.get("mask"):
            mask = load_image(job["mask"], modalities=None, allow_constant=True)[0]
            mask = (mask.mean(-1) if mask.ndim == 3 else mask) > 0
        else:
            raise BreastGenError(f"infill job {i} has no 'mask'", src)
        breast = None
        if job.get("breast"):
            breast = load_image(job["breast"], modalities=None, allow_constant=True)[0] > 0
        label = job.get("label", "malignant")
        class_index(label)
        loaded.append((job, img, meta, mask, breast, label))
    # validate all (sizes, breast overlap) by a dry check before writing anything
    P = int(getattr(_unwrap(generator), "out_size", 256))
    for i, (job, img, meta, mask, breast, label) in enumerate(loaded):
        src = job.get("mask") or job.get("image")
        if mask.shape != img.shape:
            raise BreastGenError(f"lesion mask size {mask.shape[0]} x {mask.shape[1]} differs from the image size "
                                 f"{img.shape[0]} x {img.shape[1]} (W x H)", src)
        if breast is None:
            if img.shape == (P, P):
                lo, hi = _value_range(img, meta, True)
                breast = (img.astype(np.float32) - lo) / max(hi - lo, 1e-6) > 0.05
            else:
                breast = breast_mask(img)
        check_mask_on_breast(mask, breast, src, min_on_breast)
        loaded[i] = (job, img, meta, mask, breast, label)
    records = []
    for k, (job, img, meta, mask, breast, label) in enumerate(loaded):
        res = infill_image(generator, img, mask, label, meta=meta, breast=breast, min_on_breast=min_on_breast,
                           seed=seed + k, src=job.get("mask") or job.get("image"))
        name = job.get("name") or f"{Path(str(job['image'])).stem}_{label}"
        out = res["image"]
        if "png" in formats:
            save_png16(out if out.dtype == np.uint16 else out.astype(np.float32) / max(1.0, float(out.max())),
                       out_dir / f"{name}.png")
        if "dcm" in formats:
            arr16 = out.astype(np.uint16) if out.dtype.kind in "ui" and out.max() < 65536 else \
                np.round(65535 * (out - out.min()) / max(1e-6, float(np.ptp(out)))).astype(np.uint16)
            write_synthetic_dicom(out_dir / f"{name}.dcm", arr16.T, source_meta={
                "laterality": meta.get("ImageLaterality"), "view": meta.get("ViewPosition"),
                "manufacturer": meta.get("Manufacturer"), "modality": meta.get("Modality")},
                description=f"ciGAN {label} lesion infill",
                params={"method": "ciGAN infill", "class": label, "seed": seed + k, "window": res["window"],
                        **(params or {})})
        save_png(_preview(img, out, mask, res["window"]), out_dir / f"{name}_preview.png")
        changed = out != img
        records.append({"name": name, "image": str(job["image"]), "label": label, "window": res["window"],
                        "on_breast": round(res["on_breast"], 4), "mask_pixels": int(mask.sum()),
                        "outside_mask_identical": bool(not changed[~mask].any()),
                        "mean_change_in_mask": float(np.abs(out[mask].astype(np.float64) - img[mask]).mean()),
                        "mask_source": str(job.get("mask_source") or job.get("mask") or "inline")})
    atomic_write_json(out_dir / "jobs.json", records)
    return records


# ------------------------------------------------------------------------------------------------ synthesis
def balancing_counts(patch_datalist: str | os.PathLike, section: str = "training",
                     groups: Mapping[str, Any] | None = None, max_total: int | None = None) -> dict[str, int]:
    """How many synthetic lesion patches per class balance the classes of ``section``.

    ``groups`` maps each class to its group in the downstream task (e.g. ``{"normal": 0, "benign": 0,
    "malignant": 1}`` for malignant vs rest); default: every class its own group. Every group is brought up to the
    largest one with synthetic patches of its lesion classes (split evenly); ``max_total`` caps the sum."""
    from ..data.datalists import load_datalist

    entries = load_datalist(patch_datalist, section, check_files=False)
    counts = {c: sum(e.get("label") == c for e in entries) for c in CLASSES}
    groups = dict(groups) if groups else {c: c for c in CLASSES}
    unknown = [c for c in CLASSES if c not in groups]
    if unknown:
        raise BreastGenError(f"class groups lack {', '.join(unknown)}; give a group for each of {', '.join(CLASSES)}")
    sizes: dict[Any, int] = {}
    for c in CLASSES:
        sizes[groups[c]] = sizes.get(groups[c], 0) + counts[c]
    target = max(sizes.values())
    out: dict[str, int] = {}
    for g, size in sizes.items():
        lesion = [c for c in CLASSES if groups[c] == g and c != "normal"]
        need = target - size
        for i, c in enumerate(lesion if need > 0 else []):
            out[c] = need // len(lesion) + int(i < need % len(lesion))
    total = sum(out.values())
    if max_total is not None and total > max_total:
        out = {c: int(round(n * max_total / total)) for c, n in out.items()}
    return {c: n for c, n in out.items() if n > 0}


def _load_patch(entry: Mapping, key: str = "image") -> np.ndarray:
    a = load_image(entry[key], modalities=None, allow_constant=True)[0]
    return a.astype(np.float32) / (65535.0 if a.dtype == np.uint16 else 255.0 if a.dtype == np.uint8 else 1.0)


def synthesize_patches(generator: nn.Module, patch_datalist: str | os.PathLike, out_dir: str | os.PathLike,
                       counts: Mapping[str, int], section: str = "training", seed: int = 0, batch_size: int = 32,
                       zoom_range: Sequence[float] = (0.75, 1.25)) -> str:
    """Synthetic lesion patches: normal patches of ``section`` (cycled) + lesion masks of the same section (zoomed,
    placed on breast tissue) + class -> composites. ``counts`` maps class -> number. Writes 16-bit PNG patches,
    masks and ``out_dir/datalist.json`` (section ``training``, entries marked ``"synthetic": true``); returns it."""
    from ..data.datalists import load_datalist

    out_dir = Path(out_dir)
    entries = load_datalist(patch_datalist, section, path_keys=("image", "mask", "breast"))
    normals = [e for e in entries if e["label"] == "normal"]
    if not normals:
        raise BreastGenError(f"no normal patches in section '{section}' to synthesise lesions on", patch_datalist)
    pool = load_mask_pool(entries)
    rng = np.random.default_rng(seed)
    jobs = [(c, k) for c, n in counts.items() for k in range(int(n))]
    for c, _ in jobs:
        class_index(c)
    out_entries = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        xs, ms, ys, srcs = [], [], [], []
        for c, k in chunk:
            e = normals[int(rng.integers(len(normals)))]
            x = _load_patch(e)
            breast = (load_image(e["breast"], modalities=None, allow_constant=True)[0] > 0) if e.get("breast") \
                else np.ones(x.shape, bool)  # no breast mask: the whole patch is breast
            lesion = pool[int(rng.integers(len(pool)))]
            m = place_lesion_mask(lesion, breast, rng, zoom_range, min_on_breast=1.0)
            xs.append(x), ms.append(m.astype(np.float32)), ys.append(c), srcs.append(e)
        comp, _ = infill_patches(generator, torch.from_numpy(np.stack(xs))[:, None],
                                 torch.from_numpy(np.stack(ms))[:, None], ys, seed=seed + start)
        for (c, k), img, m, e in zip(chunk, comp[:, 0].cpu().numpy(), ms, srcs):
            name = f"syn_{c}_{k:05d}"
            save_png16(img, out_dir / "images" / f"{name}.png")
            save_png(m.astype(np.uint8) * 255, out_dir / "masks" / f"{name}.png")
            out_entries.append({"image": f"images/{name}.png", "mask": f"masks/{name}.png", "label": c,
                                "synthetic": True, "source": e["image"]})
    atomic_write_json(out_dir / "datalist.json", {"training": out_entries, "validation": [], "test": []})
    logger.info("wrote %d synthetic patches to %s", len(out_entries), out_dir)
    return str(out_dir / "datalist.json")


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_cigan(generator: nn.Module, discriminator: nn.Module | None, patch_datalist: str | os.PathLike,
                   output_dir: str | os.PathLike, sections: Sequence[str] = ("validation", "test"), sigma: float = 10.0,
                   n_samples: int = 6, seed: int = 0, infill_jobs: str | os.PathLike | None = None) -> dict:
    """Metrics of a trained ciGAN on held-out patches, written with sample grids into ``output_dir``:

    * ``masked_l1`` / ``boundary_l1``: reconstruction of real lesion patches (true mask and class) inside the
      mask and Gaussian-rim weighted (without the 1000 factor);
    * ``class_head_accuracy``: the discriminator's class head on real patches;
    * ``contrast_<class>``: mean infilled intensity inside a placed mask minus the ring around it, on normal
      patches, per conditioning class (lesions are denser than their surroundings, so a working conditioning
      gives benign/malignant > normal); ``conditioning_delta``: mean |G(malignant) - G(benign)| in the mask;
    * ``output_min`` / ``output_max`` and ``context_max_abs_diff`` (outside-mask change after pasting, must be 0);
    * ``infill_outside_identical``: all full-mammogram infill jobs (``jobs.json`` of the infer stage) kept the
      pixels outside their masks.
    """
    from ..data.datalists import load_datalist

    out_dir = Path(output_dir)
    entries = [e for s in sections for e in _section(load_datalist, patch_datalist, s)]
    lesions = [e for e in entries if e.get("mask")]
    normals = [e for e in entries if e["label"] == "normal"]
    if not lesions or not normals:
        raise BreastGenError(f"evaluation needs lesion and normal patches in {', '.join(sections)}", patch_datalist)
    rng = np.random.default_rng(seed)
    metrics: dict[str, Any] = {"n_lesion_patches": len(lesions), "n_normal_patches": len(normals)}
    # reconstruction of real lesions
    x = torch.from_numpy(np.stack([_load_patch(e) for e in lesions]))[:, None]
    m = torch.from_numpy(np.stack([_load_patch(e, "mask") > 0.5 for e in lesions]).astype(np.float32))[:, None]
    y = [e["label"] for e in lesions]
    comp, raw = infill_patches(generator, x, m, y, seed=seed)
    w = boundary_weight_map(m, sigma)
    metrics["masked_l1"] = float(((raw - x).abs() * m).sum() / m.sum().clamp_min(1))
    metrics["boundary_l1"] = float((w * (raw - x).abs()).sum() / w.sum().clamp_min(1e-6))
    metrics["context_max_abs_diff"] = float(((comp - x).abs() * (1 - m)).max())
    metrics["output_min"], metrics["output_max"] = float(raw.min()), float(raw.max())
    if discriminator is not None:
        D = _unwrap(discriminator).eval()
        allx = torch.cat([x, torch.from_numpy(np.stack([_load_patch(e) for e in normals]))[:, None]])
        allm = torch.cat([m, torch.zeros((len(normals), 1, *x.shape[-2:]))])
        ally = torch.tensor([class_index(v) for v in y] + [0] * len(normals))
        preds = []
        for i in range(0, len(allx), 64):
            preds.append(D(allx[i:i + 64], allm[i:i + 64], ally[i:i + 64])[1].argmax(1))
        metrics["class_head_accuracy"] = float((torch.cat(preds) == ally).float().mean())
    # conditioning on normal patches with placed masks
    pool = [(_load_patch(e, "mask") > 0.5) for e in lesions]
    nx, nm = [], []
    for e in normals[: max(n_samples, 32)]:
        p = _load_patch(e)
        breast = (_load_patch(e, "breast") > 0.5) if e.get("breast") else np.ones(p.shape, bool)
        try:
            nm.append(place_lesion_mask(pool[int(rng.integers(len(pool)))], breast, rng, min_on_breast=1.0))
            nx.append(p)
        except BreastGenError:
            continue
    nxt = torch.from_numpy(np.stack(nx))[:, None]
    nmt = torch.from_numpy(np.stack(nm).astype(np.float32))[:, None]
    ring = torch.from_numpy(np.stack([_ring(mm) for mm in nm]).astype(np.float32))[:, None]
    outs = {}
    for c in CLASSES:
        comp_c, _ = infill_patches(generator, nxt, nmt, [c], seed=seed)
        outs[c] = comp_c
        inside = (comp_c * nmt).flatten(1).sum(1) / nmt.flatten(1).sum(1)
        around = (comp_c * ring).flatten(1).sum(1) / ring.flatten(1).sum(1).clamp_min(1)
        metrics[f"contrast_{c}"] = float((inside - around).mean())
    metrics["conditioning_delta"] = float(((outs["malignant"] - outs["benign"]).abs() * nmt).sum() / nmt.sum())
    if infill_jobs and Path(infill_jobs).is_file():
        import json

        jobs = json.loads(Path(infill_jobs).read_text(encoding="utf-8"))
        metrics["infill_jobs"] = len(jobs)
        metrics["infill_outside_identical"] = int(all(j["outside_mask_identical"] for j in jobs))
    # sample grids
    k = min(n_samples, len(lesions))
    noisy = x[:k] * (1 - m[:k]) + 0.5 * m[:k]
    save_png(make_grid([t[0] for t in torch.cat([x[:k], noisy, comp[:k]]).unbind(0)], ncol=k),
             out_dir / "samples_reconstruction.png")
    k = min(n_samples, len(nx))
    rows = [nxt[:k], nxt[:k] * (1 - nmt[:k]) + 0.5 * nmt[:k], outs["normal"][:k], outs["benign"][:k],
            outs["malignant"][:k]]
    save_png(make_grid([t[0] for t in torch.cat(rows).unbind(0)], ncol=k), out_dir / "samples_conditioning.png")
    return metrics


def _section(load, path, section):
    import json

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return load(path, section, path_keys=("image", "mask", "breast")) if data.get(section) else []


def _ring(mask: np.ndarray, width: int = 4) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=width) & ~ndimage.binary_dilation(mask, iterations=1)
