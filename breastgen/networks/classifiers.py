"""Patch classifiers of the augmentation experiment and their evaluation helpers.

* :class:`ShallowCNN`: the seed paper's baseline -- 3 x (conv 3x3 + BN + ReLU + max-pool) and 3 dense layers
  (an adaptive average pool before the dense layers makes it input-size agnostic). MONAI has no such network.
* :func:`resnet50_classifier`: MONAI's ``resnet50`` in 2D with torchvision's ImageNet layout (7x7 stride-2 stem,
  bias-free projection shortcuts), so an ImageNet ResNet-50 state dict from a **local** file loads into it
  (:func:`load_pretrained`; the 1000-class ``fc`` is skipped). Nothing is downloaded.
* :func:`classification_metrics`: accuracy, recall, AUC, specificity and the confusion matrix (scikit-learn);
  :func:`save_roc_plot`: ROC curves (matplotlib) written atomically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import BreastGenError

__all__ = ["ShallowCNN", "resnet50_classifier", "load_pretrained", "classification_metrics", "roc_points",
           "save_roc_plot", "predict_datalist", "write_predictions", "evaluate_predictions"]
logger = logging.getLogger(__name__)


class ShallowCNN(nn.Module):
    """3 x (conv 3x3 + BN + ReLU + max-pool 2) then 3 dense layers (the last one gives the class logits)."""

    def __init__(self, num_classes: int = 2, in_channels: int = 3, channels: Sequence[int] = (32, 64, 128),
                 dense: Sequence[int] = (256, 128), pool_size: int = 7, dropout: float = 0.5):
        super().__init__()
        if len(channels) != 3 or len(dense) != 2:
            raise BreastGenError("ShallowCNN has 3 conv blocks and 3 dense layers: give 3 channels and 2 dense widths")
        layers: list[nn.Module] = []
        cin = in_channels
        for c in channels:
            layers += [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(pool_size))
        flat = cin * pool_size * pool_size
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, dense[0]), nn.ReLU(inplace=True),
                                        nn.Dropout(dropout), nn.Linear(dense[0], dense[1]), nn.ReLU(inplace=True),
                                        nn.Linear(dense[1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_pretrained(network: nn.Module, path: str | os.PathLike | None, min_fraction: float = 0.5) -> nn.Module:
    """Load matching tensors of a local state dict (e.g. ImageNet ResNet-50 in torchvision's layout) into
    ``network``; tensors whose shape differs (the classification layer) are skipped. ``path=None`` is a no-op."""
    if not path:
        return network
    from ..engines.checkpoints import load_state

    state = load_state(path)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    own = network.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if len(usable) < min_fraction * len(own):
        raise BreastGenError(f"pretrained weights do not fit the network: only {len(usable)} of {len(own)} tensors "
                             "match by name and shape (expected an ImageNet ResNet-50 state dict, torchvision layout)",
                             path)
    network.load_state_dict(usable, strict=False)
    skipped = sorted(k for k in own if k not in usable)
    logger.info("loaded %d of %d tensors from %s (kept initial: %s)", len(usable), len(own), path,
                ", ".join(skipped[:4]) + (" ..." if len(skipped) > 4 else ""))
    return network


def resnet50_classifier(num_classes: int = 2, pretrained_path: str | os.PathLike | None = None,
                        widen_factor: float = 1.0, in_channels: int = 3) -> nn.Module:
    """MONAI ResNet-50 (2D, torchvision/ImageNet layout) with ``num_classes`` outputs; optional ImageNet weights
    from a local state-dict file. ``widen_factor`` < 1 gives a narrow ResNet-50 (demos on a CPU)."""
    from monai.networks.nets import resnet50

    net = resnet50(pretrained=False, spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes,
                   conv1_t_size=7, conv1_t_stride=2, bias_downsample=False, widen_factor=widen_factor)
    return load_pretrained(net, pretrained_path)


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str] | None = None) -> dict:
    """Accuracy, recall, AUC (and specificity for two classes) plus the confusion matrix.

    Two classes: recall/AUC of class 1 (the positive class, e.g. malignant). More classes: macro recall and
    one-vs-rest macro AUC. AUC is NaN when the labels hold a single class.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, recall_score, roc_auc_score

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    n_classes = p.shape[1]
    pred = p.argmax(1)
    out: dict[str, Any] = {"n": int(len(y)), "accuracy": float(accuracy_score(y, pred))}
    labels = list(range(n_classes))
    cm = confusion_matrix(y, pred, labels=labels)
    present = np.unique(y)
    if n_classes == 2:
        out["recall"] = float(recall_score(y, pred, pos_label=1, zero_division=0))
        out["specificity"] = float(cm[0, 0] / max(1, cm[0].sum()))
        out["auc"] = float(roc_auc_score(y, p[:, 1])) if len(present) == 2 else float("nan")
    else:
        out["recall"] = float(recall_score(y, pred, labels=labels, average="macro", zero_division=0))
        out["auc"] = float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=labels)) \
            if len(present) == n_classes else float("nan")
    names = list(class_names) if class_names else [str(i) for i in labels]
    out["confusion_matrix"] = cm.tolist()
    out["class_names"] = names
    return out


