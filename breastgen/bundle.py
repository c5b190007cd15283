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
* ``demo.json``'s ``network_checks`` names each network the bundle ships and how it is called, in terms of the
  metadata's ``network_data_format`` (what MONAI's ``verify_net_in_out`` / ``ckpt_export`` do for a one-input
  network, :func:`verify_network` / :func:`export_network` do for several inputs)::

      {"name": "unet", "configs": ["train.json"], "net_id": "network_def",
       "inputs": {"x": "latent", "timesteps": "timesteps", "context": "context"}, "output": "pred",
       "method": null, "checkpoint": "models/diffusion.pt", "key_in_ckpt": "network",
       "demo_meta": {"latent": {"num_channels": 3}, "pred": {"num_channels": 3}}}

  An input may list several metadata entries (concatenated on the channel axis); ``method`` calls e.g.
  ``net.embed`` instead of ``net``; ``checkpoint`` (under ``output_dir``) and ``key_in_ckpt`` say where training
  leaves the weights; ``demo_meta`` patches the metadata entries for the tiny demo network.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import BreastGenError, main_guard
from .io import atomic_write_json

__all__ = ["SCHEMA_PATH", "REQUIRED_FILES", "validate_metadata", "check_bundle", "demo_stages", "demo_requires", "run_configs",
           "run_demo", "network_checks", "example_inputs", "build_network", "network_callable",
           "verify_network", "export_network"]

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
        problems += _network_check_problems(root)
    return problems


def _network_check_problems(root: Path) -> list[str]:
    checks = network_checks(root)
    if not checks:
        return ["demo.json has no 'network_checks' list"]
    fmt = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))["network_data_format"]
    problems = []
    for check in checks:
        name = check.get("name", "?")
        problems += [f"network check {name!r}: no configs/{f}" for f in check.get("configs", [])
                     if not (root / "configs" / f).is_file()]
        if not check.get("configs") or not check.get("inputs") or not check.get("output"):
            problems.append(f"network check {name!r} needs 'configs', 'inputs' and 'output'")
            continue
        used = [n for v in check["inputs"].values() for n in ([v] if isinstance(v, str) else v)]
        problems += [f"network check {name!r}: {n!r} is not a metadata input" for n in used if n not in fmt["inputs"]]
        if check["output"] not in fmt["outputs"]:
            problems.append(f"network check {name!r}: {check['output']!r} is not a metadata output")
        problems += [f"network check {name!r}: demo_meta names unknown entry {n!r}" for n in check.get("demo_meta", {})
                     if n not in fmt["inputs"] and n not in fmt["outputs"]]
    return problems


