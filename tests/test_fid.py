"""breastgen.metrics.fid: the Frechet distance without a matrix square root agrees with the textbook formula
(scipy.linalg.sqrtm) and with MONAI's FIDMetric, for fewer and for more samples than feature dimensions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from breastgen.errors import BreastGenError
from breastgen.metrics import frechet_distance


def _sqrtm_fid(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr sqrtm(S_a S_b), unbiased covariances, float64."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sa @ sb)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean).real)


def _features(rng: np.random.Generator, n: int, d: int, shift: float, scale: float) -> np.ndarray:
    """Non-negative, correlated features (like pooled ReLU activations), rank min(n - 1, d) after centring."""
    mix = rng.normal(0, 1, (d, d)) / np.sqrt(d)
    return np.abs(rng.normal(shift, scale, (n, d)) @ mix)


@pytest.mark.parametrize("na,nb,d", [(300, 250, 48), (20, 14, 32), (60, 90, 256), (40, 300, 64)])
def test_frechet_distance_matches_the_matrix_square_root(na, nb, d):
    from monai.metrics import FIDMetric

    rng = np.random.default_rng([na, nb, d])
    a, b = _features(rng, na, d, 0.0, 1.0), _features(rng, nb, d, 0.3, 1.2)
    ours = frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert ours == pytest.approx(_sqrtm_fid(a, b), rel=1e-6)
    assert ours == pytest.approx(float(FIDMetric()(torch.from_numpy(a), torch.from_numpy(b))), rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(ours, rel=1e-9)  # symmetric; numpy input too
    assert frechet_distance(a.astype(np.float32), b) == pytest.approx(ours, rel=1e-5)


def test_frechet_distance_of_a_set_with_itself_and_with_a_shifted_copy():
    a = _features(np.random.default_rng(1), 500, 32, 0.0, 1.0)
    assert abs(frechet_distance(a, a)) < 1e-8 * np.trace(np.cov(a, rowvar=False))
    # same covariance, mean moved by v: the distance is |v|^2
    v = np.linspace(-1, 1, 32)
    assert frechet_distance(a, a + v) == pytest.approx(float(v @ v), rel=1e-8)


def test_frechet_distance_refuses_bad_features():
    with pytest.raises(BreastGenError, match="at least 2 images"):
        frechet_distance(np.zeros((1, 8)), np.ones((5, 8)))
    with pytest.raises(BreastGenError, match="same d"):
        frechet_distance(np.zeros((4, 8)), np.ones((5, 9)))
    bad = np.ones((4, 8))
    bad[0, 0] = np.nan
    with pytest.raises(BreastGenError, match="NaN"):
        frechet_distance(bad, np.ones((5, 8)))
