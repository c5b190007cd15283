#!/usr/bin/env python
"""Synthetic-fraction experiment (the seed's Figure 4) in one command: an EfficientNet trained on the real atypia
tiles plus k % synthetic tiles from the class-conditional DDPM, for k from 0 to 80, several seeds, the same
training budget (optimizer steps x batch size) for every run; a CSV and a plot of accuracy / macro-F1 / AUC
versus k with 95 % confidence intervals -- whatever they show.

    # demo phantoms, tiny settings (trains the demo generator first; minutes on a CPU)
    python scripts/synthetic_fraction_experiment.py --data demo_data/histo/atypia/datalist.json \\
        --out runs/fraction_demo --preset demo
    # prepared MITOS-ATYPIA-14 tiles with a trained generator (GPU)
    python scripts/synthetic_fraction_experiment.py --data /data/mitos_tiles/datalist.json --out runs/fraction \\
        --generator runs/histo_ddpm/models/classcond.pt --fractions 0 10 20 30 40 50 60 70 80 --seeds 0 1 2 3 4

``--mode add`` (default): all real training tiles plus n_syn = n_real * k / (100 - k) synthetic tiles, so that
synthetic tiles are k % of the training set. ``--mode replace``: the training set keeps n_real tiles, k % of them
synthetic. Synthetic tiles follow the real class proportions; the pool is generated once (for the largest k) and
each run takes a seeded, class-stratified subset of it. Everything runs through the bundle's configs
(``train.json`` + ``train_classcond.json`` / ``inference.json`` for the generator, ``train_classifier.json`` +
``evaluate_classifier.json`` for the classifier; ``--preset demo`` overlays ``demo.json``). Each run writes into
``<out>/runs/k<k>/seed<s>`` and is skipped when its metrics exist, so re-running continues an interrupted
experiment.

Outputs: ``runs.csv`` (one row per k and seed, with bootstrap CIs over the test tiles), ``results.csv`` (per k:
mean and t-interval half-width over seeds), ``fraction.png`` (three panels), ``experiment.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from breastgen.errors import BreastGenError, main_guard  # noqa: E402

BUNDLE = ROOT / "bundles" / "histo_ddpm_atypia"
METRICS = ("accuracy", "macro_f1", "auc")
LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "auc": "AUC (one-vs-rest)"}
PRESETS = {
    "full": dict(fractions=[0, 10, 20, 30, 40, 50, 60, 70, 80], seeds=[0, 1, 2], iterations=None),
    "demo": dict(fractions=[0, 40, 80], seeds=[0, 1], iterations=None),
}
logger = logging.getLogger("synthetic_fraction_experiment")


def n_synthetic(n_real: int, k: float, mode: str) -> int:
    if mode == "add":
        return int(round(n_real * k / (100.0 - k)))
    return int(round(n_real * k / 100.0))


def stratified_take(items: list[dict], n: int, proportions: dict[int, float], seed: int) -> list[dict]:
    """``n`` items following the class ``proportions`` (largest remainders), seeded shuffle within each class."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[dict]] = defaultdict(list)
    for it in items:
        by_class[int(it["label"])].append(it)
    raw = {c: n * p for c, p in proportions.items()}
    counts = {c: int(math.floor(v)) for c, v in raw.items()}
    for c in sorted(raw, key=lambda c: raw[c] - counts[c], reverse=True)[: n - sum(counts.values())]:
        counts[c] += 1
    out = []
    for c, k in sorted(counts.items()):
        pool = list(by_class.get(c, []))
        if k > len(pool):
            raise BreastGenError(f"synthetic pool has {len(pool)} tiles of class {c}, {k} needed")
        order = rng.permutation(len(pool))
        out += [pool[i] for i in order[:k]]
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="atypia datalist (training / validation / test)")
    ap.add_argument("--out", type=Path, required=True, help="experiment folder")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full",
                    help="full: the bundle's full-size settings; demo: tiny networks on 32 px tiles (demo.json)")
    ap.add_argument("--generator", type=Path, default=None,
                    help="trained class-conditional checkpoint (classcond.pt); trained first when not given")
    ap.add_argument("--fractions", type=float, nargs="+", default=None, help="synthetic percentages k (0 <= k < 100)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--mode", choices=("add", "replace"), default="add")
    ap.add_argument("--iterations", type=int, default=None, help="classifier optimizer steps (the budget)")
    ap.add_argument("--eval-sections", nargs="+", default=["test"], help="datalist sections to evaluate on")
    ap.add_argument("--guidance-scale", type=float, default=None, help="CFG scale of the synthetic tiles")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per run (0: none)")
    return ap.parse_args(argv)


