"""Build and launch the Gradio app: one tab per registered bundle."""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# offline machines: no usage statistics, no version check, no model hub look-ups
for _key, _value in (("GRADIO_ANALYTICS_ENABLED", "False"), ("HF_HUB_OFFLINE", "1"),
                     ("HF_HUB_DISABLE_TELEMETRY", "1"), ("GRADIO_SSR_MODE", "False")):
    os.environ.setdefault(_key, _value)

import gradio as gr  # noqa: E402

from ..errors import find_breastgen_error  # noqa: E402
from . import he2ihc, histology, inpainting, text2image  # noqa: E402,F401 - registering the tabs
from .registry import BundleModel, TabSpec, tab_specs  # noqa: E402
from .workspace import Workspace, notice_html  # noqa: E402

__all__ = ["AppOptions", "AppContext", "build_app", "launch", "is_loopback", "host_warning"]
logger = logging.getLogger(__name__)

CSS = """
.bg-status, .bg-notice {padding: 6px 10px; border-radius: 6px; margin: 4px 0}
.bg-ok {background: #eaf6ea; color: #14401a}
.bg-error {background: #fdecea; color: #7a1010; font-weight: 600}
.bg-notice {background: #fff4e0; color: #5a3b00}
.bg-pixels img {image-rendering: pixelated}
"""
FONTS = dict(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # nothing fetched


@dataclass
class AppOptions:
    """Where the bundles and their checkpoints are, and how to serve.

    ``checkpoints`` maps a bundle name to a training output folder used with the bundle's full-size configs;
    other bundles use their demo checkpoints ``<demo_out>/<bundle>`` with ``demo.json`` overlaid.
    ``overlays`` maps a bundle name to extra config files (e.g. ``attention.json``).
    """

    bundle_dir: Path = Path("bundles")
    demo_out: Path = Path("demo_out")
    demo_data: Path | None = Path("demo_data")
    checkpoints: dict[str, Path] = field(default_factory=dict)
    overlays: dict[str, list[Path]] = field(default_factory=dict)
    device: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    max_upload_mb: float = 50.0


@dataclass
class AppContext:
    options: AppOptions
    workspace: Workspace


def bundle_model(spec: TabSpec, options: AppOptions) -> BundleModel:
    trained = options.checkpoints.get(spec.bundle)
    data = options.demo_data if options.demo_data is not None and Path(options.demo_data).is_dir() else None
    return BundleModel(Path(options.bundle_dir) / spec.bundle,
                       Path(trained) if trained else Path(options.demo_out) / spec.bundle, demo=trained is None,
                       data_dir=data if trained is None else None, overlays=options.overlays.get(spec.bundle, ()),
                       device=options.device, stage=spec.stage)


def _tab_notice(spec: TabSpec, model: BundleModel) -> tuple[str | None, bool]:
    """(message for the top of the tab, whether to build the tab's controls)."""
    if not model.installed:
        return (f"The bundle {spec.bundle} is not installed: {model.bundle_root}/configs/inference.json not found. "
                "This tab works once the bundle is in the bundle folder."), False
    if spec.build is None:
        return f"The bundle {spec.bundle} is installed, but this version of the GUI has no tab for it yet.", False
    try:
        missing = model.missing_checkpoints(spec.checkpoint_keys)
    except Exception as e:  # noqa: BLE001 - a broken config disables its tab only
        return f"The configs of {spec.bundle} do not parse: {find_breastgen_error(e) or e}", False
    if missing:
        how = ("run `make demo` (or `python -m breastgen.bundle demo bundles/" + spec.bundle + "`) and restart the "
               "app" if model.demo else "train the bundle or point --checkpoints at its output folder")
        return (f"No trained checkpoint for {spec.bundle}: {', '.join(map(str, missing))} not found; {how}. "
                "Generating here reports the same error."), True
    return None, True


def build_app(options: AppOptions, workspace: Workspace | None = None) -> tuple[gr.Blocks, AppContext]:
    ctx = AppContext(options, workspace or Workspace(options.max_upload_mb))
    with gr.Blocks(title="breastgen", analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
        gr.Markdown("## breastgen: generative breast imaging\nSynthetic images for research. Not for diagnosis. "
                    "Checkpoints: " + ", ".join(sorted(options.checkpoints)) + (" (trained), others " if
                                                                                 options.checkpoints else "")
                    + f"demo checkpoints from `{options.demo_out}`.")
        with gr.Tabs():
            for spec in tab_specs():
                model = bundle_model(spec, options)
                with gr.Tab(spec.title, id=spec.bundle, elem_id=f"tab-{spec.bundle}"):
                    message, controls = _tab_notice(spec, model)
                    if message:
                        gr.HTML(notice_html(message), elem_id=f"notice-{spec.bundle}")
                    if controls:
                        try:
                            spec.build(model, ctx)
                        except Exception as e:  # noqa: BLE001 - one broken tab must not take the app down
                            logger.exception("tab %s", spec.bundle)
                            gr.HTML(notice_html(f"This tab could not be built: {find_breastgen_error(e) or e}"),
                                    elem_id=f"error-{spec.bundle}")
    blocks.queue(default_concurrency_limit=1)
    return blocks, ctx


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_warning(host: str, port: int) -> str | None:
    """The warning printed when the app binds an address other machines can reach (None for loopback)."""
    if is_loopback(host):
        return None
    return (f"warning: serving on {host}: anyone who can reach this machine on port {port} can use the app and upload "
            "files (there is no login). Use the default 127.0.0.1 unless that is intended.")


def _patient_url_ok(url: str, seconds: float = 60.0) -> bool:
    """Gradio's start-up self-check (a HEAD request on the app's own URL) gives up after one 3-second timeout, which
    a loaded machine exceeds while the first page is built; this one keeps trying for ``seconds``."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.head(url, timeout=10).status_code in (200, 401, 301, 302, 303, 307, 308):
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def launch(options: AppOptions) -> None:
    """Build the app and serve it until interrupted; the temporary folder is removed at exit."""
    warning = host_warning(options.host, options.port)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    blocks, ctx = build_app(options)
    atexit.register(ctx.workspace.cleanup)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops like Ctrl-C: server closed, temporary folder removed
    gr.networking.url_ok = _patient_url_ok
    print(f"breastgen GUI on http://{options.host}:{options.port} (temporary files in {ctx.workspace.root}; "
          "Ctrl-C stops)", flush=True)
    blocks.launch(server_name=options.host, server_port=int(options.port), max_file_size=ctx.workspace.max_upload_bytes,
                  allowed_paths=[str(ctx.workspace.root)], theme=gr.themes.Default(**FONTS), css=CSS, quiet=True,
                  ssr_mode=False, show_error=False, inbrowser=False, share=False, mcp_server=False,
                  footer_links=["settings"])
    ctx.workspace.cleanup()
