"""Tab 1, text -> mammogram (bundle ``mammo_ldm_text2image``): MAM-E prompt from attribute dropdowns with a live
preview, or free text; negative prompt, guidance, steps, sampler, seed, number of images, laterality (the model
draws left breasts; right ones are mirrored). Images are written by the bundle's own writer
(:func:`breastgen.engines.diffusion.generate_images`) as PNG and de-identified synthetic DICOM."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

from ..engines.diffusion import generate_images
from ..errors import BreastGenError
from ..prompts import AREAS, DEFAULT_VENDORS, DENSITIES, VIEWS, build_prompt
from .registry import BundleModel, register_tab
from .workspace import status_html
from .widgets import WithProgress, on_click, progress_callback, result_widgets, sampling_controls, seeds, status_box

ANY = "(any)"
FROM_ATTRIBUTES, FROM_TEXT = "attributes", "free text"


def attribute_prompt(vendor: str | None, view: str | None, density: str | None, area: str | None) -> str:
    def pick(v: str | None) -> str | None:
        return None if v in (None, "", ANY) else v

    return build_prompt(pick(vendor), pick(view), pick(density), pick(area))


def _preview(vendor, view, density, area) -> str:
    try:
        return attribute_prompt(vendor, view, density, area)
    except BreastGenError as e:
        return f"error: {e}"


@register_tab(1, "1 · Text → mammogram", "mammo_ldm_text2image", checkpoint_keys=("autoencoder_ckpt", "diffusion_ckpt"))
def build(model: BundleModel, ctx: Any) -> None:
    tokenizer = model.get("tokenizer")
    vendors = [v for v in DEFAULT_VENDORS if not tokenizer.unknown_words(v)]
    size = model.get("image_size")
    gr.Markdown(f"The model makes {size} × {size} images of a left breast (chest wall on the left); *Right* "
                "mirrors them. Synthetic images for research, not for diagnosis.")
    with gr.Row():
        vendor = gr.Dropdown([ANY, *vendors], value=ANY, label="Vendor", elem_id="t2i-vendor")
        view = gr.Dropdown([ANY, *VIEWS], value="CC", label="View", elem_id="t2i-view")
        density = gr.Dropdown([ANY, *DENSITIES], value="high", label="Density", elem_id="t2i-density")
        area = gr.Dropdown([ANY, *AREAS], value="medium", label="Breast area", elem_id="t2i-area")
    preview = gr.Textbox(attribute_prompt(ANY, "CC", "high", "medium"), label="Prompt from the attributes",
                         interactive=False, elem_id="t2i-preview")
    source = gr.Radio([FROM_ATTRIBUTES, FROM_TEXT], value=FROM_ATTRIBUTES, label="Use the prompt from",
                      elem_id="t2i-source")
    free = gr.Textbox(label="Free-text prompt (MAM-E grammar)", elem_id="t2i-prompt",
                      placeholder="a hologic mammogram in MLO view with low density and big area")
    negative = gr.Textbox(str(model.get("negative_prompt", "") or ""), label="Negative prompt",
                          elem_id="t2i-negative", placeholder="e.g. a mammogram with very high density")
    controls = sampling_controls("t2i", sampler=model.get("sampler"), steps=model.get("num_inference_steps"),
                                 guidance=model.get("guidance_scale"), guidance_max=20.0, seed=model.get("seed", 0),
                                 count=2, count_max=8, count_label="Number of images")
    laterality = gr.Radio([("Left", "L"), ("Right", "R")], value="L", label="Laterality", elem_id="t2i-laterality")
    button = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
    status = status_box("t2i")
    gallery, files = result_widgets("t2i", "Generated mammograms")

    attributes = [vendor, view, density, area]
    for dd in attributes:
        dd.change(_preview, attributes, preview, queue=False, show_progress="hidden")
    free.change(lambda text: FROM_TEXT if text.strip() else FROM_ATTRIBUTES, free, source, queue=False,
               show_progress="hidden")

    def generate(vendor_v, view_v, density_v, area_v, source_v, free_v, negative_v, guidance_v, steps_v, sampler_v,
                 seed_v, count_v, laterality_v, progress=gr.Progress()):
        t0 = time.perf_counter()
        if source_v == FROM_TEXT:
            prompt = " ".join(str(free_v or "").split())
            if not prompt:
                raise BreastGenError("the free-text prompt is empty (or choose 'attributes')")
        else:
            prompt = attribute_prompt(vendor_v, view_v, density_v, area_v)
        first = seeds(seed_v, count_v)[0]
        progress(0, desc="loading the model")
        model.get("load")
        pipeline = WithProgress(model.get("pipeline"), progress_callback(progress, "denoising"))
        manifest = generate_images(pipeline, [prompt], ctx.workspace.new_output_dir(), negative_prompt=negative_v or "",
                                   num_samples=int(count_v), guidance_scale=float(guidance_v),
                                   num_inference_steps=int(steps_v), sampler=sampler_v, seed=first,
                                   laterality=laterality_v, batch_size=int(count_v), formats=("png", "dcm"))
        shown = [(m["files"]["png"], f"seed {m['seed']}") for m in manifest]
        downloads = [m["files"][k] for m in manifest for k in ("png", "dcm")]
        note = (f"{len(manifest)} image(s), {size} × {size}, in {time.perf_counter() - t0:.1f} s: “{prompt}” "
                f"(seeds {first}–{first + len(manifest) - 1}, {sampler_v}, {int(steps_v)} steps, guidance "
                f"{float(guidance_v):g}). DICOM files are synthetic and carry no patient data.")
        return status_html(note), shown, downloads

    on_click(ctx, button, generate, [*attributes, source, free, negative, controls["guidance"], controls["steps"],
                                     controls["sampler"], controls["seed"], controls["count"], laterality],
             [status, gallery, files])