def _demo_json(bundle_dir: str | Path) -> dict:
    """A bundle's ``configs/demo.json``; a missing or unreadable file is a one-line error."""
    demo = Path(bundle_dir) / "configs" / "demo.json"
    try:
        return json.loads(demo.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BreastGenError("no such file: is this a bundle folder?", demo) from None
    except (OSError, ValueError) as e:
        raise BreastGenError(f"cannot read ({e})", demo) from None


def demo_stages(bundle_dir: str | Path) -> list[dict]:
    stages = _demo_json(bundle_dir).get("demo_stages")
    if not stages:
        raise BreastGenError("demo.json has no 'demo_stages' list", Path(bundle_dir) / "configs" / "demo.json")
    return stages


def demo_requires(bundle_dir: str | Path) -> dict[str, str]:
    """``demo.json``'s ``demo_requires``: config key -> name of a bundle whose demo output that key points to
    (e.g. ``{"text2image_dir": "mammo_ldm_text2image"}``: the inpainting demo reuses the text-to-image models)."""
    return dict(_demo_json(bundle_dir).get("demo_requires") or {})


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


def network_checks(bundle_dir: str | Path) -> list[dict]:
    """``demo.json``'s ``network_checks`` (see the module docstring)."""
    return list(_demo_json(bundle_dir).get("network_checks") or [])


def _find_check(bundle_dir: str | Path, check: dict | str) -> dict:
    if isinstance(check, dict):
        return check
    checks = {c["name"]: c for c in network_checks(bundle_dir)}
    if check not in checks:
        raise BreastGenError(f"no network {check!r}; this bundle has: {', '.join(checks) or 'none'}", bundle_dir)
    return checks[check]


def _data_format(parser, check: dict, demo: bool) -> dict:
    """The parsed metadata's ``network_data_format``, patched by the check's ``demo_meta`` for the demo network."""
    fmt = copy.deepcopy(parser.get("_meta_#network_data_format"))
    for name, patch in (check.get("demo_meta") or {}).items() if demo else ():
        (fmt["inputs"].get(name) or fmt["outputs"][name]).update(patch)
    return fmt


def _tensor_shape(entry: dict, batch: int) -> tuple[int, ...]:
    """Images are (B, C, *spatial); other tensors (B, [C if > 1], [*spatial unless [1]]): timesteps and labels
    (B,), token ids (B, L), class scores (B, C), an embedding (B, D)."""
    c, spatial = int(entry["num_channels"]), [int(s) for s in entry["spatial_shape"]]
    if entry.get("type") == "image":
        return (batch, c, *spatial)
    return (batch, *([c] if c > 1 else []), *([] if spatial == [1] else spatial))


def example_inputs(data_format: dict, check: dict, batch: int = 1, seed: int = 0) -> dict:
    """Random keyword inputs for a network check: uniform in each entry's ``value_range`` (floats in [0, 1) and
    integers 0 when it has none), metadata entries listed together concatenated on the channel axis."""
    import torch
    from monai.utils import get_equivalent_dtype

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for arg, names in check["inputs"].items():
        parts = []
        for name in [names] if isinstance(names, str) else names:
            entry = data_format["inputs"][name]
            shape, dtype = _tensor_shape(entry, batch), get_equivalent_dtype(entry["dtype"], torch.Tensor)
            lo, hi = (entry.get("value_range") or [None, None])[:2]
            if dtype.is_floating_point:
                t = torch.rand(shape, generator=gen, dtype=dtype)
                parts.append(t if lo is None else lo + (hi - lo) * t)
            else:
                parts.append(torch.randint(int(lo or 0), int(hi or 0) + 1, shape, generator=gen, dtype=dtype))
        out[arg] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out


def build_network(bundle_dir: str | Path, check: dict | str, demo: bool = False, overlays: Sequence[str] = ()):
    """(network on the CPU in eval mode, its ConfigParser, the check, its data format): the network a check
    names, full size from the check's configs, or the demo network with ``demo.json`` overlaid. ``overlays``
    (names in ``configs/`` or paths, e.g. a variant such as ``attention.json``) come after the check's configs."""
    from monai.bundle import ConfigParser

    root = Path(bundle_dir).resolve()
    check = _find_check(root, check)
    files = [str(root / "configs" / f) for f in [*check["configs"], *overlays, *(["demo.json"] if demo else [])]]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise BreastGenError("no such config file", missing[0])
    parser = ConfigParser()
    parser.read_config(files)
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser["bundle_root"] = str(root)
    net = parser.get_parsed_content(check.get("net_id", "network_def")).to("cpu").eval()
    return net, parser, check, _data_format(parser, check, demo)


def network_callable(net, check: dict):
    """What a check calls: the network itself, or its ``method`` (e.g. ``net.embed``)."""
    return getattr(net, check["method"]) if check.get("method") else net


def verify_network(bundle_dir: str | Path, check: dict | str, demo: bool = False, batch: int = 1,
                   overlays: Sequence[str] = ()) -> dict:
    """Like MONAI's ``verify_net_in_out`` for networks with several inputs: build the network, call it on random
    inputs shaped by the metadata, and require the output shape and dtype the metadata declares (and finite
    values). Returns the input and output shapes; raises :class:`BreastGenError` naming the mismatch."""
    from monai.utils import get_equivalent_dtype
    import torch

    net, _, check, fmt = build_network(bundle_dir, check, demo, overlays)
    inputs = example_inputs(fmt, check, batch)
    with torch.no_grad():
        out = network_callable(net, check)(**inputs)
    where = f"{Path(bundle_dir).name} network {check['name']!r}"
    if not isinstance(out, torch.Tensor):
        raise BreastGenError(f"{where} returns {type(out).__name__}, not a tensor")
    entry = fmt["outputs"][check["output"]]
    want, dtype = _tensor_shape(entry, batch), get_equivalent_dtype(entry["dtype"], torch.Tensor)
    if tuple(out.shape) != want or out.dtype != dtype:
        raise BreastGenError(f"{where} returns {tuple(out.shape)} {out.dtype}; the metadata output "
                             f"{check['output']!r} says {want} {dtype}")
    if not torch.isfinite(out).all():
        raise BreastGenError(f"{where} returns non-finite values")
    return {"inputs": {k: tuple(v.shape) for k, v in inputs.items()}, "output": tuple(out.shape)}


def export_network(bundle_dir: str | Path, check: dict | str, ckpt_file: str | Path, filepath: str | Path,
                   demo: bool = False, overlays: Sequence[str] = ()) -> Path:
    """Like MONAI's ``ckpt_export`` for networks with several inputs: load ``ckpt_file`` (``weights_only``) into
    the network, trace it on metadata-shaped inputs (positional, in the check's ``inputs`` order), check the
    traced module against the eager one and write a TorchScript file holding the metadata and the configs."""
    from .engines.checkpoints import load_checkpoint
    from .networks.export import export_torchscript

    net, parser, check, fmt = build_network(bundle_dir, check, demo, overlays)
    load_checkpoint(ckpt_file, {check.get("key_in_ckpt", "model"): net})
    meta = {**parser.get("_meta_"), "network_data_format": fmt}
    config = {k: v for k, v in parser.get().items() if k != "_meta_"}
    return export_torchscript(net, example_inputs(fmt, check), filepath, method=check.get("method"), meta=meta,
                              extra_files={"config.json": json.dumps(config, default=str),
                                           "network_check.json": json.dumps(check)})


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
    v = sub.add_parser("verify", help="check every network's inputs and outputs against the metadata")
    v.add_argument("bundle")
    v.add_argument("--demo", action="store_true", help="the tiny demo networks (configs + demo.json)")
    v.add_argument("--overlay", action="append", default=[], help="a variant config after the network's configs")
    e = sub.add_parser("export", help="export a trained network to TorchScript (metadata and configs inside)")
    e.add_argument("bundle")
    e.add_argument("--network", required=True, help="a name from demo.json's network_checks")
    e.add_argument("--ckpt", required=True, help="checkpoint file (state dict, or a dict holding it)")
    e.add_argument("--out", required=True, help="TorchScript file to write")
    e.add_argument("--demo", action="store_true", help="the checkpoint is a demo network's")
    e.add_argument("--overlay", action="append", default=[],
                   help="a variant config the network was trained with (e.g. attention.json); repeatable")
    args = ap.parse_args(argv)
    if args.cmd == "check":
        bad = {b: check_bundle(b) for b in args.bundles}
        bad = {b: p for b, p in bad.items() if p}
        if bad:
            raise BreastGenError("; ".join(f"{b}: {', '.join(p)}" for b, p in bad.items()))
        print(f"ok: {len(args.bundles)} bundle(s) valid")
    elif args.cmd == "verify":
        for check in network_checks(args.bundle):
            shapes = verify_network(args.bundle, check, demo=args.demo, overlays=args.overlay)
            ins = ", ".join(f"{k} {tuple(s)}" for k, s in shapes["inputs"].items())
            print(f"{check['name']}: {ins} -> {tuple(shapes['output'])} as in the metadata")
    elif args.cmd == "export":
        if not Path(args.ckpt).is_file():
            raise BreastGenError("no such checkpoint", args.ckpt)
        print(export_network(args.bundle, args.network, args.ckpt, args.out, demo=args.demo, overlays=args.overlay))
    else:
        out = args.out or f"demo_out/{Path(args.bundle).name}"
        rows = run_demo(args.bundle, args.data, out)
        atomic_write_json(Path(out) / "demo_stages.json", rows)
        for row in rows:
            print(f"{row['stage']}: {row['seconds']} s")


if __name__ == "__main__":
    main()
