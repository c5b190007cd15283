"""Paired image-quality evaluation (PSNR / SSIM) that is explicit about what it measures.

* Metrics are MONAI's ``PSNRMetric`` and ``SSIMMetric`` (Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03, mean over
  channels and valid positions -- skimage's ``structural_similarity(gaussian_weights=True,
  use_sample_covariance=False)``), always with an explicit ``data_range``: 255 on the uint8 images a user sees
  (predictions quantised like the PNGs written) and 1.0 on the float [0, 1] images.
* :func:`evaluate_translation` scores every pair at full resolution, writes a per-image CSV, a flat
  ``metrics.json`` (mean and std, per group, and the trivial baseline "output = input" alongside), and a
  Markdown summary. A pair that cannot be scored is a row with its error in the CSV, counted in
  ``n_failed``, and makes the call raise one :class:`BreastGenError` naming the files -- never silently skipped.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric

from ..errors import BreastGenError
from ..io.atomic import atomic_write_json, atomic_write_text

__all__ = ["quantize_uint8", "psnr", "ssim", "pair_scores", "summarize", "QualityReport", "evaluate_translation",
           "METRICS"]
logger = logging.getLogger(__name__)
METRICS = ("psnr_u8", "ssim_u8", "psnr_float", "ssim_float")


def _batch(x: Any) -> torch.Tensor:
    t = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    t = t.detach().float().cpu()
    return t[None] if t.ndim == 3 else t


def quantize_uint8(x01: Any) -> torch.Tensor:
    """[0, 1] float -> the uint8 values (0..255, as float) a PNG writer stores (round half up, clipped)."""
    return torch.floor(_batch(x01).clamp(0, 1) * 255.0 + 0.5)


def psnr(pred: Any, target: Any, data_range: float) -> float:
    """PSNR in dB of one image pair (C, W, H) with an explicit ``data_range`` (MONAI ``PSNRMetric``)."""
    return float(PSNRMetric(max_val=float(data_range), reduction="mean")(_batch(pred), _batch(target)).mean())


def ssim(pred: Any, target: Any, data_range: float) -> float:
    """SSIM of one image pair (C, W, H) with an explicit ``data_range`` (MONAI ``SSIMMetric``, 2D)."""
    metric = SSIMMetric(spatial_dims=2, data_range=float(data_range), kernel_type="gaussian", win_size=11,
                        kernel_sigma=1.5, reduction="mean")
    return float(metric(_batch(pred), _batch(target)).mean())


def pair_scores(pred01: Any, target01: Any) -> dict[str, float]:
    """PSNR and SSIM on uint8 (data_range 255) and float (data_range 1) versions of a [0, 1] pair."""
    p, t = _batch(pred01), _batch(target01)
    if p.shape != t.shape:
        raise BreastGenError(f"prediction {tuple(p.shape[1:])} and target {tuple(t.shape[1:])} differ in shape")
    if not torch.isfinite(p).all():
        raise BreastGenError("prediction has NaN/Inf values")
    pu, tu = quantize_uint8(p), quantize_uint8(t)
    return {"psnr_u8": psnr(pu, tu, 255.0), "ssim_u8": ssim(pu, tu, 255.0),
            "psnr_float": psnr(p.clamp(0, 1), t, 1.0), "ssim_float": ssim(p.clamp(0, 1), t, 1.0)}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarize(rows: Sequence[dict], metrics: Sequence[str], prefix: str = "") -> dict[str, float]:
    """``{prefix}{metric}_mean`` / ``_std`` (sample std, ddof 1) over the rows that have the metric."""
    out: dict[str, float] = {}
    for m in metrics:
        mean, std = _mean_std([r[m] for r in rows if isinstance(r.get(m), (int, float))])
        out[f"{prefix}{m}_mean"], out[f"{prefix}{m}_std"] = mean, std
    return out


class QualityReport:
    """Per-image rows (``name``, ``group``, ``status``, scores or ``error``) -> CSV, flat metrics, Markdown."""

    def __init__(self, group_key: str | None = "group", baseline_name: str = "baseline"):
        self.rows: list[dict[str, Any]] = []
        self.group_key, self.baseline_name = group_key, baseline_name

    def add(self, name: str, group: Any, scores: dict[str, float], baseline: dict[str, float] | None = None) -> None:
        row = {"name": name, "group": group, "status": "ok", "error": "", **scores}
        row.update({f"{self.baseline_name}_{k}": v for k, v in (baseline or {}).items()})
        self.rows.append(row)

    def add_failure(self, name: str, group: Any, error: BaseException | str) -> None:
        msg = str(error) if isinstance(error, BreastGenError) or isinstance(error, str) else \
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        self.rows.append({"name": name, "group": group, "status": "failed", "error": " ".join(msg.split())})

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "ok"]

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "ok"]

    def metrics(self) -> dict[str, Any]:
        """Flat dict: counts, model and baseline mean/std, and the same per group (``<group_key>=<g>/...``)."""
        base = [f"{self.baseline_name}_{m}" for m in METRICS]
        out: dict[str, Any] = {"n_images": len(self.rows), "n_scored": len(self.ok), "n_failed": len(self.failed)}
        out.update(summarize(self.ok, METRICS))
        out.update(summarize(self.ok, base))
        if self.group_key:
            for g in sorted({str(r["group"]) for r in self.ok}):
                rows = [r for r in self.ok if str(r["group"]) == g]
                out[f"{self.group_key}={g}/n"] = len(rows)
                out.update(summarize(rows, [*METRICS, *base], prefix=f"{self.group_key}={g}/"))
        return out

    def csv_text(self) -> str:
        group_col = self.group_key or "group"
        cols = ["name", group_col, "status", *METRICS, *[f"{self.baseline_name}_{m}" for m in METRICS], "error"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            row = {k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items() if k != "group"}
            w.writerow({**row, group_col: r["group"]})
        return buf.getvalue()

    def markdown(self, title: str = "Image quality") -> str:
        def cell(rows: list[dict], m: str) -> str:
            mean, std = _mean_std([r[m] for r in rows])
            return f"{mean:.3f} ± {std:.3f}" if not math.isnan(mean) else "n/a"

        groups = [("all", self.ok)]
        if self.group_key:
            groups += [(f"{self.group_key} {g}", [r for r in self.ok if str(r["group"]) == g])
                       for g in sorted({str(r["group"]) for r in self.ok})]
        lines = [f"# {title}", "", f"{len(self.ok)} of {len(self.rows)} pairs scored at full resolution; "
                 f"{len(self.failed)} failed. Mean ± sample std over images. u8: uint8 images, data_range 255; "
                 "float: [0, 1] images, data_range 1.", "",
                 "| subset | n | output | PSNR u8 | SSIM u8 | PSNR float | SSIM float |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for label, rows in groups:
            for who, pre in (("model", ""), (self.baseline_name, f"{self.baseline_name}_")):
                lines.append(f"| {label} | {len(rows)} | {who} | " + " | ".join(cell(rows, pre + m) for m in METRICS)
                             + " |")
        if self.failed:
            lines += ["", "## Failed", ""] + [f"- {r['name']}: {r['error']}" for r in self.failed]
        return "\n".join(lines) + "\n"

    def write(self, output_dir: str | os.PathLike, extra: dict[str, Any] | None = None,
              title: str = "Image quality") -> dict[str, Any]:
        """Write ``per_image.csv``, ``metrics.json`` (``extra`` merged in) and ``metrics.md``; return the metrics."""
        out = Path(output_dir)
        metrics = {**self.metrics(), **(extra or {})}
        atomic_write_text(out / "per_image.csv", self.csv_text())
        atomic_write_text(out / "metrics.md", self.markdown(title))
        atomic_write_json(out / "metrics.json", metrics)
        return metrics

    def raise_failures(self) -> None:
        if self.failed:
            names = ", ".join(f"{r['name']} ({r['error']})" for r in self.failed[:10])
            more = f" and {len(self.failed) - 10} more" if len(self.failed) > 10 else ""
            raise BreastGenError(f"{len(self.failed)} of {len(self.rows)} pair(s) could not be scored (see "
                                 f"per_image.csv): {names}{more}")


def evaluate_translation(predict: Callable[[torch.Tensor], torch.Tensor], datalist: Sequence[dict],
                         output_dir: str | os.PathLike, load: Callable[[str], torch.Tensor] | None = None,
                         image_key: str = "image", target_key: str = "target", group_key: str | None = "her2",
                         baseline_name: str = "baseline_input", samples: int = 4, sample_dir: str = "samples",
                         extra: dict[str, Any] | None = None, raise_on_failure: bool = True) -> dict[str, Any]:
    """Score ``predict(input)`` against the target for every datalist entry, at full resolution.

    ``predict`` maps a [0, 1] float ``(C, W, H)`` image to a [0, 1] image of the same size (e.g.
    :class:`breastgen.engines.gan.ImageTranslator`); ``load`` reads a file as such a tensor (default RGB loader).
    The baseline "output = input" is scored alongside. Writes ``per_image.csv``, ``metrics.json``,
    ``metrics.md`` and ``samples`` triptychs (input | output | target) into ``output_dir``; raises after writing
    if any pair failed (``raise_on_failure``).
    """
    from ..engines.gan import load_rgb
    from ..io import save_png

    load = load or load_rgb
    report = QualityReport(group_key=group_key, baseline_name=baseline_name)
    shown = 0
    for i, entry in enumerate(datalist):
        name = Path(str(entry.get(image_key, f"#{i}"))).name
        group = entry.get(group_key, "") if group_key else ""
        try:
            x, y = load(entry[image_key]), load(entry[target_key])
            if tuple(x.shape) != tuple(y.shape):
                raise BreastGenError(f"input {tuple(x.shape)} and target {tuple(y.shape)} differ in size")
            pred = predict(x)
            if tuple(pred.shape) != tuple(y.shape):
                raise BreastGenError(f"output {tuple(pred.shape)} differs from target {tuple(y.shape)}")
            report.add(name, group, pair_scores(pred, y), pair_scores(x, y))
        except Exception as e:  # noqa: BLE001 - recorded in the report and raised below, never swallowed
            logger.error("%s: %s", name, e)
            report.add_failure(name, group, e)
            continue
        if shown < samples:
            save_png(torch.cat([x, pred, y], dim=1), Path(output_dir) / sample_dir / f"{Path(name).stem}.png")
            shown += 1
    metrics = report.write(output_dir, extra)
    logger.info("evaluated %d pair(s): PSNR u8 %.3f (input baseline %.3f), SSIM u8 %.4f (input baseline %.4f)",
                metrics["n_scored"], metrics["psnr_u8_mean"], metrics[f"{baseline_name}_psnr_u8_mean"],
                metrics["ssim_u8_mean"], metrics[f"{baseline_name}_ssim_u8_mean"])
    if raise_on_failure:
        report.raise_failures()
    return metrics
