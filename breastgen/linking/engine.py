"""Training glue, inference and evaluation of the mammogram-histology link (the ``mammo2histo_link`` bundle).

Training is plain MONAI ``SupervisedTrainer`` throughout; what differs between the stages is said by
:class:`PairedBatch` (which batch keys are the network's inputs and targets, e.g. mammogram -> histology) and
:class:`MultiOutputLoss` (the dual-input autoencoder's two reconstructions). The latent diffusion stage uses
:class:`breastgen.engines.conditional.ConditionalPrepareBatch` with the pathology label and the mammogram
embedding.

* :func:`build_index` -- embeddings of the database mammograms -> :class:`~breastgen.linking.index.EmbeddingIndex`
  on disk (with the autoencoder's fingerprint and the linked histology).
* :class:`LinkedDiffusionPipeline` -- histology latents denoised with the pathology label (class embedding) and the
  mammogram embedding (cross-attention tokens or concatenated map), classifier-free guidance against the null
  class with a zero embedding; DDIM / DPM-Solver++ from :mod:`breastgen.schedulers`.
* :class:`Linker` -- query mammograms -> k nearest database mammograms (their histology and majority label),
  generated and translated histology; writes PNGs, ``links.json`` and a gallery. Every query is checked before
  anything is written.
* :func:`evaluate_retrieval`, :func:`evaluate_generation`, :func:`evaluate_translation`,
  :func:`evaluate_classifier`, :func:`write_metrics` -- the evaluation (flat ``metrics.json``).

Images are channel-first, float in [0, 1]: mammograms (1, S, S), histology (3, S, S).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engines.diffusion import LatentDiffusionPipeline
from ..errors import BreastGenError
from ..io import atomic_write_json, make_grid, save_png
from ..networks.linking import CONDITION_MODES, translate
from ..schedulers import guided_sample
from .index import METRICS, EmbeddingIndex, model_fingerprint, retrieval_metrics, vote
from .pairs import LABELS, unique_mammograms

__all__ = ["PairedBatch", "MultiOutputLoss", "load_items", "stack", "embed", "build_index",
           "LinkedDiffusionPipeline", "Linker", "classify", "evaluate_retrieval", "evaluate_generation",
           "evaluate_translation", "evaluate_classifier", "write_metrics"]
logger = logging.getLogger(__name__)


def _plain(x: Any) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


# ------------------------------------------------------------------------------------------------ training
class PairedBatch:
    """``prepare_batch`` for ``SupervisedTrainer``: the network gets the batch keys ``inputs`` (the first as the
    input, the others as extra arguments) and the loss compares its output with ``targets`` (one key: a tensor,
    several: a tuple). ``drop`` = ``{key: p}`` zeroes that input for a random fraction ``p`` of the samples (the
    dual-input autoencoder learns to work without its histology input).

    Examples: autoencoder ``PairedBatch("mammo", "mammo")``; translation ``PairedBatch("mammo", "histo")``;
    classifier ``PairedBatch("histo", "label")``; dual ``PairedBatch(["mammo", "histo"], ["mammo", "histo"],
    drop={"histo": 0.5})``.
    """

    def __init__(self, inputs: str | Sequence[str], targets: str | Sequence[str], drop: Mapping[str, float] | None = None):
        self.inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.drop = dict(drop or {})
        bad = {k: p for k, p in self.drop.items() if k not in self.inputs or not 0.0 <= float(p) <= 1.0}
        if bad:
            raise BreastGenError(f"input dropout must name inputs ({', '.join(self.inputs)}) with probabilities in "
                                 f"[0, 1], got {bad}")

    def __call__(self, batchdata: Mapping, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> tuple:
        missing = [k for k in (*self.inputs, *self.targets) if k not in batchdata]
        if missing:
            raise BreastGenError(f"the batch has no {', '.join(map(repr, missing))}")
        xs = []
        for key in self.inputs:
            x = _plain(batchdata[key]).to(device=device, non_blocking=non_blocking)
            p = float(self.drop.get(key, 0.0))
            if p > 0:
                keep = (torch.rand(x.shape[0], device=x.device) >= p).to(x.dtype)
                x = x * keep.view(-1, *([1] * (x.ndim - 1)))
            xs.append(x)
        ts = [_plain(batchdata[k]).to(device=device, non_blocking=non_blocking) for k in self.targets]
        return xs[0], (ts[0] if len(ts) == 1 else tuple(ts)), tuple(xs[1:]), {}


class MultiOutputLoss(nn.Module):
    """``sum_i weights[i] * loss(outputs[i], targets[i])`` for networks with several outputs (default: MSE)."""

    def __init__(self, loss: nn.Module | None = None, weights: Sequence[float] | None = None):
        super().__init__()
        self.loss = loss if loss is not None else nn.MSELoss()
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(outputs) != len(targets):
            raise BreastGenError(f"{len(outputs)} network outputs for {len(targets)} targets")
        weights = self.weights or [1.0] * len(outputs)
        return sum(w * self.loss(o, t) for w, o, t in zip(weights, outputs, targets))


# ------------------------------------------------------------------------------------------------ data
def load_items(transform: Any, entries: Sequence[Mapping]) -> list[dict]:
    """Every entry through ``transform`` (loading + checks), all before any work that writes."""
    return [transform(dict(e)) for e in entries]


def stack(items: Sequence[Mapping], key: str) -> torch.Tensor:
    return torch.stack([_plain(it[key]).float() for it in items])


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, device: Any = "cpu", batch_size: int = 32) -> np.ndarray:
    """(N, D) embeddings of (N, C, S, S) images with ``model.embed`` (eval mode)."""
    was = model.training
    model.eval()
    try:
        out = [model.embed(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    finally:
        model.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, int(getattr(model, "embed_dim", 0))), np.float32)


def build_index(model: nn.Module, transform: Any, pairs: Sequence[Mapping], index_file: str | Path,
                class_names: Sequence[str] = LABELS, device: Any = "cpu", key: str = "mammo") -> EmbeddingIndex:
    """Embed every mammogram of ``pairs`` (a datalist section of pairs) and save the index: ids are the
    mammogram ids, labels their pathology and links their first paired histology image."""
    mammos = unique_mammograms(pairs)
    if not mammos:
        raise BreastGenError("no mammogram to index: the database section of the pairs datalist is empty", index_file)
    links: dict[str, str] = {}
    for e in pairs:
        links.setdefault(e["mammo_id"], str(e["histo"]))
    items = load_items(transform, mammos)
    vectors = embed(model, stack(items, key), device)
    index = EmbeddingIndex(vectors, [m["mammo_id"] for m in mammos], model_fingerprint(model),
                           [int(m["label"]) for m in mammos], [links[m["mammo_id"]] for m in mammos], class_names)
    index.save(index_file)
    logger.info("indexed %d mammograms (%d-dimensional embeddings) in %s", len(index), index.dim, index_file)
    return index


# ------------------------------------------------------------------------------------------------ generation
class LinkedDiffusionPipeline(LatentDiffusionPipeline):
    """Histology from the pathology label and a mammogram conditioning: label -> class embedding
    (``num_class_embeds = num_classes + 1``, the last is the null class), conditioning -> cross-attention context
    (``condition_mode="crossattn"``, (B, tokens, dim)) or concatenated channels (``"concat"``, (B, C, h, w)).

    Classifier-free guidance contrasts (label, conditioning) with (null class, zero context); in concat mode the
    map is shared by both branches (guidance acts on the label only)."""

    def __init__(self, autoencoder: nn.Module, network: nn.Module, scale: Any, latent_shape: Sequence[int],
                 schedule: dict | None = None, num_classes: int = 2, condition_mode: str = "crossattn",
                 device: str | torch.device = "cpu"):
        super().__init__(autoencoder, network, None, scale, latent_shape, schedule, device)
        if condition_mode not in CONDITION_MODES:
            raise BreastGenError(f"unknown conditioning mode {condition_mode!r}; allowed: {', '.join(CONDITION_MODES)}")
        self.num_classes, self.condition_mode = int(num_classes), condition_mode

    @property
    def null_class(self) -> int:
        return self.num_classes

    def check(self, labels: Sequence[int], n: int, guidance_scale: float, num_inference_steps: int,
              sampler: str) -> None:
        """Every problem with a request, before any work."""
        bad = [c for c in labels if isinstance(c, bool) or not isinstance(c, (int, np.integer))
               or not 0 <= int(c) < self.num_classes]
        if bad:
            raise BreastGenError(f"unknown label(s) {bad}; the model knows "
                                 f"{', '.join(f'{i} ({name})' for i, name in enumerate(LABELS[:self.num_classes]))}")
        if len(labels) != n:
            raise BreastGenError(f"{len(labels)} labels for {n} samples")
        if not guidance_scale >= 0:
            raise BreastGenError(f"guidance_scale must be >= 0 (1 = no guidance), got {guidance_scale}")
        if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps or \
                num_inference_steps < 1:
            raise BreastGenError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        self.scheduler(sampler)

    @torch.no_grad()
    def sample(self, condition: torch.Tensor, labels: Sequence[int], seeds: Sequence[int], guidance_scale: float = 3.0,
               num_inference_steps: int = 50, sampler: str = "ddim", progress: Any = None) -> torch.Tensor:
        """Histology (B, 3, S, S) in [0, 1]; sample k depends on ``seeds[k]``, ``labels[k]`` and ``condition[k]``
        (a batch of one conditioning is shared)."""
        self.check(labels, len(seeds), guidance_scale, num_inference_steps, sampler)
        cond = _plain(condition).float().to(self.device)
        if cond.shape[0] not in (1, len(seeds)):
            raise BreastGenError(f"{cond.shape[0]} conditionings for {len(seeds)} samples")
        kwargs: dict[str, Any] = {
            "class_labels": torch.as_tensor([int(c) for c in labels], dtype=torch.long, device=self.device),
            "uncond_class_labels": torch.full((len(seeds),), self.null_class, dtype=torch.long, device=self.device),
            "guidance_scale": float(guidance_scale)}
        if self.condition_mode == "crossattn":
            kwargs.update(context=cond, uncond_context=torch.zeros_like(cond))
        else:
            kwargs["concat"] = cond
        z = guided_sample(self.network, self.initial_noise(seeds), self.scheduler(sampler), int(num_inference_steps),
                          generator=torch.Generator(device=self.device).manual_seed(int(seeds[0])), progress=progress,
                          **kwargs)
        return self.decode(z)


# ------------------------------------------------------------------------------------------------ inference
class Linker:
    """Query mammograms -> linked histology.

    Args:
        model: the mammogram autoencoder (weights loaded before the first query).
        index_file: the embedding index built with that autoencoder (checked by fingerprint on first use).
        mammo_transform / histo_transform: preprocessing of query mammograms (with input checks) and of the
            linked histology (for pictures).
        k, metric: neighbours and distance ("cosine", "manhattan", "euclidean").
        pipeline: optional :class:`LinkedDiffusionPipeline` (generated histology).
        translators: optional ``{name: network}`` of translation networks.
    """

    def __init__(self, model: nn.Module, index_file: str | Path, mammo_transform: Any, histo_transform: Any = None,
                 k: int = 3, metric: str = "cosine", pipeline: LinkedDiffusionPipeline | None = None,
                 translators: Mapping[str, nn.Module] | None = None, device: Any = "cpu", key: str = "mammo"):
        self.model, self.index_file, self.k, self.metric = model, Path(index_file), int(k), metric
        self.mammo_transform, self.histo_transform = mammo_transform, histo_transform
        self.pipeline, self.translators = pipeline, dict(translators or {})
        self.device, self.key = torch.device(device), key
        self._index: EmbeddingIndex | None = None

    @property
    def index(self) -> EmbeddingIndex:
        """The index, loaded on first use and checked against the autoencoder's current weights."""
        if self._index is None:
            self._index = EmbeddingIndex.load(self.index_file, model_fingerprint(self.model))
        return self._index

    def queries(self, entries: Sequence[Mapping]) -> torch.Tensor:
        """Preprocessed query mammograms (N, 1, S, S); any bad query stops here with one line naming it."""
        if not entries:
            raise BreastGenError("no query mammogram given")
        return stack(load_items(self.mammo_transform, entries), self.key)

    def retrieve(self, images: torch.Tensor, metric: str | None = None) -> dict[str, np.ndarray]:
        """Neighbours of each query: ``indices`` / ``distances`` (Q, k), their ``labels`` and the majority ``vote``."""
        dist, idx = self.index.search(embed(self.model, images, self.device), self.k, metric or self.metric)
        labels = self.index.labels[idx]
        return {"indices": idx, "distances": dist, "labels": labels, "vote": vote(labels)}

    def conditioning(self, images: torch.Tensor) -> torch.Tensor:
        if self.pipeline is None:
            raise BreastGenError("no diffusion pipeline configured")
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.model.condition(images.to(self.device), self.pipeline.condition_mode,
                                       self.pipeline.latent_shape[-1])
        self.model.train(was)
        return out

    def _histology(self, path: str) -> torch.Tensor | None:
        if self.histo_transform is None or not path:
            return None
        return _plain(self.histo_transform({"histo": path})["histo"]).float()

    def run(self, entries: Sequence[Mapping], output_dir: str | Path, samples: int = 2, label_source: str = "retrieved",
            guidance_scale: float = 3.0, num_inference_steps: int = 50, sampler: str = "ddim", seed: int = 0,
            gallery_rows: int = 6) -> list[dict]:
        """Link every query: write ``<output_dir>/<n>_query.png``, ``_generated_<j>.png``, ``_translated_<name>.png``,
        ``links.json`` (neighbours with distances, labels and histology; the label used for generation) and
        ``gallery.png`` (rows: query | retrieved histology | translations | generated). ``label_source``:
        "retrieved" (the neighbours' majority, what a new mammogram has) or "given" (the entry's ``label``)."""
        if label_source not in ("retrieved", "given"):
            raise BreastGenError(f"unknown label_source {label_source!r}; allowed: 'retrieved', 'given'")
        images = self.queries(entries)
        found = self.retrieve(images)
        if label_source == "given":
            missing = [str(e.get(self.key)) for e in entries if e.get("label") is None]
            if missing:
                raise BreastGenError(f"label_source 'given' but {len(missing)} query(ies) have no label: "
                                     f"{', '.join(missing[:3])}")
            gen_labels = [int(e["label"]) for e in entries]
        else:
            gen_labels = [int(v) for v in found["vote"]]
        n_gen = int(samples) if self.pipeline is not None else 0
        labels = [c for c in gen_labels for _ in range(n_gen)]
        if n_gen > 0:
            self.pipeline.check(labels, len(labels), guidance_scale, num_inference_steps, sampler)
        out = Path(output_dir)
        generated = None
        if n_gen > 0:
            cond = self.conditioning(images).repeat_interleave(n_gen, dim=0)
            seeds = [int(seed) + i for i in range(len(labels))]
            generated = self.pipeline.sample(cond, labels, seeds, guidance_scale, num_inference_steps, sampler)
            generated = generated.view(len(entries), n_gen, *generated.shape[1:])
        translated = {name: translate(net, images.to(self.device)).cpu() for name, net in self.translators.items()}
        tops = [self._histology(self.index.links[found["indices"][q][0]]) for q in range(min(len(entries),
                                                                                            int(gallery_rows)))]
        manifest, rows = [], []
        for q, entry in enumerate(entries):
            stem = out / f"{q:04d}"
            record: dict[str, Any] = {"query": str(entry.get(self.key)), "metric": self.metric,
                                      "predicted_label": LABELS[int(found["vote"][q])] if found["vote"][q] >= 0 else None,
                                      "generation_label": LABELS[gen_labels[q]] if n_gen else None,
                                      "query_png": str(save_png(images[q], f"{stem}_query.png")), "neighbours": []}
            if entry.get("label") is not None:
                record["true_label"] = LABELS[int(entry["label"])]
            for j, (i, d) in enumerate(zip(found["indices"][q], found["distances"][q])):
                record["neighbours"].append({"rank": j + 1, "id": self.index.ids[i], "distance": float(d),
                                             "label": LABELS[self.index.labels[i]] if self.index.labels[i] >= 0 else None,
                                             "histology": self.index.links[i]})
            row = [images[q]]
            if q < len(tops) and tops[q] is not None:
                row.append(tops[q])
            for name, t in translated.items():
                record[f"translated_{name}"] = str(save_png(t[q], f"{stem}_translated_{name}.png"))
                row.append(t[q])
            if generated is not None:
                record["generated"] = [str(save_png(g, f"{stem}_generated_{j}.png")) for j, g in enumerate(generated[q])]
                row += list(generated[q])
            manifest.append(record)
            if q < gallery_rows:
                rows.append(row)
        atomic_write_json(out / "links.json", manifest)
        width = max(len(r) for r in rows)
        save_png(make_grid([_resize(t, images.shape[-1]) for r in rows for t in r + [torch.ones(3, 1, 1)] *
                            (width - len(r))], ncol=width), out / "gallery.png")
        logger.info("linked %d queries; gallery columns: query | retrieved histology | %s | generated x %d",
                    len(entries), " | ".join(f"translated ({n})" for n in translated) or "-", n_gen)
        return manifest


