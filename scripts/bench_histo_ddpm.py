#!/usr/bin/env python
"""Benchmark of bundles/histo_ddpm_atypia's samplers on the demo model: DDIM (50 steps) versus DDPM (all 1000
training steps), seconds per tile (wall and CPU) and FID against the real demo tiles, same seeds and classes.

    OMP_NUM_THREADS=1 python scripts/bench_histo_ddpm.py --data demo_data --model demo_out/histo_ddpm_atypia \\
        [--tiles 12] [--write docs/benchmarks.md]

``--model`` is a folder holding ``models/classcond.pt`` (the demo's output); without it the demo's class-conditional
stage is trained first into ``--work``. The figures go into the ``bench_histo_ddpm`` block of ``--write``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from breastgen.errors import BreastGenError, main_guard  # noqa: E402

BUNDLE = ROOT / "bundles" / "histo_ddpm_atypia"
NAME = "bench_histo_ddpm"  # its block in docs/benchmarks.md


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="demo data folder (scripts/make_demo_data.py)")
    ap.add_argument("--model", type=Path, default=None, help="demo output folder with models/classcond.pt")
    ap.add_argument("--work", type=Path, default=Path("demo_out/bench_histo_ddpm"),
                    help="where to train the demo model when --model is not given")
    ap.add_argument("--tiles", type=int, default=12, help="tiles per sampler (classes in turn)")
    ap.add_argument("--ddim-steps", type=int, nargs="+", default=[50, 25])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", type=Path, default=None, help="markdown file whose bench_histo_ddpm block is replaced")
    return ap.parse_args(argv)


@main_guard
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from monai.bundle import ConfigParser

    from breastgen.bundle import run_configs
    from breastgen.engines.perf import write_doc_block
    from breastgen.metrics import InceptionFeatures, frechet_distance

    if args.tiles < 2:
        raise BreastGenError(f"--tiles must be >= 2 (FID needs two images), got {args.tiles}")
    datalist = args.data / "histo" / "atypia" / "datalist.json"
    if not datalist.is_file():
        raise BreastGenError("demo atypia datalist not found (run scripts/make_demo_data.py)", datalist)
    load = os.getloadavg()
    model_dir = args.model
    if model_dir is None:
        model_dir = args.work
        if not (model_dir / "models" / "classcond.pt").is_file():
            print(f"training the demo class-conditional model into {model_dir}")
            run_configs(BUNDLE, ["train.json", "train_classcond.json", "demo.json"],
                        {"data_dir": str(args.data.resolve()), "output_dir": str(model_dir.resolve())})
    if not (model_dir / "models" / "classcond.pt").is_file():
        raise BreastGenError("no models/classcond.pt (run the demo first, or omit --model)", model_dir)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in ("train.json", "inference.json", "evaluate.json",
                                                              "demo.json")])
    parser.update({"bundle_root": str(BUNDLE), "data_dir": str(args.data.resolve()),
                   "output_dir": str(model_dir.resolve()), "generate": ["classcond"],
                   "fid_sections": ["training", "validation", "test"]})
    pipe = parser.get_parsed_content("classcond_pipeline")
    guidance = float(parser.get_parsed_content("guidance_scale"))
    reference = parser.get_parsed_content("fid_reference")
    real = torch.stack([(torch.as_tensor(r["image"]).float() + 1) / 2 for r in reference]).clamp(0, 1)
    ext = InceptionFeatures(batch_size=16)
    real_feats = ext(real)
    labels = [k % pipe.num_classes for k in range(args.tiles)]
    seeds = [args.seed + k for k in range(args.tiles)]
    T = int(pipe.schedule["num_train_timesteps"])
    rows = []
    for sampler, steps in [("ddim", s) for s in args.ddim_steps] + [("ddpm", T)]:
        torch.manual_seed(0)
        t0, c0 = time.perf_counter(), time.process_time()
        tiles = pipe.sample(seeds, labels, None, sampler, steps, guidance)
        wall, cpu = (time.perf_counter() - t0) / args.tiles, (time.process_time() - c0) / args.tiles
        feats = ext(tiles)
        rows.append({"sampler": sampler.upper(), "steps": steps, "wall": wall, "cpu": cpu,
                     "fid": frechet_distance(feats, real_feats)})
        print(f"{sampler}-{steps}: {wall:.3f} s/tile wall, {cpu:.3f} s/tile CPU, FID {rows[-1]['fid']:.1f}")
    ddpm = rows[-1]
    lines = [
        "### Histology DDPM samplers (`scripts/bench_histo_ddpm.py`)",
        "",
        f"Demo class-conditional model of `bundles/histo_ddpm_atypia` (32 x 32 RGB tiles, DiffusionModelUNet channels "
        f"16/32/32, x0 prediction, EMA weights, guidance scale {guidance:g}); {args.tiles} tiles per sampler in one "
        f"batch, classes in turn, the same seeds for every sampler. FID against all {len(reference)} real demo tiles "
        "(offline TF-Inception, exact Frechet distance); with this few tiles FID is dominated by its small-sample "
        "bias -- compare the samplers with each other, not with published figures.",
        "",
        "| sampler | steps | s / tile (wall) | s / tile (CPU) | speed-up vs DDPM | FID |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['wall']:.3f} | {r['cpu']:.3f} | "
                     f"{ddpm['cpu'] / r['cpu']:.0f}x | {r['fid']:.1f} |")
    lines += ["", f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} (torch threads "
                  f"{torch.get_num_threads()}), {platform.machine()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}, torch {torch.__version__}. Shared machine: load average "
                  f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the start, so wall times are pessimistic; CPU "
                  "times are the process's own. Command: `OMP_NUM_THREADS=1 python scripts/bench_histo_ddpm.py "
                  "--data demo_data --model demo_out/histo_ddpm_atypia --write docs/benchmarks.md`."]
    block = "\n".join(lines)
    print(block)
    if args.write:
        write_doc_block(args.write, NAME, block)
        print(f"wrote the {NAME} block of {args.write}")
    return {"rows": rows, "load": load}


if __name__ == "__main__":
    main()
