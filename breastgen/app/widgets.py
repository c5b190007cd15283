"""Gradio components the tabs share: status box, sampling controls, result gallery, demo-example picker."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gradio as gr

from ..schedulers import SCHEDULERS

__all__ = ["status_box", "sampling_controls", "result_widgets", "example_picker", "NO_EXAMPLE", "progress_callback",
           "WithProgress", "seeds", "example_files", "on_click"]

NO_EXAMPLE = "(none)"


def status_box(prefix: str) -> gr.HTML:
    return gr.HTML("", elem_id=f"{prefix}-status")


def sampling_controls(prefix: str, *, sampler: str, steps: int, guidance: float, guidance_max: float, seed: int,
                      count: int | None = None, count_max: int = 1, count_label: str = "") -> dict[str, Any]:
    """Sampler, steps, guidance, seed and (unless ``count`` is None) number of outputs; defaults come from the
    bundle's inference config."""
    with gr.Row():
        out = {"guidance": gr.Slider(0.0, guidance_max, value=float(guidance), step=0.5, label="Guidance scale",
                                     elem_id=f"{prefix}-guidance"),
               "steps": gr.Slider(1, 1000, value=int(steps), step=1, label="Steps", elem_id=f"{prefix}-steps")}
    with gr.Row():
        out["sampler"] = gr.Dropdown(list(SCHEDULERS), value=sampler, label="Sampler", elem_id=f"{prefix}-sampler",
                                     info="ddpm runs every training step; ddim ~50, dpm++2m ~20")
        out["seed"] = gr.Number(value=int(seed), precision=0, minimum=0, label="Seed (output k uses seed + k)",
                                elem_id=f"{prefix}-seed")
        if count is not None:
            out["count"] = gr.Slider(1, count_max, value=int(count), step=1, label=count_label,
                                     elem_id=f"{prefix}-count")
    return out


def on_click(ctx: Any, button: gr.Button, handler: Any, inputs: list, outputs: list) -> None:
    """``button`` clears the status line (``outputs[0]``) at once, then runs ``handler`` under
    ``ctx.workspace.guarded``, one generation at a time across the tabs."""
    button.click(lambda: "", None, outputs[0], queue=False, show_progress="hidden").then(
        ctx.workspace.guarded(len(outputs))(handler), inputs, outputs, concurrency_id="generate")


def result_widgets(prefix: str, label: str, columns: int = 4) -> tuple[gr.Gallery, gr.File]:
    gallery = gr.Gallery(label=label, columns=columns, height="auto", object_fit="contain", format="png",
                         elem_id=f"{prefix}-gallery", interactive=False, elem_classes=["bg-pixels"])
    files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id=f"{prefix}-files")
    return gallery, files


def example_picker(prefix: str, examples: Iterable[str], label: str) -> gr.Dropdown | None:
    names = list(examples)
    if not names:
        return None
    return gr.Dropdown([NO_EXAMPLE, *names], value=NO_EXAMPLE, label=label, elem_id=f"{prefix}-example")


class WithProgress:
    """A bundle's pipeline whose ``method`` (e.g. ``sample``, ``inpaint``) reports its steps to ``progress``; every
    other attribute is the pipeline's, so the bundle's own writers can drive it."""

    def __init__(self, pipeline: Any, progress: Any, method: str = "sample"):
        self._pipeline, self._progress, self._method = pipeline, progress, method

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._pipeline, name)
        if name != self._method:
            return attr
        return lambda *args, **kwargs: attr(*args, progress=self._progress, **kwargs)


def progress_callback(progress: Any, desc: str):
    """``callable(i, total)`` as the pipelines call it -> Gradio's progress bar."""

    def report(i: int, total: int) -> None:
        progress((int(i) + 1, int(total)), desc=desc, unit="steps")

    return report


def seeds(seed: Any, count: Any) -> list[int]:
    from ..errors import BreastGenError

    if seed is None or float(seed) < 0 or float(seed) != int(seed):
        raise BreastGenError(f"seed must be a whole number >= 0, got {seed!r}")
    if count is None or int(count) < 1:
        raise BreastGenError(f"number of outputs must be >= 1, got {count!r}")
    return [int(seed) + k for k in range(int(count))]


def example_files(paths: Iterable[str | Path]) -> dict[str, Path]:
    """Example name (file name) -> path."""
    return {Path(p).name: Path(p) for p in paths}