def _resize(t: torch.Tensor, size: int) -> torch.Tensor:
    t = t.float()
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if tuple(t.shape[1:]) != (size, size):
        t = torch.nn.functional.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return t.clamp(0, 1)


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def classify(classifier: nn.Module, images: torch.Tensor, device: Any = "cpu", batch_size: int = 64) -> np.ndarray:
    """Softmax probabilities (N, classes) of histology images (N, 3, S, S) in [0, 1]."""
    was = classifier.training
    classifier.eval()
    try:
        out = [torch.softmax(classifier(images[i:i + batch_size].to(device)).float(), 1).cpu()
               for i in range(0, len(images), batch_size)]
    finally:
        classifier.train(was)
    if not out:
        raise BreastGenError("nothing to classify")
    return torch.cat(out).numpy()


def _confusion(prefix: str, y: Sequence[int], pred: Sequence[int], names: Sequence[str]) -> dict[str, int]:
    cm = np.zeros((len(names), len(names)), np.int64)
    for a, b in zip(y, pred):
        cm[int(a), int(b)] += 1
    return {f"{prefix}_cm_{names[i]}_{names[j]}": int(cm[i, j]) for i in range(len(names)) for j in range(len(names))}


def evaluate_retrieval(linker: Linker, entries: Sequence[Mapping], metrics: Sequence[str] = METRICS,
                       class_names: Sequence[str] = LABELS) -> dict[str, Any]:
    """Table 1 of the seed: per distance, precision / recall (malignant positive) / accuracy of the k-NN majority
    label of each query against its true label, and the confusion matrix (``retrieval_<metric>_cm_<true>_<pred>``)."""
    images = linker.queries(entries)
    y = [int(e["label"]) for e in entries]
    out: dict[str, Any] = {"retrieval_k": linker.k, "retrieval_database": len(linker.index), "retrieval_queries": len(y)}
    for metric in metrics:
        pred = linker.retrieve(images, metric)["vote"]
        m = retrieval_metrics(y, pred, class_names)
        out.update({f"retrieval_{metric}_{k}": v for k, v in m.items() if k not in ("n", "confusion_matrix")})
    return out


