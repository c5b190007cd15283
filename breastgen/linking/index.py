"""An on-disk embedding index with exact k-nearest-neighbour search (scikit-learn ``NearestNeighbors``).

The index stores, per database image: its embedding vector, an id, a label (class index, -1 unknown) and a link
(e.g. the histology image paired with that mammogram), plus the **fingerprint of the model** that computed the
vectors (:func:`model_fingerprint`, a SHA-256 of the weights). Embeddings of two models live in different
spaces, so the index refuses to mix them: adding vectors of another model, or opening the index for queries
with another model, is a one-line :class:`~breastgen.errors.BreastGenError` that says to rebuild the index.

Search is exact (``algorithm="brute"`` by default) with the ``"cosine"``, ``"manhattan"`` or ``"euclidean"``
distance, in float64. Brute force costs O(N * D) per query and keeps N x D x 8 bytes in memory during search;
see ``docs/benchmarks.md`` (``scripts/bench_mammo2histo.py``) for measured query times at N = 10^5 and the
bundle README for when an approximate-neighbour library is worth it.

File format (``.npz``, read with ``allow_pickle=False``): ``vectors`` float32 (N, D), ``ids`` / ``links``
unicode (N,), ``labels`` int64 (N,), ``header`` a JSON string (format, version, model_hash, class_names, dim).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BreastGenError
from ..io.atomic import atomic_write_bytes

__all__ = ["METRICS", "FORMAT", "model_fingerprint", "EmbeddingIndex", "vote", "retrieval_metrics"]

METRICS = ("cosine", "manhattan", "euclidean")
FORMAT = "breastgen-embedding-index"
_VERSION = 1


def model_fingerprint(model: torch.nn.Module | Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a module's (or state dict's) tensors: names, dtypes, shapes and values, in name order.
    Identical weights give the same fingerprint whichever file or process they were loaded in."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not torch.is_tensor(t):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _as_vectors(x: Any, what: str, path: Any = None) -> np.ndarray:
    a = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
        raise BreastGenError(f"{what} must be a numeric (N, D) array, got shape {a.shape} of {a.dtype}", path)
    if not np.isfinite(a).all():
        raise BreastGenError(f"{what} contain NaN or infinite values", path)
    return a


def _check_metric(metric: str) -> str:
    m = str(metric).strip().lower()
    if m not in METRICS:
        raise BreastGenError(f"unknown distance {metric!r}; allowed: {', '.join(METRICS)}")
    return m


class EmbeddingIndex:
    """Embeddings of one model with ids, labels and links; exact KNN search; saved to / loaded from ``.npz``.

    Args:
        vectors: (N, D) embeddings (stored as float32).
        ids: N unique ids (e.g. the mammogram's file or lesion id).
        model_hash: :func:`model_fingerprint` of the model that computed ``vectors``.
        labels: N class indices (-1: unknown); default all -1.
        links: N linked items (e.g. the paired histology image path); default "".
        class_names: names of the label indices, kept with the index.
    """

    def __init__(self, vectors: Any, ids: Sequence[str], model_hash: str, labels: Sequence[int] | None = None,
                 links: Sequence[str] | None = None, class_names: Sequence[str] = (), path: Any = None):
        v = _as_vectors(vectors, "embeddings", path).astype(np.float32)
        ids = [str(i) for i in ids]
        n = len(v)
        labels = [-1] * n if labels is None else [int(x) for x in labels]
        links = [""] * n if links is None else [str(x) for x in links]
        if not (len(ids) == len(labels) == len(links) == n):
            raise BreastGenError(f"index of {n} embeddings given {len(ids)} ids, {len(labels)} labels and "
                                 f"{len(links)} links", path)
        dup = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != n else []
        if dup:
            raise BreastGenError(f"duplicate ids in the index: {', '.join(dup[:5])}", path)
        if not model_hash or not isinstance(model_hash, str):
            raise BreastGenError("an index needs the fingerprint of the model that computed its embeddings", path)
        self.vectors, self.ids, self.labels, self.links = v, ids, np.asarray(labels, np.int64), links
        self.model_hash, self.class_names, self.path = model_hash, [str(c) for c in class_names], path
        self._fitted: dict[tuple[str, str], Any] = {}

    # ------------------------------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def check_model(self, model_hash: str) -> None:
        """Raise unless ``model_hash`` is the fingerprint of the model that built this index."""
        if model_hash != self.model_hash:
            raise BreastGenError(
                f"the index holds embeddings of another model (built with {self.model_hash[:12]}, the configured "
                f"model is {str(model_hash)[:12]}); rebuild the index with this model", self.path)

    # ------------------------------------------------------------------------------------------ building
    def add(self, vectors: Any, ids: Sequence[str], model_hash: str, labels: Sequence[int] | None = None,
            links: Sequence[str] | None = None) -> EmbeddingIndex:
        """Append embeddings of the **same** model (another fingerprint or dimension is refused)."""
        self.check_model(model_hash)
        other = EmbeddingIndex(vectors, ids, model_hash, labels, links, self.class_names)
        if len(other) and len(self) and other.dim != self.dim:
            raise BreastGenError(f"cannot add {other.dim}-dimensional embeddings to a {self.dim}-dimensional index",
                                 self.path)
        clash = sorted(set(other.ids) & set(self.ids))
        if clash:
            raise BreastGenError(f"ids already in the index: {', '.join(clash[:5])}", self.path)
        self.vectors = np.concatenate([self.vectors.reshape(-1, other.dim), other.vectors])
        self.ids += other.ids
        self.labels = np.concatenate([self.labels, other.labels])
        self.links += other.links
        self._fitted.clear()
        return self

    # ------------------------------------------------------------------------------------------ I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index atomically (``.npz``); an empty index is refused."""
        if not len(self):
            raise BreastGenError("refusing to save an empty index (no embeddings)", path)
        header = {"format": FORMAT, "version": _VERSION, "model_hash": self.model_hash, "dim": self.dim,
                  "size": len(self), "class_names": self.class_names}
        buf = io.BytesIO()
        np.savez(buf, vectors=self.vectors, ids=np.asarray(self.ids, dtype=str), links=np.asarray(self.links, dtype=str),
                 labels=self.labels, header=np.asarray(json.dumps(header)))
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike, model_hash: str | None = None) -> EmbeddingIndex:
        """Read an index; with ``model_hash`` also check it was built by that model. An empty or foreign file is
        refused with one line naming it."""
        path = Path(path)
        if not path.is_file():
            raise BreastGenError("embedding index not found (build it first: configs/index.json)", path)
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                arrays = {k: z[k] for k in ("vectors", "ids", "links", "labels")}
        except Exception as e:  # noqa: BLE001 - any unreadable file is a user-facing problem
            raise BreastGenError(f"not an embedding index ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                                 path) from None
        if header.get("format") != FORMAT:
            raise BreastGenError(f"not an embedding index (format {header.get('format')!r})", path)
        if header.get("version") != _VERSION:
            raise BreastGenError(f"embedding index version {header.get('version')} is not supported "
                                 f"(expected {_VERSION}); rebuild it", path)
        if len(arrays["ids"]) == 0:
            raise BreastGenError("the embedding index is empty (no embeddings)", path)
        index = cls(arrays["vectors"], arrays["ids"].tolist(), header.get("model_hash", ""), arrays["labels"].tolist(),
                    arrays["links"].tolist(), header.get("class_names", ()), path=path)
        if model_hash is not None:
            index.check_model(model_hash)
        return index

    # ------------------------------------------------------------------------------------------ search
    def search(self, queries: Any, k: int = 3, metric: str = "cosine", algorithm: str = "brute",
               ) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices), both (Q, k), nearest first, of the ``k`` nearest stored embeddings of each query.

        ``metric``: "cosine" (1 - cosine similarity), "manhattan" (L1) or "euclidean" (L2). Exact search with
        scikit-learn's ``NearestNeighbors`` in float64 (``algorithm`` "brute", "ball_tree" or "kd_tree")."""
        metric = _check_metric(metric)
        if not len(self):
            raise BreastGenError("the embedding index is empty (no embeddings to search)", self.path)
        q = _as_vectors(queries, "query embeddings")
        if q.shape[1] != self.dim:
            raise BreastGenError(f"query embeddings have {q.shape[1]} dimensions, the index {self.dim}: they come "
                                 "from another model or image size", self.path)
        if isinstance(k, bool) or int(k) != k or not 1 <= int(k) <= len(self):
            raise BreastGenError(f"k must be an integer in 1..{len(self)} (the index size), got {k!r}", self.path)
        q = q.astype(np.float64)
        if metric == "cosine":
            if (np.linalg.norm(q, axis=1) == 0).any():
                raise BreastGenError("a query embedding is all zeros: its cosine distance is undefined")
            dist, idx = self._neighbours(metric, algorithm).kneighbors(_unit(q), n_neighbors=int(k))
            return dist ** 2 / 2, idx  # |a - b|^2 = 2 - 2 cos(a, b) for unit vectors
        return self._neighbours(metric, algorithm).kneighbors(q, n_neighbors=int(k))

    def _neighbours(self, metric: str, algorithm: str):
        """The fitted ``NearestNeighbors`` (cached). Cosine is searched as the euclidean distance of unit vectors
        (the same order; scikit-learn's own cosine brute force re-normalises all N stored vectors per call)."""
        from sklearn.neighbors import NearestNeighbors

        if algorithm not in ("brute", "ball_tree", "kd_tree"):
            raise BreastGenError(f"unknown search algorithm {algorithm!r}; allowed: brute, ball_tree, kd_tree")
        key = (metric, algorithm)
        if key not in self._fitted:
            data = self.vectors.astype(np.float64)
            if metric == "cosine":
                if (np.linalg.norm(data, axis=1) == 0).any():
                    raise BreastGenError("the index holds an all-zero embedding: cosine distance is undefined",
                                         self.path)
                data = _unit(data)
            nn = NearestNeighbors(metric="euclidean" if metric == "cosine" else metric, algorithm=algorithm)
            self._fitted[key] = nn.fit(data)
        return self._fitted[key]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def vote(neighbour_labels: np.ndarray, distances: np.ndarray | None = None) -> np.ndarray:
    """Majority label of each row of (Q, k) neighbour labels; a tie goes to the tied label whose nearest
    neighbour comes first (rows are sorted nearest first). Unknown labels (-1) do not vote."""
    labels = np.asarray(neighbour_labels, dtype=np.int64)
    out = np.full(len(labels), -1, dtype=np.int64)
    for i, row in enumerate(labels):
        known = row[row >= 0]
        if not len(known):
            continue
        values, counts = np.unique(known, return_counts=True)
        tied = set(values[counts == counts.max()].tolist())
        out[i] = next(int(v) for v in known if int(v) in tied)
    return out


def retrieval_metrics(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str] = ("benign", "malignant"),
                      positive: int = 1) -> dict[str, Any]:
    """Precision and recall of class ``positive`` (malignant), accuracy, the confusion matrix (rows: true,
    columns: predicted) and its entries as ``cm_<true>_<pred>``."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_score, recall_score

    y, p = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if not len(y):
        raise BreastGenError("no query to evaluate")
    labels = list(range(len(class_names)))
    cm = confusion_matrix(y, p, labels=labels)
    out: dict[str, Any] = {
        "precision": float(precision_score(y, p, labels=labels, pos_label=positive, average="binary", zero_division=0)),
        "recall": float(recall_score(y, p, labels=labels, pos_label=positive, average="binary", zero_division=0)),
        "accuracy": float(accuracy_score(y, p)), "n": int(len(y)), "confusion_matrix": cm.tolist()}
    for i, a in enumerate(class_names):
        for j, b in enumerate(class_names):
            out[f"cm_{a}_{b}"] = int(cm[i, j])
    return out
