"""Tab 3, HE -> IHC translation (bundle ``he2ihc_pyramidpix2pix``): upload an H&E image (or pick a demo one), get
the generator's IHC image; large images go through the bundle's sliding-window translator."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

from ..engines.gan import IMAGE_SUFFIXES, check_rgb_files, list_images, load_rgb
from ..errors import BreastGenError
from ..io import save_png
from .registry import BundleModel, register_tab
from .widgets import NO_EXAMPLE, example_files, example_picker, on_click, status_box
from .workspace import status_html

MAX_PIXELS = 4096 * 4096  # CPU time and memory of one request


def _check_pixels(path) -> None:
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    if w * h > MAX_PIXELS:
        raise BreastGenError(f"image is {w} x {h} pixels; the GUI takes at most {MAX_PIXELS // 10**6} megapixels "
                             "(translate larger images with the bundle's inference config)", path.name)


@register_tab(3, "3 · HE → IHC", "he2ihc_pyramidpix2pix", checkpoint_keys=("ckpt_path",))
def build(model: BundleModel, ctx: Any) -> None:
    try:
        examples = example_files(list_images(model.get("input")))
    except Exception:  # noqa: BLE001 - no demo data: no examples
        examples = {}
    gr.Markdown(f"Upload an H&E image ({', '.join(IMAGE_SUFFIXES)}, RGB); the generator "
                f"({model.get('generator_name')}) translates it to an IHC (HER2) stain.")
    with gr.Row():
        upload = gr.File(label="H&E image", elem_id="he-upload")
        example = example_picker("he", examples, "or a demo H&E image")
    button = gr.Button("Translate", variant="primary", elem_id="he-generate")
    status = status_box("he")
    with gr.Row():
        before = gr.Image(label="H&E (input)", type="filepath", interactive=False, elem_id="he-before",
                          format="png", height=320, elem_classes=["bg-pixels"])
        after = gr.Image(label="IHC (generated)", type="filepath", interactive=False, elem_id="he-after",
                         format="png", height=320, elem_classes=["bg-pixels"])
    files = gr.File(label="Download", interactive=False, elem_id="he-files")

    def translate(upload_v, example_v, progress=gr.Progress()):
        t0 = time.perf_counter()
        path = ctx.workspace.upload(upload_v, examples, example_v, "H&E image", IMAGE_SUFFIXES)
        check_rgb_files([path], what="image")
        _check_pixels(path)
        image = load_rgb(path)
        progress(0, desc="loading the model")
        model.get("load")
        progress(0.5, desc="translating")
        out = ctx.workspace.new_output_dir()
        shown = save_png(image, out / f"{path.stem}_he.png")
        result = save_png(model.get("translator")(image), out / f"{path.stem}_ihc.png")
        w, h = image.shape[1:]
        note = f"{path.name}: {w} × {h} translated in {time.perf_counter() - t0:.1f} s (synthetic IHC, research only)"
        return status_html(note), str(shown), str(result), str(result)

    inputs = [upload, example] if example is not None else [upload, gr.State(NO_EXAMPLE)]
    on_click(ctx, button, translate, inputs, [status, before, after, files])
