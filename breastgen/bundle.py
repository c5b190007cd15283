"""Bundle harness: offline metadata validation, structure checks and running a bundle's demo stages.

``python -m monai.bundle verify_metadata`` downloads the schema; here it ships with the package
(``resources/meta_schema_20240725.json``, Project-MONAI, Apache-2.0) so validation works offline.

Conventions every bundle follows (the tests and ``make demo`` rely on them):

* ``configs/`` holds ``metadata.json``, ``train*.json``, ``inference.json``, ``evaluate.json``,
  ``multi_gpu_train*.json``, ``logging.conf`` and ``demo.json``; ``docs/README.md`` and ``LICENSE`` exist.
* Every config defines ``bundle_root``, ``data_dir`` (dataset root) and ``output_dir`` (where it writes).
* ``configs/demo.json`` is an overlay making train / inference / evaluate tiny and pointing them at the demo
  data; its ``demo_stages`` lists what ``make demo`` runs, in order::

      "demo_stages": [{"name": "train", "configs": ["train.json"]}, {"name": "infer", "configs": ["inference.json"]}]

  Each stage runs the listed configs with ``demo.json`` overlaid last (or where the stage lists it, so that a
  stage-specific demo overlay can come after it). The demo writes
  ``<output_dir>/metrics.json`` and sample PNGs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import BreastGenError, main_guard
from .io import atomic_write_json

__all__ = ["SCHEMA_PATH", "REQUIRED_FILES", "validate_metadata", "check_bundle", "demo_stages", "demo_requires", "run_configs",
           "run_demo"]

SCHEMA_PATH = Path(__file__).parent / "resources" / "meta_schema_20240725.json"
REQUIRED_FILES = ("configs/metadata.json", "configs/inference.json", "configs/evaluate.json", "configs/logging.conf",
                  "configs/demo.json", "docs/README.md", "LICENSE")
REQUIRED_GLOBS = ("configs/train*.json", "configs/multi_gpu_train*.json")
logger = logging.getLogger(__name__)


def validate_metadata(meta_file: str | Path) -> dict:
    """Validate a bundle's metadata.json against the vendored MONAI schema; also require the version to be
    listed in the changelog. Raises BreastGenError listing every problem."""
    import jsonschema

    meta_file = Path(meta_file)
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BreastGenError(f"cannot read metadata ({e})", meta_file) from None
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft201909Validator(schema)
    problems = [f"{'/'.join(map(str, err.path)) or '<root>'}: {err.message}" for err in validator.iter_errors(meta)]
    if isinstance(meta, dict) and meta.get("version") not in (meta.get("changelog") or {}):
        problems.append(f"version {meta.get('version')!r} is not listed in the changelog")
    if problems:
        raise BreastGenError("metadata does not follow the MONAI schema: " + "; ".join(problems), meta_file)
    return meta


def check_bundle(bundle_dir: str | Path) -> list[str]:
    """Problems with a bundle's layout: missing files, invalid metadata, configs that do not parse."""
    from monai.bundle import ConfigParser

    root = Path(bundle_dir)
    problems = [f"missing {f}" for f in REQUIRED_FILES if not (root / f).is_file()]
    problems += [f"no file matches {g}" for g in REQUIRED_GLOBS if not list(root.glob(g))]
    if (root / "configs/metadata.json").is_file():
        try:
            validate_metadata(root / "configs/metadata.json")
        except BreastGenError as e:
            problems.append(str(e))
    for cfg in sorted(root.glob("configs/*.json")):
        try:  # syntax of every file on its own (overlays only merge onto their base, checked below)
            ConfigParser.load_config_file(str(cfg))
        except Exception as e:  # noqa: BLE001 - reported, not raised
            problems.append(f"{cfg.name} does not parse: {e}")
    if (root / "configs/demo.json").is_file() and not problems:
        try:
            stages = demo_stages(root)
        except BreastGenError as e:
            return [*problems, str(e)]
        for stage in stages:
            files = list(stage["configs"]) if "demo.json" in stage["configs"] else [*stage["configs"], "demo.json"]
            try:
                parser = ConfigParser()
                parser.read_config([str(root / "configs" / f) for f in files])
            except Exception as e:  # noqa: BLE001
                problems.append(f"demo stage {stage.get('name')!r} ({' + '.join(files)}) does not merge: {e}")
                continue
            missing = [k for k in ("bundle_root", "output_dir") if k not in parser.config]
            if missing:
                problems.append(f"demo stage {stage.get('name')!r} lacks {', '.join(missing)}")
    return problems