def run(configs: list[str], overrides: dict, demo: bool, workflow: str) -> None:
    from breastgen.bundle import run_configs

    run_configs(BUNDLE, [*configs, *(["demo.json"] if demo else [])], overrides, workflow_type=workflow)


def plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from breastgen.io.atomic import atomic_path

    ks = [t["k"] for t in table]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=100)
    for ax, m in zip(axes, METRICS):
        mean = np.array([t[f"{m}_mean"] for t in table], dtype=float)
        half = np.array([t[f"{m}_ci95"] for t in table], dtype=float)
        half = np.where(np.isfinite(half), half, 0.0)
        # the metrics live in [0, 1]: draw the interval clipped to it (the CSV keeps the raw half-width)
        yerr = np.stack([np.minimum(half, mean), np.minimum(half, 1.0 - mean)])
        ax.errorbar(ks, mean, yerr=np.clip(yerr, 0.0, None), marker="o", capsize=4)
        for k, v in zip(ks, mean):
            ax.annotate(f"{v:.2f}", (k, v), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
        ax.set(xlabel="synthetic share of the training set k (%)", ylabel=LABELS[m], title=LABELS[m])
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_csv(path: Path, rows: list[dict]) -> None:
    from breastgen.io import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


@main_guard
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from breastgen.data.datalists import load_datalist, write_datalist
    from breastgen.io import atomic_write_json
    from breastgen.metrics.classification import t_interval

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    preset, demo = PRESETS[args.preset], args.preset == "demo"
    fractions = sorted({int(k) if float(k).is_integer() else float(k)
                        for k in (args.fractions if args.fractions is not None else preset["fractions"])})
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    # --- check everything before any work
    if any(not 0 <= k < 100 for k in fractions):
        raise BreastGenError(f"--fractions must lie in [0, 100), got {fractions}")
    if len(set(seeds)) != len(seeds):
        raise BreastGenError(f"--seeds repeats a seed: {seeds}")
    if args.iterations is not None and args.iterations < 1:
        raise BreastGenError(f"--iterations must be >= 1, got {args.iterations}")
    if args.generator is not None and not args.generator.is_file():
        raise BreastGenError("generator checkpoint not found", args.generator)
    if args.out.exists() and not args.out.is_dir():
        raise BreastGenError("--out exists and is not a folder", args.out)
    real = load_datalist(args.data, "training")
    for s in args.eval_sections:
        load_datalist(args.data, s)
    if not real:
        raise BreastGenError("the datalist has no training tile", args.data)
    labels = [int(e["label"]) for e in real]
    counts = {c: labels.count(c) for c in sorted(set(labels))}
    proportions = {c: n / len(labels) for c, n in counts.items()}
    out = args.out.resolve()
    data_dir = str(args.data.resolve().parent)
    common = {"data_dir": data_dir, "datalist_file": str(args.data.resolve())}
    if args.guidance_scale is not None:
        common["guidance_scale"] = float(args.guidance_scale)
    t0 = time.perf_counter()

    # --- 1. generator
    gen_dir = out / "generator"
    ckpt = args.generator.resolve() if args.generator else gen_dir / "models" / "classcond.pt"
    if args.generator is None and not ckpt.is_file():
        logger.info("training the class-conditional generator (%s)", gen_dir)
        run(["train.json", "train_classcond.json"], {**common, "output_dir": str(gen_dir)}, demo, "train")

    # --- 2. synthetic pool (largest k), class proportions of the real set
    n_max = max(n_synthetic(len(real), k, args.mode) for k in fractions)
    pool_dir = out / "synthetic"
    pool: list[dict] = []
    if n_max:
        per_class = {c: int(math.ceil(n_max * p)) + 1 for c, p in proportions.items()}
        manifest_file = pool_dir / "manifest.json"
        have = json.loads(manifest_file.read_text()) if manifest_file.is_file() else []
        if sorted(r["class"] for r in have) != sorted(c for c, n in per_class.items() for _ in range(n)):
            if pool_dir.exists():
                shutil.rmtree(pool_dir)
            logger.info("generating %d synthetic tiles %s", sum(per_class.values()), per_class)
            run(["train.json", "inference.json"],
                {**common, "output_dir": str(out), "generated_dir": str(pool_dir), "classcond_ckpt": str(ckpt),
                 "generate": ["classcond"], "num_samples": 1,
                 "classes": [c for c, n in sorted(per_class.items()) for _ in range(n)], "seed": 1000},
                demo, "infer")
            have = json.loads(manifest_file.read_text())
        pool = [{"image": r["file"], "label": int(r["class"]), "synthetic": True} for r in have]

    # --- 3. classifier runs
    rows = []
    val = load_datalist(args.data, "validation")
    for k in fractions:
        for seed in seeds:
            run_dir = out / "runs" / f"k{k:g}" / f"seed{seed}"
            n_syn = n_synthetic(len(real), k, args.mode)
            if args.mode == "add":
                real_part = real
            else:
                real_part = stratified_take([dict(e) for e in real], len(real) - n_syn, proportions, seed)
            syn_part = stratified_take(pool, n_syn, proportions, seed) if n_syn else []
            metrics_file = run_dir / "classifier" / "metrics.json"
            if not metrics_file.is_file():
                train_list = write_datalist(run_dir / "train_datalist.json",
                                            {"training": [*real_part, *syn_part], "validation": val})
                over = {**common, "output_dir": str(run_dir), "classifier_datalist_file": str(train_list),
                        "seed": int(seed), "classifier_eval_sections": list(args.eval_sections),
                        "classifier_boot": int(args.bootstrap)}
                if args.iterations is not None:
                    over["classifier_iterations"] = int(args.iterations)
                logger.info("k = %g %%, seed %d: %d real + %d synthetic", k, seed, len(real_part), n_syn)
                run(["train.json", "train_classifier.json"], over, demo, "train")
                run(["train.json", "train_classifier.json", "evaluate_classifier.json"], over, demo, "infer")
            m = json.loads(metrics_file.read_text(encoding="utf-8"))
            rows.append({"k": k, "seed": seed, "mode": args.mode, "n_real": len(real_part), "n_synthetic": n_syn,
                         "n_test": m["n"], **{key: m.get(key, float("nan")) for key in
                                              [x for mm in METRICS for x in (mm, f"{mm}_ci_low", f"{mm}_ci_high")]}})

    # --- 4. table, plot
    table = []
    for k in fractions:
        r = [row for row in rows if row["k"] == k]
        entry = {"k": k, "n_seeds": len(r), "n_real": r[0]["n_real"], "n_synthetic": r[0]["n_synthetic"]}
        for m in METRICS:
            entry[f"{m}_mean"], entry[f"{m}_ci95"] = t_interval([float(x[m]) for x in r])
        table.append(entry)
    write_csv(out / "runs.csv", rows)
    write_csv(out / "results.csv", table)
    title = (f"EfficientNet on real + k % synthetic tiles ({args.mode}), mean and 95 % t-interval over seeds "
             f"{seeds}; test: {'+'.join(args.eval_sections)}; preset {args.preset}")
    plot(table, out / "fraction.png", title)
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "generator": str(ckpt), "n_real": len(real), "class_counts": counts, "pool": len(pool),
              "results": table, "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(out / "experiment.json", result)
    for t in table:
        print(f"k = {t['k']:>4g} %  n_syn = {t['n_synthetic']:>5d}  " + "  ".join(
            f"{m} {t[f'{m}_mean']:.3f} ± {t[f'{m}_ci95']:.3f}" for m in METRICS))
    print(f"wrote {out / 'results.csv'}, {out / 'runs.csv'}, {out / 'fraction.png'} in "
          f"{time.perf_counter() - t0:.0f} s")
    return result


if __name__ == "__main__":
    main()
