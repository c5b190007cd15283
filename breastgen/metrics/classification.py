"""Multi-class classification metrics with confidence intervals: accuracy, macro-F1 and one-vs-rest AUC.

Accuracy and AUC come from :func:`breastgen.networks.classifiers.classification_metrics` (the patch classifiers'
evaluation); this module adds the macro-F1 and two kinds of intervals:

* :func:`bootstrap_ci` -- percentile bootstrap over the test samples of **one** model (how much the figure would
  move with another test set of the same size);
* :func:`t_interval` -- mean and half-width of the t interval over **repeated runs** (seeds: how much the figure
  moves with another training run).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import BreastGenError

__all__ = ["METRICS", "accuracy", "macro_f1", "auc", "summary", "bootstrap_ci", "t_interval"]

METRICS = ("accuracy", "macro_f1", "auc")


def _check(y_true: Sequence[int], probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(y) or len(y) == 0:
        raise BreastGenError(f"need (n, classes) probabilities for n labels, got {p.shape} for {len(y)} labels")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise BreastGenError(f"labels must be 0..{p.shape[1] - 1}, got {sorted(set(y.tolist()))}")
    return y, p


def accuracy(y_true: Sequence[int], probs: np.ndarray) -> float:
    y, p = _check(y_true, probs)
    return float((p.argmax(1) == y).mean())


def macro_f1(y_true: Sequence[int], probs: np.ndarray) -> float:
    """F1 averaged over all classes of ``probs`` (a class never predicted nor present counts as 0)."""
    from sklearn.metrics import f1_score

    y, p = _check(y_true, probs)
    return float(f1_score(y, p.argmax(1), labels=list(range(p.shape[1])), average="macro", zero_division=0))


def auc(y_true: Sequence[int], probs: np.ndarray) -> float:
    """ROC AUC (two classes: of class 1; more: one-vs-rest macro); NaN unless every class is present."""
    from ..networks.classifiers import classification_metrics

    y, p = _check(y_true, probs)
    return float(classification_metrics(y, p)["auc"])


_FUNCS: dict[str, Callable[[Sequence[int], np.ndarray], float]] = {"accuracy": accuracy, "macro_f1": macro_f1,
                                                                   "auc": auc}


# numpy versions of the three metrics for the bootstrap loop (scikit-learn's take ~ms per call); they agree with
# accuracy / macro_f1 / auc above (tested)
def _fast_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    return float((p.argmax(1) == y).mean())


def _fast_macro_f1(y: np.ndarray, p: np.ndarray) -> float:
    c = p.shape[1]
    cm = np.bincount(y * c + p.argmax(1), minlength=c * c).reshape(c, c)
    tp = np.diag(cm).astype(np.float64)
    denom = 2 * tp + (cm.sum(0) - tp) + (cm.sum(1) - tp)
    return float(np.mean(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)))


def _fast_auc(y: np.ndarray, p: np.ndarray) -> float:
    from scipy.stats import rankdata

    classes = [1] if p.shape[1] == 2 else range(p.shape[1])
    aucs = []
    for c in classes:
        pos = y == c
        n1, n0 = int(pos.sum()), int((~pos).sum())
        if n1 == 0 or n0 == 0:
            return float("nan")
        ranks = rankdata(p[:, c])
        aucs.append((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    return float(np.mean(aucs))


_FAST = {"accuracy": _fast_accuracy, "macro_f1": _fast_macro_f1, "auc": _fast_auc}


def summary(y_true: Sequence[int], probs: np.ndarray, n_boot: int = 0, level: float = 0.95,
            seed: int = 0) -> dict[str, float]:
    """``accuracy``, ``macro_f1``, ``auc`` and ``n``; with ``n_boot > 0`` also ``<metric>_ci_low`` /
    ``<metric>_ci_high`` (percentile bootstrap over the samples)."""
    from ..networks.classifiers import classification_metrics

    y, p = _check(y_true, probs)
    base = classification_metrics(y, p)
    out = {"n": int(len(y)), "accuracy": float(base["accuracy"]), "macro_f1": macro_f1(y, p),
           "auc": float(base["auc"])}
    if n_boot > 0:
        for name in METRICS:
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = bootstrap_ci(y, p, name, n_boot, level, seed)
    return out


def bootstrap_ci(y_true: Sequence[int], probs: np.ndarray, metric: str = "accuracy", n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric`` ("accuracy", "macro_f1" or "auc") over resampled test sets.
    Resamples on which the metric is undefined (AUC with a class missing) are skipped; (NaN, NaN) if all are."""
    if metric not in _FUNCS:
        raise BreastGenError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    if not 0 < level < 1:
        raise BreastGenError(f"confidence level must be in (0, 1), got {level}")
    y, p = _check(y_true, probs)
    rng = np.random.default_rng(seed)
    fn = _FAST[metric]
    values = []
    for _ in range(int(n_boot)):
        idx = rng.integers(0, len(y), len(y))
        if metric == "auc" and len(np.unique(y[idx])) < p.shape[1]:
            continue
        v = fn(y[idx], p[idx])
        if not math.isnan(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the Student-t interval of the mean over runs; NaN values are dropped; the half-width
    is NaN for fewer than two values."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and not math.isnan(float(x))], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(half)