def demo_stages(bundle_dir: str | Path) -> list[dict]:
    demo = Path(bundle_dir) / "configs" / "demo.json"
    stages = json.loads(demo.read_text(encoding="utf-8")).get("demo_stages")
    if not stages:
        raise BreastGenError("demo.json has no 'demo_stages' list", demo)
    return stages


def demo_requires(bundle_dir: str | Path) -> dict[str, str]:
    """``demo.json``'s ``demo_requires``: config key -> name of a bundle whose demo output that key points to
    (e.g. ``{"text2image_dir": "mammo_ldm_text2image"}``: the inpainting demo reuses the text-to-image models)."""
    demo = Path(bundle_dir) / "configs" / "demo.json"
    return dict(json.loads(demo.read_text(encoding="utf-8")).get("demo_requires") or {})


def run_configs(bundle_dir: str | Path, configs: Sequence[str], overrides: dict[str, Any] | None = None,
                workflow_type: str = "train") -> dict:
    """Run configs of a bundle in-process, like ``python -m monai.bundle run --config_file [...]``.

    ``configs`` are names inside ``configs/`` (or paths); later files override earlier ones. Returns the
    workflow's parsed config values for ``output_dir`` and ``bundle_root``.
    """
    from monai.bundle import ConfigWorkflow

    root = Path(bundle_dir).resolve()
    files = [str(c if Path(c).is_absolute() else root / "configs" / c) for c in configs]
    overrides = {"bundle_root": str(root), **(overrides or {})}
    wf = ConfigWorkflow(config_file=files, meta_file=str(root / "configs" / "metadata.json"),
                        logging_file=str(root / "configs" / "logging.conf"), workflow_type=workflow_type, **overrides)
    wf.initialize()
    try:
        wf.run()
    finally:
        wf.finalize()
    return {"output_dir": wf.parser.get_parsed_content("output_dir", default=None)}


def run_demo(bundle_dir: str | Path, data_dir: str | Path, output_dir: str | Path,
             stages: Sequence[str] | None = None, extra_overrides: dict[str, Any] | None = None) -> list[dict]:
    """Run a bundle's demo stages (tiny train -> infer -> evaluate) with demo.json overlaid; returns timings."""
    root = Path(bundle_dir).resolve()
    overrides = {"data_dir": str(Path(data_dir).resolve()), "output_dir": str(Path(output_dir).resolve()),
                 **(extra_overrides or {})}
    for key, name in demo_requires(root).items():  # by default the sibling folder, as `make demo` lays them out
        required = Path(overrides.get(key) or Path(output_dir).resolve().parent / name)
        if not (required / "metrics.json").is_file():
            raise BreastGenError(f"the {root.name} demo needs the {name} demo first (no metrics.json in {required})")
        overrides[key] = str(required)
    done = []
    for stage in demo_stages(root):
        if stages is not None and stage["name"] not in stages:
            continue
        t0 = time.perf_counter()
        configs = list(stage["configs"]) if "demo.json" in stage["configs"] else [*stage["configs"], "demo.json"]
        run_configs(root, configs, overrides,
                    workflow_type="infer" if stage["name"] != "train" and not stage["name"].startswith("train")
                    else "train")
        done.append({"stage": stage["name"], "seconds": round(time.perf_counter() - t0, 1)})
        logger.info("%s: stage %s done in %.1f s", root.name, stage["name"], done[-1]["seconds"])
    return done


@main_guard
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m breastgen.bundle", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate bundle folders (metadata schema, files, configs)")
    c.add_argument("bundles", nargs="+")
    d = sub.add_parser("demo", help="run a bundle's demo stages")
    d.add_argument("bundle")
    d.add_argument("--data", default="demo_data")
    d.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "check":
        bad = {b: check_bundle(b) for b in args.bundles}
        bad = {b: p for b, p in bad.items() if p}
        if bad:
            raise BreastGenError("; ".join(f"{b}: {', '.join(p)}" for b, p in bad.items()))
        print(f"ok: {len(args.bundles)} bundle(s) valid")
    else:
        out = args.out or f"demo_out/{Path(args.bundle).name}"
        rows = run_demo(args.bundle, args.data, out)
        atomic_write_json(Path(out) / "demo_stages.json", rows)
        for row in rows:
            print(f"{row['stage']}: {row['seconds']} s")


if __name__ == "__main__":
    main()