def evaluate_generation(linker: Linker, classifier: nn.Module, entries: Sequence[Mapping], samples_per_label: int = 16,
                        guidance_scale: float = 3.0, num_inference_steps: int = 50, sampler: str = "ddim",
                        seed: int = 0, device: Any = "cpu", batch_size: int = 32, samples_png: str | Path | None = None,
                        class_names: Sequence[str] = LABELS) -> dict[str, Any]:
    """Histology generated for every label, conditioned on the mammograms of ``entries`` in turn, classified by
    the histology classifier: ``generation_accuracy_<label>`` (share classified as the conditioning label),
    overall accuracy, the confusion matrix (rows: conditioning label) and the one-sided binomial p-value of the
    overall accuracy against chance (1 / number of labels)."""
    from scipy.stats import binomtest

    if linker.pipeline is None:
        raise BreastGenError("generation evaluation needs the diffusion pipeline")
    n = int(samples_per_label)
    if n < 1:
        raise BreastGenError(f"samples_per_label must be >= 1, got {samples_per_label}")
    cond_all = linker.conditioning(linker.queries(entries))
    labels = [c for c in range(linker.pipeline.num_classes) for _ in range(n)]
    which = [i % len(cond_all) for i in range(len(labels))]
    seeds = [int(seed) + i for i in range(len(labels))]
    tiles = []
    for s in range(0, len(labels), batch_size):
        sl = slice(s, s + batch_size)
        tiles.append(linker.pipeline.sample(cond_all[which[sl]], labels[sl], seeds[sl], guidance_scale,
                                            num_inference_steps, sampler))
    tiles_t = torch.cat(tiles)
    pred = classify(classifier, tiles_t, device).argmax(1)
    y = np.asarray(labels)
    out: dict[str, Any] = {"generation_samples_per_label": n, "generation_sampler": sampler,
                           "generation_steps": int(num_inference_steps), "generation_guidance_scale": float(guidance_scale)}
    for c, name in enumerate(class_names[:linker.pipeline.num_classes]):
        out[f"generation_accuracy_{name}"] = float((pred[y == c] == c).mean())
    hits = int((pred == y).sum())
    out["generation_accuracy"] = hits / len(y)
    out["generation_p_value_vs_chance"] = float(binomtest(hits, len(y), 1 / linker.pipeline.num_classes,
                                                          alternative="greater").pvalue)
    out.update(_confusion("generation", y, pred, class_names[:linker.pipeline.num_classes]))
    if samples_png:
        per = [tiles_t[y == c][:8] for c in range(linker.pipeline.num_classes)]
        save_png(make_grid([t for p in per for t in p], ncol=max(len(p) for p in per)), samples_png)
    return out


