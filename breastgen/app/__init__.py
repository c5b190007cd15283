"""Web GUI (Gradio) for the bundles: one tab per bundle, built from the bundle's own configs.

    python -m breastgen.app --bundle-dir bundles --demo-out demo_out      # or: make gui

Each tab is registered for one bundle (:func:`breastgen.app.registry.register_tab`); its models are built by
parsing that bundle's configs with MONAI's ``ConfigParser`` (the demo stage ``infer``'s configs, plus
``demo.json`` when pointing at demo checkpoints) and loaded on first use. A bundle or checkpoint that is not
there shows a message in its tab; the other tabs work. The app binds 127.0.0.1 unless told otherwise; uploads
and outputs stay in one temporary folder that is removed when the app stops. See ``docs/gui.md``.
"""

from __future__ import annotations

__all__ = ["build_app", "launch", "AppOptions"]


def __getattr__(name: str):  # gradio is imported only when the app is built, not with `import breastgen.app`
    if name in __all__:
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