def roc_points(y_true: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(y_true), np.asarray(scores))
    return fpr, tpr


def save_roc_plot(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
                  title: str = "ROC") -> Path:
    """Plot named (fpr, tpr) curves to a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for name, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate (recall)", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def predict_datalist(network: nn.Module, transform: Any, entries: Sequence[Mapping], device: Any = "cpu",
                     batch_size: int = 64) -> np.ndarray:
    """Softmax probabilities (N, C) of ``network`` for datalist ``entries`` preprocessed by ``transform``."""
    network.eval()
    out = []
    for i in range(0, len(entries), batch_size):
        batch = torch.stack([torch.as_tensor(transform(dict(e))["image"]).as_subclass(torch.Tensor)
                             for e in entries[i:i + batch_size]])
        out.append(torch.softmax(network(batch.to(device)).float(), dim=1).cpu())
    if not out:
        raise BreastGenError("nothing to predict: the datalist section is empty")
    return torch.cat(out).numpy()


def write_predictions(network: nn.Module, transform: Any, entries: Sequence[Mapping], path: str | os.PathLike,
                      class_names: Sequence[str], device: Any = "cpu", samples_png: str | os.PathLike | None = None,
                      n_samples: int = 8) -> list[dict]:
    """Predict ``entries`` and write ``[{"image", "label", "probs", "pred"}]`` as JSON to ``path``; optionally a
    PNG grid of the ``n_samples`` patches scored highest (top row) and lowest (bottom row) for the last class."""
    from ..io import atomic_write_json, make_grid, save_png
    from ..data.readers import load_image

    probs = predict_datalist(network, transform, entries, device)
    records = [{"image": e["image"], "label": e.get("label"), "synthetic": bool(e.get("synthetic", False)),
                "probs": [round(float(v), 6) for v in p], "pred": class_names[int(p.argmax())]}
               for e, p in zip(entries, probs)]
    atomic_write_json(path, records)
    if samples_png:
        order = np.argsort(-probs[:, -1])
        k = min(n_samples, len(order))
        pick = list(order[:k]) + list(order[::-1][:k])
        save_png(make_grid([load_image(entries[i]["image"], modalities=None, allow_constant=True)[0] for i in pick],
                           ncol=k), samples_png)
    return records


def evaluate_predictions(predictions: str | os.PathLike, class_map: Mapping[str, int], class_names: Sequence[str],
                         output_dir: str | os.PathLike | None = None) -> dict:
    """Flat metrics (accuracy, recall, auc, specificity, n, confusion matrix entries ``cm_<true>_<pred>`` and
    ``confusion_matrix`` as text) from a predictions file; writes ``roc.png`` into ``output_dir`` if given."""
    import json

    recs = json.loads(Path(predictions).read_text(encoding="utf-8"))
    recs = [r for r in recs if r.get("label") is not None]
    if not recs:
        raise BreastGenError("no labelled predictions to evaluate", predictions)
    unknown = sorted({r["label"] for r in recs} - set(class_map))
    if unknown:
        raise BreastGenError(f"labels {unknown} are not in class_map ({', '.join(class_map)})", predictions)
    y = [int(class_map[r["label"]]) for r in recs]
    p = np.asarray([r["probs"] for r in recs])
    m = classification_metrics(y, p, class_names)
    flat = {k: m[k] for k in ("n", "accuracy", "recall", "auc", "specificity") if k in m}
    for i, row in enumerate(m["confusion_matrix"]):
        for j, v in enumerate(row):
            flat[f"cm_{class_names[i]}_{class_names[j]}"] = int(v)
    flat["confusion_matrix"] = json.dumps(m["confusion_matrix"])
    if output_dir is not None and len(class_names) == 2 and len(set(y)) == 2:
        save_roc_plot({f"AUC {m['auc']:.3f}": roc_points(y, p[:, 1])}, Path(output_dir) / "roc.png",
                      title=f"{class_names[1]} vs {class_names[0]}")
    return flat
