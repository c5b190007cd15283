"""Tab 4, histology synthesis (bundle ``histo_ddpm_atypia``): H&E tiles of a nuclear-atypia class, or guided by a
nuclei mask (upload or demo mask; with a class too when the bundle's mask-guided model takes one)."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

from ..data.nuclei import load_masks
from ..errors import BreastGenError
from ..io import save_png
from .registry import BundleModel, register_tab
from .widgets import (NO_EXAMPLE, example_files, example_picker, on_click, progress_callback, result_widgets,
                      sampling_controls, seeds, status_box)
from .workspace import status_html

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".dcm")
NO_CLASS = "(none)"


def _demo_masks(model: BundleModel) -> dict:
    """The masks the bundle's inference config picks from its datalist (the demo data's test masks)."""
    try:
        return example_files(model.get("mask_request")[0])
    except Exception:  # noqa: BLE001 - no demo data (or a datalist without masks): no examples
        return {}


@register_tab(4, "4 · Histology synthesis", "histo_ddpm_atypia", checkpoint_keys=("classcond_ckpts", "maskguided_ckpt"))
def build(model: BundleModel, ctx: Any) -> None:
    class_names = [str(c) for c in model.get("class_names")]
    size, values = int(model.get("image_size")), list(model.get("mask_values"))
    mask_takes_class = bool(model.get("mask_class_labels"))
    examples = _demo_masks(model)
    gr.Markdown(f"{size} × {size} H&E tiles. Choose a class (class-conditional model) and/or give a nuclei mask "
                f"(grey levels {', '.join(map(str, values))}; square, resized to {size} × {size}) for the mask-guided "
                f"model{', which also takes the class' if mask_takes_class else ''}. Synthetic, research only.")
    with gr.Row():
        label = gr.Dropdown([NO_CLASS, *class_names], value=class_names[0], label="Class", elem_id="histo-class")
        upload = gr.File(label=f"Nuclei mask ({', '.join(MASK_SUFFIXES)})", elem_id="histo-upload")
        example = example_picker("histo", examples, "or a demo mask")
    controls = sampling_controls("histo", sampler=model.get("sampler"), steps=model.get("num_inference_steps"),
                                 guidance=model.get("guidance_scale"), guidance_max=10.0, seed=model.get("seed", 0),
                                 count=4, count_max=16, count_label="Number of tiles")
    button = gr.Button("Generate", variant="primary", elem_id="histo-generate")
    status = status_box("histo")
    gallery, files = result_widgets("histo", "Generated tiles", columns=8)
    mask_view = gr.Image(label="Mask used", type="filepath", interactive=False, elem_id="histo-mask", format="png",
                         height=160, elem_classes=["bg-pixels"])

    def generate(label_v, upload_v, example_v, guidance_v, steps_v, sampler_v, seed_v, count_v,
                 progress=gr.Progress()):
        t0 = time.perf_counter()
        tile_seeds = seeds(seed_v, count_v)
        cls = None if label_v in (None, "", NO_CLASS) else class_names.index(label_v)
        mask_path = ctx.workspace.upload(upload_v, examples, example_v, "nuclei mask", MASK_SUFFIXES, required=False)
        out = ctx.workspace.new_output_dir()
        masks = mask_file = None
        ignored = ""
        if mask_path is not None:
            if cls is not None and not mask_takes_class:
                cls, ignored = None, " (class ignored: this bundle's mask-guided model takes none)"
            masks = load_masks([mask_path], values, size)
            mask_file = save_png(masks[0].argmax(0).float() / max(1, len(values) - 1), out / "mask.png")
            masks = masks.expand(len(tile_seeds), -1, -1, -1)
            key, what = "maskguided_pipeline", "mask-guided"
        elif cls is None:
            raise BreastGenError("choose a class or give a nuclei mask")
        else:
            key, what = "classcond_pipeline", "class-conditional"
        progress(0, desc="loading the model")
        pipeline = model.get(key)
        labels = None if cls is None else [cls] * len(tile_seeds)
        tiles = pipeline.sample(tile_seeds, labels, masks, sampler_v, int(steps_v), float(guidance_v),
                                progress=progress_callback(progress, "denoising"))
        name = "mask" if cls is None else class_names[cls].replace(" ", "_")
        paths = [str(save_png(t, out / f"{name}_seed{s:06d}.png")) for t, s in zip(tiles, tile_seeds)]
        note = (f"{len(paths)} {what} tile(s), {size} × {size}, in {time.perf_counter() - t0:.1f} s "
                f"({'class ' + repr(class_names[cls]) if cls is not None else 'no class'}"
                f"{', mask ' + mask_path.name if mask_path else ''}; seeds {tile_seeds[0]}–{tile_seeds[-1]}){ignored}")
        shown = [(p, f"seed {s}") for p, s in zip(paths, tile_seeds)]
        return status_html(note), shown, paths, None if mask_file is None else str(mask_file)

    pick = example if example is not None else gr.State(NO_EXAMPLE)
    on_click(ctx, button, generate, [label, upload, pick, controls["guidance"], controls["steps"], controls["sampler"],
                                     controls["seed"], controls["count"]], [status, gallery, files, mask_view])
