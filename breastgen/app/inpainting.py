"""Tab 2, lesion inpainting (bundle ``mammo_ldm_inpainting``): upload a mammogram (DICOM/PNG/TIFF) or pick a demo
one, draw the lesion mask with a brush, type a box, upload a mask image or let the bundle place a random box on
breast tissue; lesion attributes -> prompt; the bundle's own :func:`breastgen.engines.inpainting.inpaint_files`
inpaints at full resolution and writes 16-bit PNG, synthetic DICOM, the mask and an input | mask | output view."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from ..data.readers import load_image
from ..errors import BreastGenError
from ..io import save_png
from ..prompts import LESION_TYPES, PATHOLOGIES, build_lesion_prompt
from .registry import BundleModel, register_tab
from .widgets import (NO_EXAMPLE, WithProgress, example_files, example_picker, on_click, progress_callback,
                      sampling_controls, status_box)
from .workspace import status_html

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".tif", ".tiff", ".jpg", ".jpeg", ".pgm")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".dcm")
DRAWN, BOX, MASK_FILE, RANDOM = "drawn with the brush", "typed box", "mask image", "random box on the breast"
NORMAL = "(normal tissue)"
NO_PATHOLOGY = "(unspecified)"
EDITOR_MAX = 1024  # longest side of the drawing canvas; masks drawn on a smaller view are scaled up (nearest)


def _editor_view(path: Path, out: Path) -> tuple[dict, tuple[int, int]]:
    """Read the mammogram (one-line errors) and write its 8-bit view for the brush canvas; returns the editor
    value and the image size (W, H)."""
    from PIL import Image

    arr, _ = load_image(path)
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise BreastGenError(f"expected a greyscale mammogram, got shape {arr.shape} (W x H x C)", path.name)
    w, h = arr.shape
    a = arr.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    view = save_png((a - lo) / max(hi - lo, 1e-12), out / f"{path.stem}_view.png")
    k = EDITOR_MAX / max(w, h)
    if k < 1:
        with Image.open(view) as im:
            im.resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.BILINEAR).save(view)
    return {"background": str(view), "layers": [], "composite": str(view)}, (w, h)


def _drawn_mask(editor: Any, size: tuple[int, int], out: Path) -> Path:
    """The brush strokes (any layer, alpha > 0) as a (W, H) mask image of the full image size."""
    from PIL import Image

    layers = [np.asarray(layer) for layer in (editor or {}).get("layers") or [] if layer is not None]
    drawn = [lay[..., 3] > 0 if lay.ndim == 3 and lay.shape[-1] == 4 else lay > 0 for lay in layers]
    if not drawn or not any(d.any() for d in drawn):
        raise BreastGenError("no mask drawn: paint the lesion area with the brush (or choose another mask source)")
    rows_cols = np.logical_or.reduce(drawn).astype(np.uint8) * 255
    w, h = size
    if rows_cols.shape != (h, w):
        rows_cols = np.asarray(Image.fromarray(rows_cols).resize((w, h), Image.Resampling.NEAREST))
    return save_png(rows_cols.T.astype(np.float32) / 255.0, out / "drawn_mask.png")


def _box(text: str) -> list[float]:
    parts = [p for p in str(text or "").replace(",", " ").replace(";", " ").split() if p]
    try:
        box = [float(p) for p in parts]
    except ValueError:
        box = []
    if len(box) != 4:
        raise BreastGenError(f"type the box as four numbers 'x0, y0, x1, y1' (pixels, x = column), got {text!r}")
    return box


def _prompt(pathology: str | None, kind: str | None) -> str:
    return build_lesion_prompt(None if pathology in (None, NO_PATHOLOGY) else pathology,
                               None if kind in (None, NORMAL) else kind)


def _show_prompt(pathology: str | None, kind: str | None) -> str:
    try:
        return _prompt(pathology, kind)
    except BreastGenError as e:
        return f"error: {e}"


@register_tab(2, "2 · Lesion inpainting", "mammo_ldm_inpainting", checkpoint_keys=("autoencoder_ckpt", "network_ckpt"))
def build(model: BundleModel, ctx: Any) -> None:
    try:
        examples = example_files(str(r["image"]) for r in model.get("inputs") or [])
    except Exception:  # noqa: BLE001 - no demo data: no examples
        examples = {}
    gr.Markdown(f"Upload a mammogram ({', '.join(IMAGE_SUFFIXES)}) or pick a demo one, mark where the lesion goes, "
                f"describe it and inpaint. The model ({model.get('mode')} mode) works on a window around the mask; "
                "pixels away from the mask stay exactly as they were. Synthetic, research only.")
    with gr.Row():
        upload = gr.File(label="Mammogram", elem_id="inp-upload")
        example = example_picker("inp", examples, "or a demo mammogram")
    with gr.Row():
        editor = gr.ImageEditor(label="Draw the lesion mask", type="numpy", sources=(), transforms=(), layers=False,
                                brush=gr.Brush(colors=["#ff3030"], default_color="#ff3030", color_mode="fixed"),
                                height=520, elem_id="inp-editor", interactive=True)
        with gr.Column():
            source = gr.Radio([DRAWN, BOX, MASK_FILE, RANDOM], value=DRAWN, label="Mask", elem_id="inp-source")
            box = gr.Textbox(label="Box x0, y0, x1, y1 (pixels of the full image, x = column)", elem_id="inp-box",
                             placeholder="50, 62, 65, 79")
            mask_file = gr.File(label=f"Mask image, same size as the mammogram ({', '.join(MASK_SUFFIXES)})",
                                elem_id="inp-mask")
            pathology = gr.Dropdown([NO_PATHOLOGY, *PATHOLOGIES], value=NO_PATHOLOGY, label="Pathology",
                                    elem_id="inp-pathology")
            kind = gr.Dropdown([*LESION_TYPES, NORMAL], value=model.get("lesion_type", LESION_TYPES[0]),
                               label="Lesion type", elem_id="inp-type")
            preview = gr.Textbox(_show_prompt(NO_PATHOLOGY, kind.value), label="Prompt", interactive=False,
                                 elem_id="inp-prompt")
    negative = gr.Textbox(str(model.get("negative_prompt", "") or ""), label="Negative prompt", elem_id="inp-negative")
    controls = sampling_controls("inp", sampler=model.get("sampler"), steps=model.get("num_inference_steps"),
                                 guidance=model.get("guidance_scale"), guidance_max=20.0, seed=model.get("seed", 0))
    button = gr.Button("Inpaint", variant="primary", elem_id="inp-generate")
    status = status_box("inp")
    compare = gr.Image(label="Before | mask | after", type="filepath", interactive=False, elem_id="inp-compare",
                       format="png", height=360, elem_classes=["bg-pixels"])
    files = gr.File(label="Downloads (16-bit PNG, synthetic DICOM, mask)", file_count="multiple", interactive=False,
                    elem_id="inp-files")
    loaded = gr.State(None)  # {"path": str, "size": (W, H)} of the image on the canvas

    for dd in (pathology, kind):
        dd.change(_show_prompt, [pathology, kind], preview, queue=False, show_progress="hidden")

    def load(upload_v, example_v):
        if not upload_v and example_v in (None, NO_EXAMPLE):  # upload cleared / no example: empty canvas
            return "", None, None
        path = ctx.workspace.upload(upload_v, examples, example_v, "mammogram", IMAGE_SUFFIXES)
        value, size = _editor_view(path, ctx.workspace.new_output_dir())
        note = f"{path.name}: {size[0]} × {size[1]} (W × H) loaded; mark the lesion and press Inpaint"
        return status_html(note), value, {"path": str(path), "size": list(size)}

    pick = example if example is not None else gr.State(NO_EXAMPLE)
    load_outputs = [status, editor, loaded]
    upload.upload(ctx.workspace.guarded(3)(load), [upload, pick], load_outputs)
    upload.clear(ctx.workspace.guarded(3)(load), [upload, pick], load_outputs)
    if example is not None:
        example.change(ctx.workspace.guarded(3)(load), [upload, pick], load_outputs)

    def inpaint(loaded_v, editor_v, source_v, box_v, mask_v, pathology_v, kind_v, negative_v, guidance_v, steps_v,
                sampler_v, seed_v, progress=gr.Progress()):
        from ..engines.inpainting import inpaint_files

        t0 = time.perf_counter()
        if not loaded_v:
            raise BreastGenError("no mammogram loaded: upload one or pick a demo image first")
        if seed_v is None or float(seed_v) < 0:
            raise BreastGenError(f"seed must be a whole number >= 0, got {seed_v!r}")
        image, size = Path(loaded_v["path"]), tuple(loaded_v["size"])
        out = ctx.workspace.new_output_dir()
        if source_v == BOX:
            spec: Any = _box(box_v)
        elif source_v == MASK_FILE:
            spec = str(ctx.workspace.upload(mask_v, {}, None, "mask image", MASK_SUFFIXES))
        elif source_v == RANDOM:
            spec = "random"
        else:
            spec = str(_drawn_mask(editor_v, size, out))
        prompt = _prompt(pathology_v, kind_v)
        extra = {}
        if spec == "random":
            try:  # the bundle's box sizes (from its datalist); the writer's default without data
                extra["random_size"] = model.get("random_box_size")
            except Exception:  # noqa: BLE001
                pass
        progress(0, desc="loading the model")
        model.get("load")
        pipeline = WithProgress(model.get("pipeline"), progress_callback(progress, "denoising"), "inpaint")
        done = inpaint_files(pipeline, [{"image": str(image), "mask": spec}], out, prompt=prompt,
                             negative_prompt=negative_v or "", guidance_scale=float(guidance_v),
                             num_inference_steps=int(steps_v), sampler=sampler_v, seed=int(seed_v),
                             resample=int(model.get("resample", 1)), formats=("png", "dcm"), **extra)[0]
        x0, y0, side = done["window"]
        how = done["mask"] if source_v == BOX else f"mask image {Path(spec).name}" if source_v == MASK_FILE else source_v
        note = (f"{image.name}: inpainted “{prompt}” in {time.perf_counter() - t0:.1f} s (mask: {how}; "
                f"window {side} px at x {x0}, y {y0}; seed {done['seed']}). The DICOM is synthetic: no patient data.")
        return status_html(note), done["files"]["compare"], [done["files"][k] for k in ("png", "dcm", "mask")]

    on_click(ctx, button, inpaint, [loaded, editor, source, box, mask_file, pathology, kind, negative,
                                    controls["guidance"], controls["steps"], controls["sampler"], controls["seed"]],
             [status, compare, files])
    box.change(lambda text: BOX if str(text or "").strip() else gr.skip(), box, source, queue=False,
               show_progress="hidden")
    mask_file.upload(lambda _: MASK_FILE, mask_file, source, queue=False, show_progress="hidden")