def evaluate_translation(networks: Mapping[str, nn.Module], items: Sequence[Mapping], classifier: nn.Module | None = None,
                         baseline: torch.Tensor | None = None, device: Any = "cpu") -> dict[str, Any]:
    """Per translation network: MSE of the histology predicted from each test mammogram against its paired
    histology and, with a classifier, the share of predictions classified as the pair's label. ``baseline`` (e.g.
    the mean training histology image) gives the MSE of always answering that image."""
    if not items:
        raise BreastGenError("no test pair to evaluate the translation on")
    mammo, histo = stack(items, "mammo"), stack(items, "histo")
    y = np.asarray([int(it["label"]) for it in items])
    out: dict[str, Any] = {"translation_pairs": len(items)}
    for name, net in networks.items():
        pred = translate(net, mammo.to(device)).cpu()
        out[f"translation_{name}_mse"] = float(((pred - histo) ** 2).mean())
        if classifier is not None:
            out[f"translation_{name}_label_accuracy"] = float((classify(classifier, pred, device).argmax(1) == y).mean())
    if baseline is not None:
        out["translation_mean_image_mse"] = float(((baseline.float()[None] - histo) ** 2).mean())
    return out


def evaluate_classifier(classifier: nn.Module, items: Sequence[Mapping], device: Any = "cpu",
                        class_names: Sequence[str] = LABELS) -> dict[str, Any]:
    """Accuracy of the histology classifier on real (held-out) histology, with its confusion matrix."""
    if not items:
        raise BreastGenError("no histology image to evaluate the classifier on")
    y = np.asarray([int(it["label"]) for it in items])
    pred = classify(classifier, stack(items, "histo"), device).argmax(1)
    return {"classifier_real_n": len(y), "classifier_real_accuracy": float((pred == y).mean()),
            **_confusion("classifier_real", y, pred, class_names)}


def write_metrics(path: str | Path, *parts: Mapping[str, Any]) -> dict[str, Any]:
    """Merge flat metric dicts (floats to 6 significant digits) and write them atomically as JSON."""
    merged: dict[str, Any] = {}
    for p in parts:
        merged.update(p)
    merged = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in merged.items()}
    atomic_write_json(path, merged)
    return merged
