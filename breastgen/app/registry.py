"""Tabs registered per bundle, and the bundle models behind them.

A tab module calls :func:`register_tab` with the bundle it serves and a ``build(model, ctx)`` function that
creates its Gradio components. The app makes one :class:`BundleModel` per registered bundle: the bundle's
configs parsed with MONAI's ``ConfigParser`` exactly as its demo ``infer`` stage runs them (``demo.json``
overlaid when the checkpoints are demo checkpoints), objects built on first use and kept. Nothing here imports
gradio.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bundle import demo_requires, demo_stages
from ..errors import BreastGenError

__all__ = ["TabSpec", "register_tab", "tab_specs", "BundleModel"]

_MISSING = object()


@dataclass(frozen=True)
class TabSpec:
    """One GUI tab for one bundle.

    Args:
        order: position of the tab (the issue's numbering: 1 text -> mammogram, 2 inpainting, ...).
        title: tab label.
        bundle: bundle folder name under ``--bundle-dir``.
        checkpoint_keys: config ids whose parsed value is a checkpoint path (or a list of paths); a missing file
            is reported at the top of the tab.
        build: ``build(model: BundleModel, ctx) -> None`` creates the tab's components; ``None`` registers the
            bundle without a GUI yet (the tab says so).
        stage: the demo stage whose configs build the inference objects.
    """

    order: int
    title: str
    bundle: str
    checkpoint_keys: tuple[str, ...] = ()
    build: Callable[..., None] | None = None
    stage: str = "infer"


_TABS: dict[str, TabSpec] = {}


def register_tab(order: int, title: str, bundle: str, checkpoint_keys: Sequence[str] = (),
                 stage: str = "infer") -> Callable[[Callable[..., None] | None], Callable[..., None] | None]:
    """Decorator registering ``build`` as the tab of ``bundle`` (re-registering a bundle replaces its tab)."""

    def deco(build: Callable[..., None] | None) -> Callable[..., None] | None:
        _TABS[bundle] = TabSpec(int(order), title, bundle, tuple(checkpoint_keys), build, stage)
        return build

    return deco


def tab_specs() -> list[TabSpec]:
    return sorted(_TABS.values(), key=lambda s: (s.order, s.bundle))


@dataclass
class BundleModel:
    """A bundle's inference configs, parsed once; ``get(id)`` builds (and keeps) the object with that config id.

    Args:
        bundle_root: the bundle folder (``bundles/<name>``).
        output_dir: the training output folder holding the checkpoints (``demo_out/<name>`` for the demo).
        demo: overlay ``configs/demo.json`` (tiny demo networks); without it the configs' full-size networks.
        data_dir: dataset root (only used for example inputs).
        overlays: further config files laid over the others (e.g. a variant such as ``attention.json``).
        device: ``"cpu"``, ``"cuda"`` ... (default: what the configs choose).
    """

    bundle_root: Path
    output_dir: Path
    demo: bool = True
    data_dir: Path | None = None
    overlays: Sequence[Path] = ()
    device: str | None = None
    stage: str = "infer"
    _parser: Any = field(default=None, init=False, repr=False)
    _lock: Any = field(default_factory=threading.RLock, init=False, repr=False)

    @property
    def name(self) -> str:
        return Path(self.bundle_root).name

    @property
    def installed(self) -> bool:
        return (Path(self.bundle_root) / "configs" / "inference.json").is_file()

    def config_files(self) -> list[Path]:
        configs = Path(self.bundle_root) / "configs"
        names = ["inference.json"]
        if (configs / "demo.json").is_file():
            names = next((list(s["configs"]) for s in demo_stages(self.bundle_root) if s.get("name") == self.stage),
                         names)
        if self.demo:
            names += [] if "demo.json" in names else ["demo.json"]
        else:
            names = [n for n in names if not n.startswith("demo")]
        files = [configs / n for n in names] + [Path(p) for p in self.overlays]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise BreastGenError(f"config file(s) not found: {', '.join(missing)}")
        return files

    def parser(self):
        """The merged ``ConfigParser`` (read once; objects it builds are cached by MONAI's resolver)."""
        from monai.bundle import ConfigParser

        with self._lock:
            if self._parser is None:
                parser = ConfigParser()
                parser.read_config([str(f) for f in self.config_files()])
                overrides = {"bundle_root": str(Path(self.bundle_root).resolve()),
                             "output_dir": str(Path(self.output_dir).resolve())}
                if self.demo and (Path(self.bundle_root) / "configs" / "demo.json").is_file():
                    # a demo built on another bundle's demo (e.g. its autoencoder): the sibling demo folder
                    for key, name in demo_requires(self.bundle_root).items():
                        overrides[key] = str((Path(self.output_dir).parent / name).resolve())
                if self.data_dir is not None:
                    overrides["data_dir"] = str(Path(self.data_dir).resolve())
                if self.device:
                    overrides["device"] = f"$torch.device({str(self.device)!r})"
                parser.update(overrides)
                self._parser = parser
            return self._parser

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The parsed object with config id ``key`` (built on first use). A failure leaves no half-built state:
        the next call parses again."""
        with self._lock:
            parser = self.parser()
            if default is not _MISSING and key not in parser:
                return default
            try:
                return parser.get_parsed_content(key)
            except Exception:
                self._parser = None
                raise

    def missing_checkpoints(self, keys: Sequence[str]) -> list[Path]:
        """Checkpoint files named by the config ids ``keys`` that do not exist."""
        out = []
        for key in keys:
            value = self.get(key, None)
            paths = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
            out += [Path(p) for p in paths if not Path(p).is_file()]
        return out
