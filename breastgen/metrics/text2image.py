"""Evaluation of text-to-image mammogram models: FID, MS-SSIM diversity over guidance scales, prompt fidelity.

Prompt fidelity: the breast-area class measured on generated images (breast mask ratio) against the prompt's
area word, and view / density accuracy of a small attribute classifier trained here on the real training
images (MONAI ``Classifier``; its accuracy on real test images is reported alongside, as its ceiling).
"""

from __future__ import annotations

import csv
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.transforms import breast_mask
from ..errors import BreastGenError
from ..io import atomic_path, atomic_write_json, make_grid, save_png
from ..prompts import AREAS, DENSITIES, VIEWS, area_class, build_prompt, density_word
from .fid import InceptionFeatures, frechet_distance

__all__ = ["AttributeClassifier", "ms_ssim_diversity", "breast_area_ratios", "evaluate_text2image"]
logger = logging.getLogger(__name__)


class AttributeClassifier:
    """View (CC/MLO) and density (4 classes) from a 1 x W x H image: MONAI ``Classifier`` with 6 logits
    (2 view + 4 density), trained with two cross-entropies."""

    def __init__(self, image_size: int, channels: Sequence[int] = (16, 32, 64), epochs: int = 30, lr: float = 2e-3,
                 batch_size: int = 16, seed: int = 0):
        from monai.networks.nets import Classifier

        torch.manual_seed(seed)
        self.net = Classifier(in_shape=(1, image_size, image_size), classes=2 + len(DENSITIES),
                              channels=list(channels), strides=[2] * len(channels))
        self.epochs, self.lr, self.batch_size, self.seed = epochs, lr, batch_size, seed

    def fit(self, images: torch.Tensor, views: Sequence[str], densities: Sequence[str]) -> "AttributeClassifier":
        v = torch.tensor([VIEWS.index(x) for x in views])
        d = torch.tensor([DENSITIES.index(density_word(x)) for x in densities])
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        g = torch.Generator().manual_seed(self.seed)
        self.net.train()
        for _ in range(self.epochs):
            for idx in torch.randperm(len(images), generator=g).split(self.batch_size):
                x = images[idx]
                x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x, x.flip(-1))  # vertical flips
                out = self.net(x)
                loss = nn.functional.cross_entropy(out[:, :2], v[idx]) + nn.functional.cross_entropy(out[:, 2:], d[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net.eval()
        return self

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[list[str], list[str]]:
        self.net.eval()
        out = torch.cat([self.net(b) for b in images.split(64)])
        return [VIEWS[i] for i in out[:, :2].argmax(1)], [DENSITIES[i] for i in out[:, 2:].argmax(1)]


def _ms_ssim_weights(size: int, kernel_size: int) -> tuple[float, ...]:
    base = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    levels = max(1, min(5, max(n for n in range(1, 6) if (kernel_size - 1) * 2 ** (n - 1) < size)))
    w = np.array(base[:levels])
    return tuple(float(x) for x in w / w.sum())


def ms_ssim_diversity(images: torch.Tensor, kernel_size: int = 7) -> float:
    """Mean pairwise MS-SSIM among images (B, 1, W, H) in [0, 1]; lower = more diverse (MAM-E Table 3).
    The number of scales adapts to the image size (standard weights, renormalised)."""
    from monai.metrics import MultiScaleSSIMMetric

    if len(images) < 2:
        raise BreastGenError("diversity needs at least 2 images")
    weights = _ms_ssim_weights(min(images.shape[-2:]), kernel_size)
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=kernel_size, weights=weights)
    pairs = list(itertools.combinations(range(len(images)), 2))
    a = torch.stack([images[i] for i, _ in pairs]).float()
    b = torch.stack([images[j] for _, j in pairs]).float()
    return float(metric(a, b).mean())


def breast_area_ratios(images: torch.Tensor) -> np.ndarray:
    return np.array([breast_mask(img[0].numpy()).mean() for img in images.cpu()])


def _plot(path: Path, xs: Sequence[float], ys: Sequence[float], xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(xs, ys, marker="o")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def evaluate_text2image(pipeline: Any, train: Sequence[dict], reference: Sequence[dict], output_dir: str | Path, *,
                        samples_per_prompt: int = 16, sampler: str = "dpm++2m", num_inference_steps: int = 20,
                        guidance_scale: float = 4.0, negative_prompt: str = "",
                        diversity_scales: Sequence[float] = tuple(range(1, 15)), diversity_samples: int = 20,
                        diversity_prompt: str | None = None, fid_samples_per_item: int = 1,
                        classifier_epochs: int = 30, batch_size: int = 16, seed: int = 0,
                        fidelity_attributes: Sequence[str] = ("area", "view", "density"),
                        inception_path: str | None = None) -> dict:
    """Run the whole evaluation; writes metrics.json, diversity.csv/png, fidelity.csv and sample grids.

    ``fidelity_attributes`` chooses which single-attribute prompts are sampled (area and view are always
    needed for the ordering / accuracy checks).
    ``train`` / ``reference``: preprocessed real items (dicts with ``image`` 1 x W x H in [0, 1], ``prompt``,
    ``view``, ``density``); the classifier learns from ``train``, FID compares against ``reference``.
    """
    out = Path(output_dir)
    if not train or not reference:
        raise BreastGenError("evaluation needs real training and reference images (empty datalist section)")

    def generate(prompts: list[str], first_seed: int, scale: float = guidance_scale) -> torch.Tensor:
        imgs = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            seeds = list(range(first_seed + i, first_seed + i + len(chunk)))
            imgs.append(pipeline.sample(chunk, seeds, negative_prompt, scale, num_inference_steps, sampler))
        return torch.cat(imgs)

    real_train = torch.stack([torch.as_tensor(e["image"]).float() for e in train])
    real_ref = torch.stack([torch.as_tensor(e["image"]).float() for e in reference])
    metrics: dict[str, Any] = {"sampler": sampler, "steps": num_inference_steps, "guidance_scale": guidance_scale,
                               "samples_per_prompt": samples_per_prompt}

    # attribute classifier on real data; its accuracy on the real reference set is the ceiling
    clf = AttributeClassifier(real_train.shape[-1], epochs=classifier_epochs, seed=seed).fit(
        real_train, [e["view"] for e in train], [e["density"] for e in train])
    rv, rd = clf.predict(real_ref)
    metrics["classifier_real_view_accuracy"] = float(np.mean([p == e["view"] for p, e in zip(rv, reference)]))
    metrics["classifier_real_density_accuracy"] = float(np.mean(
        [p == density_word(e["density"]) for p, e in zip(rd, reference)]))

    rows, grids, s = [], [], seed + 100_000
    unknown = set(fidelity_attributes) - {"area", "view", "density"}
    if unknown:
        raise BreastGenError(f"unknown fidelity attribute(s) {sorted(unknown)}; allowed: 'area', 'view', 'density'")
    for kind, words in (("area", AREAS), ("view", VIEWS), ("density", DENSITIES)):
        if kind not in fidelity_attributes:
            continue
        for word in words:
            prompt = build_prompt(**{kind: word})
            imgs = generate([prompt] * samples_per_prompt, s)
            s += samples_per_prompt
            grids.append(imgs[:8])
            ratios = breast_area_ratios(imgs)
            pv, pd = clf.predict(imgs)
            row = {"prompt": prompt, "attribute": kind, "value": word, "n": len(imgs),
                   "mean_area_ratio": float(ratios.mean()),
                   "area_class_accuracy": float(np.mean([area_class(r) == word for r in ratios])) if kind == "area" else "",
                   "view_accuracy": float(np.mean([p == word for p in pv])) if kind == "view" else "",
                   "density_accuracy": float(np.mean([p == word for p in pd])) if kind == "density" else ""}
            rows.append(row)
            metrics[f"mean_area_ratio[{prompt}]"] = row["mean_area_ratio"]
    area_rows = [r for r in rows if r["attribute"] == "area"]
    if area_rows:
        metrics["area_ratio_small_medium_big"] = [r["mean_area_ratio"] for r in area_rows]
        metrics["area_class_accuracy"] = float(np.mean([r["area_class_accuracy"] for r in area_rows]))
    for kind in ("view", "density"):
        accs = [r[f"{kind}_accuracy"] for r in rows if r["attribute"] == kind]
        if accs:
            metrics[f"{kind}_accuracy"] = float(np.mean(accs))
    with atomic_path(out / "fidelity.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    save_png(make_grid([i for g in grids for i in g], ncol=8), out / "fidelity_samples.png")

    # FID: samples for the reference set's own prompts vs the reference images
    ref_prompts = [e["prompt"] for e in reference for _ in range(fid_samples_per_item)]
    fakes = generate(ref_prompts, seed + 200_000)
    ext = InceptionFeatures(inception_path)
    metrics["fid"] = frechet_distance(ext(fakes), ext(real_ref))
    metrics["fid_n_generated"], metrics["fid_n_reference"] = len(fakes), len(real_ref)
    save_png(make_grid(list(fakes[:16]) + list(real_ref[:16]), ncol=8), out / "fid_generated_vs_real.png")

    # diversity over guidance scales, one prompt (MAM-E Table 3)
    prompt = diversity_prompt or reference[0]["prompt"]
    div_rows = []
    for scale in diversity_scales:
        imgs = generate([prompt] * diversity_samples, seed + 300_000, float(scale))
        div_rows.append({"guidance_scale": float(scale), "ms_ssim": ms_ssim_diversity(imgs), "n": diversity_samples})
    with atomic_path(out / "diversity.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["guidance_scale", "ms_ssim", "n"])
        w.writeheader()
        w.writerows(div_rows)
    _plot(out / "diversity.png", [r["guidance_scale"] for r in div_rows], [r["ms_ssim"] for r in div_rows],
          "guidance scale", "mean pairwise MS-SSIM", f"diversity: {prompt}")
    metrics["diversity_prompt"] = prompt
    metrics["ms_ssim_by_guidance"] = {str(r["guidance_scale"]): r["ms_ssim"] for r in div_rows}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
