#!/usr/bin/env python
"""The ciGAN augmentation experiment (seed paper, Table 1) in one command: four classifier arms, several seeds,
mean +- 95% CI of accuracy / recall / AUC, a CSV table and a ROC plot.

Arms (cumulative, as in the paper): shallow CNN; ResNet-50; ResNet-50 + traditional augmentation (h-flip,
rotation <= 30 deg, zoom 0.75-1.25); ResNet-50 + traditional augmentation + ciGAN images, where the trained
ciGAN infills lesions into normal training patches until the task's classes are balanced.

    # demo phantoms (tiny settings, minutes on a CPU)
    python scripts/augmentation_experiment.py --data demo_data/mammo/datalist.json --out runs/aug_demo --preset demo
    # CBIS-DDSM patches made by scripts/extract_patches.py (paper settings; needs a GPU)
    python scripts/augmentation_experiment.py --patches /data/cbis_patches/datalist.json --out runs/aug \\
        --seeds 0 1 2 3 4 --pretrained /weights/resnet50_imagenet.pt

Everything runs through the bundles' configs (bundles/mammo_cigan_infill, bundles/mammo_patch_classifier) with
overrides; ``--preset demo`` overlays their demo.json. Each run writes into ``<out>/runs/<arm>/seed<k>`` and is
skipped when its metrics exist (re-running continues an interrupted experiment). Outputs: ``runs.csv`` (one row
per arm and seed), ``results.csv`` and ``results.md`` (the 4-row table with the paper's figures), ``roc.png``,
``experiment.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from breastgen.errors import BreastGenError, main_guard  # noqa: E402
from breastgen.metrics.classification import t_interval  # noqa: E402

CIGAN = ROOT / "bundles" / "mammo_cigan_infill"
CLASSIFIER = ROOT / "bundles" / "mammo_patch_classifier"
ARMS = ("shallow_cnn", "resnet50", "resnet50_aug", "resnet50_aug_cigan")
LABELS = {"shallow_cnn": "Shallow CNN", "resnet50": "ResNet-50", "resnet50_aug": "ResNet-50 + traditional aug.",
          "resnet50_aug_cigan": "ResNet-50 + traditional aug. + ciGAN images"}
# Wu et al. 2018, Table 1 (CBIS-DDSM patches): accuracy, recall, AUC
PAPER = {"shallow_cnn": (0.573, 0.448, 0.549), "resnet50": (0.602, 0.558, 0.594),
         "resnet50_aug": (0.671, 0.642, 0.667), "resnet50_aug_cigan": (0.761, 0.615, 0.716)}
METRICS = ("accuracy", "recall", "auc")
PRESETS = {  # patch extraction, classifier and ciGAN settings per preset
    "full": dict(size=256, stride=128, max_normal=None, eval_sections=["test"], widen=1.0),
    "demo": dict(size=64, stride=16, max_normal=8, eval_sections=["validation", "test"], widen=0.125),
}
logger = logging.getLogger("augmentation_experiment")


def fmt(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"


def network_def(arm: str, widen: float, pretrained: str | None) -> dict:
    if arm == "shallow_cnn":
        return {"_target_": "breastgen.networks.classifiers.ShallowCNN", "num_classes": "@num_classes"}
    return {"_target_": "breastgen.networks.classifiers.resnet50_classifier", "num_classes": "@num_classes",
            "widen_factor": widen, "pretrained_path": pretrained}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--patches", type=Path, help="patch datalist (scripts/extract_patches.py output)")
    src.add_argument("--data", type=Path, help="mammogram datalist with lesion masks: patches are extracted first")
    ap.add_argument("--out", type=Path, required=True, help="experiment folder")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full",
                    help="full: paper settings; demo: tiny networks / 64 px patches (the bundles' demo.json)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--epochs", type=int, default=None, help="classifier epochs (default: the config's)")
    ap.add_argument("--input-size", type=int, default=None, help="classifier input size (default: 224, demo 64)")
    ap.add_argument("--balanced-sampling", action="store_true", help="class-balanced sampling in every arm")
    ap.add_argument("--pretrained", default=None, help="local ImageNet ResNet-50 state dict (torchvision layout)")
    ap.add_argument("--cigan-ckpt", type=Path, default=None, help="trained ciGAN model.pt (skips ciGAN training)")
    ap.add_argument("--cigan-epochs", type=int, default=None, help="ciGAN epochs (default: the config's)")
    ap.add_argument("--cigan-warmup", type=int, default=None, help="ciGAN warm-up iterations (default: the config's)")
    ap.add_argument("--synthetic-max", type=int, default=None, help="cap on the number of synthetic patches")
    ap.add_argument("--eval-sections", nargs="+", default=None,
                    help="datalist sections to evaluate on (default: test; demo: validation test)")
    return ap.parse_args(argv)


def run(bundle: Path, configs: list[str], overrides: dict, demo: bool, workflow: str) -> None:
    from breastgen.bundle import run_configs

    run_configs(bundle, [*configs, *(["demo.json"] if demo else [])], overrides, workflow_type=workflow)


@main_guard
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from breastgen.data.datalists import load_datalist
    from breastgen.data.patches import ensure_patch_datalist
    from breastgen.engines.cigan import balancing_counts
    from breastgen.io import atomic_write_json, atomic_write_text
    from breastgen.networks.classifiers import roc_points, save_roc_plot

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    preset, demo = PRESETS[args.preset], args.preset == "demo"
    eval_sections = args.eval_sections or preset["eval_sections"]
    # validate inputs before writing anything
    for p, what in ((args.patches, "patch datalist"), (args.data, "mammogram datalist"),
                    (args.cigan_ckpt, "ciGAN checkpoint"), (args.pretrained, "pretrained weights")):
        if p is not None and not Path(p).is_file():
            raise BreastGenError(f"{what} not found", p)
    if args.out.exists() and not args.out.is_dir():
        raise BreastGenError("--out exists and is not a folder", args.out)
    if len(set(args.seeds)) != len(args.seeds):
        raise BreastGenError(f"--seeds repeats a seed: {args.seeds}")
    out = args.out.resolve()
    t0 = time.perf_counter()

    # 1. patches
    if args.patches is not None:
        patches = str(args.patches.resolve())
    else:
        patches = ensure_patch_datalist(args.data.resolve(), out / "patches", size=preset["size"],
                                        stride=preset["stride"], max_normal_per_image=preset["max_normal"])
    train_entries = load_datalist(patches, "training", path_keys=("image", "mask", "breast"))
    for s in eval_sections:
        load_datalist(patches, s, path_keys=("image", "mask", "breast"))
    class_map = {"normal": 0, "benign": 0, "malignant": 1}
    common = {"data_dir": str(Path(patches).parent), "patch_datalist": patches}

    # 2. ciGAN (train unless given) and synthetic patches balancing malignant vs non-malignant
    synthetic, n_synthetic = None, 0
    if "resnet50_aug_cigan" in args.arms:
        cigan_out = out / "cigan"
        ckpt = args.cigan_ckpt.resolve() if args.cigan_ckpt else cigan_out / "models" / "model.pt"
        if args.cigan_ckpt is None and not ckpt.is_file():
            over = {**common, "output_dir": str(cigan_out)}
            if args.cigan_epochs is not None:
                over["max_epochs"] = args.cigan_epochs
            if args.cigan_warmup is not None:
                over["warmup_iterations"] = args.cigan_warmup
            logger.info("training the ciGAN (%s)", cigan_out)
            run(CIGAN, ["train.json"], over, demo, "train")
        counts = balancing_counts(patches, "training", groups=class_map, max_total=args.synthetic_max)
        syn_dir = cigan_out / "synthetic"
        n_synthetic = sum(counts.values())
        if n_synthetic:
            if not (syn_dir / "datalist.json").is_file() or \
                    len(load_datalist(syn_dir / "datalist.json", "training", check_files=False)) != n_synthetic:
                logger.info("synthesising %s", counts)
                run(CIGAN, ["synthesize.json"], {**common, "output_dir": str(cigan_out), "ckpt_path": str(ckpt),
                                                 "synthetic_counts": counts, "synthetic_dir": str(syn_dir)},
                    demo, "infer")
            synthetic = str(syn_dir / "datalist.json")

    # 3. the arms
    rows, curves = [], {}
    for arm in args.arms:
        preds_all: list[tuple[int, float]] = []
        for seed in args.seeds:
            run_dir = out / "runs" / arm / f"seed{seed}"
            over = {**common, "output_dir": str(run_dir), "seed": seed,
                    "network_def": network_def(arm, preset["widen"], args.pretrained),
                    "augment": arm in ("resnet50_aug", "resnet50_aug_cigan"),
                    "synthetic_datalist": synthetic if arm == "resnet50_aug_cigan" else None,
                    "balanced_sampling": bool(args.balanced_sampling), "infer_sections": eval_sections,
                    "class_map": class_map}
            if args.epochs is not None:
                over["max_epochs"] = args.epochs
            if args.input_size is not None:
                over["input_size"] = args.input_size
            if not (run_dir / "metrics.json").is_file():
                logger.info("arm %s seed %d", arm, seed)
                torch.manual_seed(seed)
                run(CLASSIFIER, ["train.json"], over, demo, "train")
                run(CLASSIFIER, ["inference.json"], over, demo, "infer")
                run(CLASSIFIER, ["evaluate.json"], over, demo, "infer")
            m = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
            preds = json.loads((run_dir / "predictions.json").read_text(encoding="utf-8"))
            preds_all += [(class_map[p["label"]], p["probs"][1]) for p in preds]
            rows.append({"arm": arm, "label": LABELS[arm], "seed": seed,
                         "network": "ShallowCNN" if arm == "shallow_cnn" else
                         f"ResNet-50 (MONAI{', widen ' + str(preset['widen']) if preset['widen'] != 1 else ''})",
                         "augment": over["augment"], "n_train_real": len(train_entries),
                         "n_synthetic": n_synthetic if arm == "resnet50_aug_cigan" else 0,
                         **{k: m.get(k, float("nan")) for k in (*METRICS, "specificity", "n")}})
        y, s = zip(*preds_all)
        if len(set(y)) == 2:
            curves[arm] = roc_points(y, s)

    # 4. table
    table = []
    for arm in args.arms:
        r = [row for row in rows if row["arm"] == arm]
        entry = {"arm": arm, "label": LABELS[arm], "n_seeds": len(r)}
        for k in METRICS:
            entry[f"{k}_mean"], entry[f"{k}_ci95"] = t_interval([float(x[k]) for x in r])
        entry.update({f"paper_{k}": v for k, v in zip(METRICS, PAPER[arm])})
        table.append(entry)
    for name, data in (("runs.csv", rows), ("results.csv", table)):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(data[0]))
        w.writeheader()
        w.writerows(data)
        atomic_write_text(out / name, buf.getvalue())
    md = ["| arm | accuracy | recall | AUC | paper (acc / recall / AUC) |", "| --- | --- | --- | --- | --- |"]
    md += [f"| {t['label']} | " + " | ".join(fmt(t[f'{k}_mean'], t[f'{k}_ci95']) for k in METRICS)
           + f" | {t['paper_accuracy']:.3f} / {t['paper_recall']:.3f} / {t['paper_auc']:.3f} |" for t in table]
    text = "\n".join(md) + (f"\n\nmean ± 95% CI over seeds {args.seeds}; task malignant vs non-malignant; "
                            f"evaluated on {' + '.join(eval_sections)}; preset {args.preset}; "
                            f"{n_synthetic} synthetic patches in the ciGAN arm.\n")
    atomic_write_text(out / "results.md", text)
    if curves:
        save_roc_plot({f"{LABELS[a]} (AUC {next(t for t in table if t['arm'] == a)['auc_mean']:.3f})": c
                       for a, c in curves.items()}, out / "roc.png", title="malignant vs non-malignant (pooled seeds)")
    atomic_write_json(out / "experiment.json", {"args": {k: str(v) if isinstance(v, Path) else v
                                                         for k, v in vars(args).items()},
                                                "patches": patches, "synthetic": synthetic,
                                                "n_synthetic": n_synthetic, "results": table,
                                                "seconds": round(time.perf_counter() - t0, 1)})
    print(text)
    print(f"wrote {out / 'results.csv'}, {out / 'runs.csv'}, {out / 'results.md'}, {out / 'roc.png'} "
          f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
