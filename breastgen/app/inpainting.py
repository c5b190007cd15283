"""Tab 2, lesion inpainting (bundle ``mammo_ldm_inpainting``): registered without a GUI yet.

The tab is in place and says why it is empty: the bundle is not in ``--bundle-dir``, or (once it is) its
checkpoints are missing or this module has no ``build`` yet. To add the GUI, replace ``None`` below with a
``build(model, ctx)`` like the other tabs: upload a mammogram (``breastgen.data.readers.load_image``) or pick a
demo image, draw the mask (``gr.ImageEditor`` brush layer) or type a box, lesion attributes, then the bundle's
``@pipeline`` from its inference config (``model.get("load")``, ``model.get("pipeline")``); before/after
view and PNG + synthetic DICOM downloads as in tab 1.
"""

from __future__ import annotations

from .registry import register_tab

register_tab(2, "2 · Lesion inpainting", "mammo_ldm_inpainting")(None)
