"""Benchmark of the mammo_ldm_text2image bundle: training overhead, UNet efficiency, sampling, FID, memory.

Parts (``--parts``, default all):

* ``train``  -- ms per diffusion training step through the bundle (MONAI ``SupervisedTrainer`` built by
  ``ConfigParser`` from ``train.json`` + ``train_diffusion.json``: ``DiffusionPrepareBatch`` / v-prediction batch
  + ``DiffusionInferer``) against a bare PyTorch loop with the same network, optimizer and batches. Pre-made
  latents (random tensors of the right shape) through a list "loader": no data loading is timed.
* ``flops``  -- training-step GFLOP/s (FLOPs of forward + backward counted by ``FlopCounterMode``) as a fraction
  of this machine's fp32 ``torch.mm`` GFLOP/s at the same thread count; variants: thread count, channels_last,
  ``use_flash_attention`` (SDPA) and their combinations.
* ``sample`` -- seconds per image and UNet calls of DPM-Solver++ 20 / DDIM 50 / DDPM 1000 on the demo model.
* ``fid``    -- FID of those samplers against the real demo images (same prompts and seeds).
* ``memory`` -- peak RSS (VmHWM of a child process) of one 512^2 image with the full-size configs
  (``train.json`` + ``inference.json``, random weights), DPM-Solver++ 20 steps; the UNet steps after the first
  ``--memory-steps`` return the previous output (same memory, no compute) and the time is extrapolated.

The demo model comes from ``python -m breastgen.bundle demo bundles/mammo_ldm_text2image --data D --out O``
(``--demo-dir O --demo-data D``).

    python scripts/bench_ldm.py [--quick] [--threads N] [--parts train,flops,sample,fid,memory] \
        [--demo-dir /tmp/ldm_bench] [--demo-data /tmp/dd_bench] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python scripts/bench_ldm.py` from anywhere
    sys.path.insert(0, str(REPO))

import breastgen  # noqa: E402  (installs the one-line error hook)
import breastgen.data.conditioning  # noqa: E402,F401  (configs reference it by attribute)
import breastgen.engines.diffusion  # noqa: E402,F401
from breastgen.engines.perf import (CallCounter, Stopwatch, count_flops, load_average, matmul_gflops,  # noqa: E402
                                    median, num_threads, physical_cores, to_channels_last, write_doc_block)
from breastgen.errors import BreastGenError, main_guard  # noqa: E402

BUNDLE = REPO / "bundles" / "mammo_ldm_text2image"
NAME = "bench_ldm"  # its block in docs/benchmarks.md
PARTS = ("train", "flops", "sample", "fid", "memory")
PROMPTS = ["a mammogram in CC view with high density and medium area",
           "a hologic mammogram in MLO view with very low density and big area",
           "a mammogram in MLO view with small area", ""]

# Training settings: configs + overrides (the override keys are what is reported in the doc)
SETTINGS: dict[str, dict[str, Any]] = {
    "demo": {
        "label": "demo nets (demo.json + demo_diffusion.json): 64^2 images, 3 x 16^2 latents, batch 16",
        "configs": ["train.json", "train_diffusion.json", "demo.json", "demo_diffusion.json"],
        "overrides": {},
    },
    "unet64": {
        "label": "UNet [64,128,256], attention at the 2 deeper levels, 1 res block/level, 32-ch heads, "
                 "cross-attention to a 64-d 2-layer text encoder; 4 x 64^2 latents (512^2 images), batch 8",
        "configs": ["train.json", "train_diffusion.json"],
        "overrides": {"unet_def#channels": [64, 128, 256], "unet_def#attention_levels": [False, True, True],
                      "unet_def#num_res_blocks": 1, "unet_def#num_head_channels": 32, "text_embed_dim": 64,
                      "text_encoder_def#num_layers": 2, "text_encoder_def#num_heads": 4, "batch_size": 8},
    },
}


# ----------------------------------------------------------------------------------------------- helpers
def parse_configs(configs: Sequence[str], overrides: dict[str, Any], workdir: Path,
                  bench_globals: dict[str, Any] | None = None):
    from monai.bundle import ConfigParser

    parser = ConfigParser(globals=bench_globals or None)
    parser.read_config([str(BUNDLE / "configs" / c) for c in configs])
    base = {"bundle_root": str(BUNDLE), "output_dir": str(workdir), "data_dir": str(workdir),
            "device": "$torch.device('cpu')"}
    for k, v in {**base, **overrides}.items():
        parser[k] = v
    return parser


def snapshot() -> dict[str, Any]:
    return {"load": load_average(), "threads": torch.get_num_threads(), "time": time.strftime("%H:%M:%S")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load_average()[0]:.1f}] {msg}", flush=True)


def make_batches(parser, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of random latents + token ids of real prompts, shaped as the bundle's loader yields."""
    g = torch.Generator().manual_seed(seed)
    bs, c, size = (int(parser.get_parsed_content(k)) for k in ("batch_size", "latent_channels", "latent_size"))
    tokenizer = parser.get_parsed_content("tokenizer")
    tokens = tokenizer([PROMPTS[i % len(PROMPTS)] for i in range(bs)])
    return [{"image": torch.randn(bs, c, size, size, generator=g), "tokens": tokens.clone()} for _ in range(n)]


class BareStep:
    """The training step of the bundle written as a plain PyTorch loop: noise, timesteps, add_noise, target
    (epsilon or velocity), forward, MSE, zero_grad, backward, optimizer step (``train()`` once per run)."""

    def __init__(self, parser):
        self.network = parser.get_parsed_content("network")
        self.optimizer = parser.get_parsed_content("optimizer")
        self.scheduler = parser.get_parsed_content("noise_scheduler")
        self.prediction = parser.get_parsed_content("schedule#prediction_type")
        self.num_train_timesteps = int(parser.get_parsed_content("schedule#num_train_timesteps"))
        self.loss = torch.nn.MSELoss()

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        images, tokens = batch["image"], batch["tokens"]
        noise = torch.randn_like(images)
        t = torch.randint(0, self.num_train_timesteps, (images.shape[0],)).long()
        noisy = self.scheduler.add_noise(original_samples=images, noise=noise, timesteps=t)
        target = self.scheduler.get_velocity(images, noise, t) if self.prediction == "v_prediction" else noise
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.network(x=noisy, timesteps=t, context=tokens), target)
        loss.backward()
        self.optimizer.step()

    def run(self, batches: Sequence[dict]) -> Stopwatch:
        self.network.train()
        with Stopwatch() as sw:
            for b in batches:
                self(b)
        return sw


def build_setting(name: str, workdir: Path, batches: list, extra: dict[str, Any] | None = None):
    s = SETTINGS[name]
    overrides = {**s["overrides"], "epochs": 1, "dataloader": "$bench_batches", **(extra or {})}
    torch.manual_seed(0)
    return parse_configs(s["configs"], overrides, workdir, {"bench_batches": batches})


# options of the bundle's trainer measured in part 1 (MONAI defaults: decollate=True, optim_set_to_none=False)
TRAINER_OPTIONS = {"trainer#decollate": False, "trainer#optim_set_to_none": True}


# ----------------------------------------------------------------------------------------------- part 1
def bench_train(args, workdir: Path) -> dict:
    from monai.data import MetaTensor

    out = {}
    plan = {"demo": (args.train_iters_demo, args.repeats), "unet64": (args.train_iters_big, args.repeats_big)}
    for name in [k for k in plan if k in args.settings]:
        n_iter, repeats = plan[name]
        batches = make_batches(build_setting(name, workdir, []), n_iter)
        bare = BareStep(build_setting(name, workdir, batches))
        shared = {"bench_network": bare.network, "bench_optimizer": bare.optimizer, "bench_scheduler": bare.scheduler}

        def trainer_for(data: list, extra: dict[str, Any]):
            s = SETTINGS[name]
            p = parse_configs(s["configs"], {**s["overrides"], "epochs": 1, "dataloader": "$bench_batches",
                                             "network": "$bench_network", "optimizer": "$bench_optimizer",
                                             "noise_scheduler": "$bench_scheduler", **extra},
                              workdir, {"bench_batches": data, **shared})
            return p.get_parsed_content("trainer")  # the same network / optimizer / scheduler objects as `bare`

        def run_trainer(tr) -> Stopwatch:
            with Stopwatch() as sw:
                tr.run()
            if tr.state.iteration != n_iter:
                raise BreastGenError(f"trainer ran {tr.state.iteration} iterations, expected {n_iter}")
            return sw

        runners: dict[str, Callable[[], Stopwatch]] = {"bare": lambda: bare.run(batches)}
        trainers = {"bundle": trainer_for(batches, {})}
        if name == "demo" or not args.quick:
            trainers["bundle_opt"] = trainer_for(batches, TRAINER_OPTIONS)
            trainers["bundle_meta"] = trainer_for([{"image": MetaTensor(b["image"]), "tokens": b["tokens"]}
                                                   for b in batches], {})
        runners.update({k: (lambda tr=tr: run_trainer(tr)) for k, tr in trainers.items()})
        n_params = sum(p.numel() for p in bare.network.unet.parameters())
        n_text = sum(p.numel() for p in bare.network.text_encoder.parameters())
        log(f"train {name}: UNet {n_params / 1e6:.2f} M + text encoder {n_text / 1e6:.2f} M params; "
            f"{n_iter} iterations x {repeats} repeats; {', '.join(runners)}")
        if name == "demo":
            for fn in runners.values():  # warm-up
                fn()
        else:
            bare(batches[0])
        wall: dict[str, list[float]] = {k: [] for k in runners}
        cpu: dict[str, list[float]] = {k: [] for k in runners}
        loads = []
        keys = list(runners)
        for r in range(repeats):
            loads.append(load_average()[0])
            order = keys[r % len(keys):] + keys[:r % len(keys)]  # rotate: no kind always runs first
            for kind in order:
                sw = runners[kind]()
                wall[kind].append(1000.0 * sw.wall / n_iter)
                cpu[kind].append(1000.0 * sw.cpu / n_iter)
            log(f"  repeat {r + 1}: " + ", ".join(f"{k} {wall[k][-1]:.1f} ms ({cpu[k][-1]:.1f} CPU)" for k in keys))

        def ratios(kind: str, src: dict) -> list[float]:
            return [b / a for a, b in zip(src["bare"], src[kind])]

        res = {"label": SETTINGS[name]["label"], "iters": n_iter, "repeats": repeats, "prediction": bare.prediction,
               "params_unet_m": n_params / 1e6, "params_text_m": n_text / 1e6, **snapshot(), "loads": loads}
        for kind in keys:
            res[kind] = {"wall_ms": median(wall[kind]), "cpu_ms": median(cpu[kind])}
            if kind != "bare":
                res[kind].update({"ratio_wall": median(ratios(kind, wall)), "ratio_cpu": median(ratios(kind, cpu)),
                                  "ratios_wall": ratios(kind, wall), "ratios_cpu": ratios(kind, cpu)})
        out[name] = res
    return out


# ----------------------------------------------------------------------------------------------- part 2
def flops_variants(name: str, cores: int, quick: bool) -> list[dict]:
    combos = [(False, False, False), (True, False, False), (False, True, False), (True, True, False),
              (True, True, True)]  # (channels_last, flash, fused AdamW)
    out = []
    for threads in sorted({1, cores}):
        for cl, flash, fused in combos:
            if quick and threads > 1 and (cl, flash, fused) not in ((False, False, False), (True, True, True)):
                continue  # --quick: with several threads only plain and everything combined
            out.append({"threads": threads, "channels_last": cl, "flash": flash, "fused": fused})
    return out


def variant_name(v: dict) -> str:
    parts = [f"{v['threads']} thread{'s' if v['threads'] > 1 else ''}"]
    parts += [label for key, label in (("channels_last", "channels_last"), ("flash", "use_flash_attention"),
                                       ("fused", "fused AdamW")) if v[key]]
    return " + ".join(parts)


def bench_flops(args, workdir: Path) -> dict:
    cores = physical_cores()
    out = {"cores": cores, "settings": {}}
    plan = {"demo": (args.flops_steps_demo, args.repeats), "unet64": (args.flops_steps_big, args.repeats_big)}
    for name in [k for k in plan if k in args.settings]:
        steps, repeats = plan[name]
        variants = flops_variants(name, cores, args.quick)
        models: dict[tuple, BareStep] = {}  # (channels_last, flash, fused) -> step; shared across thread counts
        batches: list = []
        for v in variants:
            key = (v["channels_last"], v["flash"], v["fused"])
            if key in models:
                continue
            extra = {"unet_def#use_flash_attention": bool(v["flash"]),
                     **({"optimizer#fused": True} if v["fused"] else {})}
            parser = build_setting(name, workdir, [], extra)
            if not batches:
                batches = make_batches(parser, max(2, steps))
            models[key] = BareStep(parser)
            if v["channels_last"]:
                to_channels_last(models[key].network, inputs=False)
        step_of = [models[(v["channels_last"], v["flash"], v["fused"])] for v in variants]
        flops = count_flops(lambda: models[(False, False, False)](batches[0]))  # plain model: reference count
        log(f"flops {name}: {flops / 1e9:.1f} GFLOP per training step (forward + backward); "
            f"{len(variants)} variants x {repeats} repeats x {steps} steps")
        res = [{"wall": [], "cpu": [], "peak": [], "peak_cpu": [], "load": []} for _ in variants]
        if name == "demo":
            for v, st in zip(variants, step_of):  # warm-up at the variant's thread count
                with num_threads(v["threads"]):
                    st.run(batches[:1])
        for r in range(repeats):
            order = list(range(len(variants)))
            if r % 2:
                order.reverse()
            peaks = {}
            for t in sorted({v["threads"] for v in variants}):
                peaks[t] = max(matmul_gflops(args.mm_size, repeats=3, threads=t))
                peaks[(t, "cpu")] = max(matmul_gflops(args.mm_size, repeats=3, threads=t, cpu_time=True))
            for i in order:
                v = variants[i]
                with num_threads(v["threads"]):
                    res[i]["load"].append(load_average()[0])
                    sw = step_of[i].run(batches[:steps])
                res[i]["wall"].append(sw.wall / steps)
                res[i]["cpu"].append(sw.cpu / steps)
                res[i]["peak"].append(peaks[v["threads"]])
                res[i]["peak_cpu"].append(peaks[(v["threads"], "cpu")])
            log(f"  repeat {r + 1}: matmul " + ", ".join(f"{t} thr {peaks[t]:.0f}" for t in peaks if isinstance(t, int))
                + " GFLOP/s; " + "; ".join(f"{variant_name(variants[i])} {res[i]['wall'][-1] * 1000:.0f} ms"
                                            for i in range(len(variants))))
        rows = []
        for v, rr in zip(variants, res):
            frac = [flops / w / 1e9 / p for w, p in zip(rr["wall"], rr["peak"])]
            frac_cpu = [flops / c / 1e9 / p for c, p in zip(rr["cpu"], rr["peak_cpu"])]
            rows.append({**v, "name": variant_name(v), "ms": 1000 * median(rr["wall"]),
                         "cpu_ms": 1000 * median(rr["cpu"]), "gflops": flops / median(rr["wall"]) / 1e9,
                         "peak": median(rr["peak"]), "fraction": median(frac),
                         "fraction_cpu": median(frac_cpu) if v["threads"] == 1 else None,
                         "load": median(rr["load"])})
        out["settings"][name] = {"label": SETTINGS[name]["label"], "gflop_per_step": flops / 1e9, "steps": steps,
                                 "repeats": repeats, "rows": rows, **snapshot()}
    return out


# ----------------------------------------------------------------------------------------------- parts 3 + 4
def demo_pipeline(args, workdir: Path):
    ckpts = [args.demo_dir / "models" / "autoencoder.pt", args.demo_dir / "models" / "diffusion.pt"]
    parser = parse_configs(["train.json", "inference.json", "demo.json"],
                           {"output_dir": str(args.demo_dir), "data_dir": str(args.demo_data)}, workdir)
    pipeline = parser.get_parsed_content("pipeline")
    breastgen.engines.load_checkpoint(ckpts[0], {"autoencoder": pipeline.autoencoder})
    breastgen.engines.load_checkpoint(ckpts[1], {"network": pipeline.network, "scale": pipeline.scale})
    counter = CallCounter(pipeline.network)
    pipeline.network = counter
    return parser, pipeline, counter


SAMPLERS = (("dpm++2m", 20, "DPM-Solver++ (2M) 20"), ("ddim", 50, "DDIM 50"), ("ddpm", 1000, "DDPM 1000"))


def generate(pipeline, counter, prompts: Sequence[str], seeds: Sequence[int], sampler: str, steps: int,
             batch: int, guidance: float) -> tuple[torch.Tensor, float, int, int]:
    counter.reset()
    images = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        images.append(pipeline.sample(list(prompts[i:i + batch]), list(seeds[i:i + batch]), "", guidance, steps,
                                      sampler))
    return torch.cat(images), time.perf_counter() - t0, counter.calls, counter.rows


def bench_sample_fid(args, workdir: Path, parts: set[str]) -> dict:
    from monai.transforms import Compose

    from breastgen.data.datalists import load_datalist
    from breastgen.metrics.fid import InceptionFeatures, frechet_distance, kernel_inception_distance

    parser, pipeline, counter = demo_pipeline(args, workdir)
    guidance = float(parser.get_parsed_content("guidance_scale"))
    infer_batch = int(parser.get_parsed_content("infer_batch_size"))
    out: dict[str, Any] = {"guidance": guidance}
    if "sample" in parts:
        rows = []
        prompts = [PROMPTS[i % 3] for i in range(infer_batch)]
        for sampler, steps, label in SAMPLERS:
            reps = 1 if sampler == "ddpm" else args.repeats
            if sampler == "ddpm" and args.quick:
                continue
            if sampler != "ddpm":  # warm-up
                generate(pipeline, counter, prompts[:2], [0, 1], sampler, steps, infer_batch, guidance)
            secs, load = [], []
            for _ in range(reps):
                load.append(load_average()[0])
                _, dt, calls, rows_seen = generate(pipeline, counter, prompts, list(range(infer_batch)), sampler,
                                                   steps, infer_batch, guidance)
                secs.append(dt)
            rows.append({"sampler": label, "batch": infer_batch, "s_per_image": median(secs) / infer_batch,
                         "unet_calls": calls, "unet_rows": rows_seen, "repeats": reps, "load": median(load)})
            log(f"sample {label}: {rows[-1]['s_per_image']:.3f} s/image at batch {infer_batch}, {calls} UNet calls")
        # bf16 UNet + text encoder (the memory option of part 5) on the trained demo model: same seeds
        import copy

        seeds = list(range(infer_batch))
        img32, t32, _, _ = generate(pipeline, counter, prompts, seeds, "dpm++2m", 20, infer_batch, guidance)
        pipeline.network = _StopAfter(copy.deepcopy(counter.module).to(torch.bfloat16), 10**9, torch.bfloat16)
        img16 = pipeline.sample(prompts, seeds, "", guidance, 20, "dpm++2m")
        pipeline.network = counter
        diff = (img16 - img32).abs()
        bf16 = {"mean_abs": float(diff.mean()), "max_abs": float(diff.max()), "n": len(seeds)}
        log(f"bf16 vs fp32 demo samples: mean |diff| {bf16['mean_abs']:.4f}, max {bf16['max_abs']:.3f}")
        out["sample"] = {"rows": rows, "bf16": bf16, **snapshot()}
    if "fid" in parts:
        data_parser = parse_configs(["train.json", "demo.json"], {"data_dir": str(args.demo_data)}, workdir)
        datalist = data_parser.get_parsed_content("datalist_file")
        items = [e for sec in ("training", "validation", "test") for e in load_datalist(datalist, sec)]
        pre = Compose(data_parser.get_parsed_content("preprocessing"))
        real = [pre(dict(e)) for e in items]
        real_images = torch.stack([torch.as_tensor(e["image"]).float() for e in real])
        n = args.fid_samples
        prompts = [real[k % len(real)]["prompt"] for k in range(n)]
        seeds = [10_000 + k for k in range(n)]
        ext = InceptionFeatures(batch_size=32)
        feats_real = ext(real_images)
        runs = [(s, st, label, seeds) for s, st, label in SAMPLERS if not (args.quick and s == "ddim")]
        runs.append(("dpm++2m", 20, "DPM-Solver++ (2M) 20, other seeds", [20_000 + k for k in range(n)]))
        rows, feats = [], {}
        for sampler, steps, label, sd in runs:
            load = load_average()[0]
            imgs, dt, calls, rows_seen = generate(pipeline, counter, prompts, sd, sampler, steps, args.fid_batch,
                                                  guidance)
            feats[label] = ext(imgs)
            fid = frechet_distance(feats[label], feats_real)
            kid = kernel_inception_distance(feats[label], feats_real, subsets=10, subset_size=len(real_images))[0]
            rows.append({"sampler": label, "n": n, "fid": fid, "kid": kid, "seconds": dt, "s_per_image": dt / n,
                         "unet_calls": calls, "unet_rows": rows_seen, "batch": args.fid_batch, "load": load})
            log(f"fid {label}: FID {fid:.2f}, KID {kid:.4f}, {dt:.1f} s ({dt / n:.3f} s/image), {calls} UNet calls")
        dpm, ddpm = rows[0], next(r for r in rows if r["sampler"].startswith("DDPM"))
        out["fid"] = {"rows": rows, "n_real": len(real_images), "rel_diff": (dpm["fid"] - ddpm["fid"]) / ddpm["fid"],
                      "fid_dpm_vs_ddpm": frechet_distance(feats[dpm["sampler"]], feats[ddpm["sampler"]]),
                      "call_ratio": ddpm["unet_calls"] / dpm["unet_calls"], **snapshot()}
    return out


# ----------------------------------------------------------------------------------------------- part 5
class _StopAfter(torch.nn.Module):
    """Runs the first ``n`` forwards for real (timed); later ones return the previous output (same memory)."""

    def __init__(self, module: torch.nn.Module, n: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.module, self.n, self.dtype = module, n, dtype
        self.calls, self.times, self.last = 0, [], None

    def encode(self, tokens):
        return self.module.encode(tokens)

    def forward(self, x, timesteps, context=None, **kw):
        self.calls += 1
        if self.calls > self.n and self.last is not None:
            return self.last.clone()
        t0 = time.perf_counter()
        if self.dtype is not None:
            out = self.module(x.to(self.dtype), timesteps, context=context.to(self.dtype), **kw).float()
        else:
            out = self.module(x, timesteps, context=context, **kw)
        self.times.append(time.perf_counter() - t0)
        self.last = out
        return out


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(spec: str) -> None:
    """Child process: build the full-size inference pipeline and generate one image; print JSON."""
    opts = json.loads(spec)
    if opts.get("threads"):
        torch.set_num_threads(int(opts["threads"]))
    t_start = time.perf_counter()
    overrides: dict[str, Any] = {"scale": {"_target_": "breastgen.data.conditioning.LatentScaleFactor",
                                           "value": 0.18215},
                                 "use_flash_attention": bool(opts["flash"]),
                                 "unet_dtype": "bfloat16" if opts["bf16"] else "float32"}
    with tempfile.TemporaryDirectory() as tmp:
        parser = parse_configs(["train.json", "inference.json"], overrides, Path(tmp))
        torch.manual_seed(0)
        for i in range(len(parser["initialize"])):  # as the bundle does: builds the UNet in unet_dtype
            parser.get_parsed_content(f"initialize#{i}")
        pipeline = parser.get_parsed_content("pipeline")
        network = pipeline.network
        steps = int(parser.get_parsed_content("num_inference_steps"))
        sampler = parser.get_parsed_content("sampler")
        guidance = float(parser.get_parsed_content("guidance_scale"))
        size = int(parser.get_parsed_content("image_size"))
        wrapped = _StopAfter(pipeline.network, int(opts["steps"]))
        pipeline.network = wrapped
        n_params = sum(p.numel() for p in network.parameters()) + sum(
            p.numel() for p in pipeline.autoencoder.parameters())
        t_built = time.perf_counter()
        rss_built = vm_hwm_mb()
        decode_t = {}
        orig_decode = pipeline.autoencoder.decode_stage_2_outputs

        def timed_decode(z):
            decode_t["hwm_before"] = vm_hwm_mb()
            t0 = time.perf_counter()
            img = orig_decode(z.float())
            decode_t["s"] = time.perf_counter() - t0
            return img

        pipeline.autoencoder.decode_stage_2_outputs = timed_decode
        image = pipeline.sample([PROMPTS[0]], [0], "", guidance, steps, sampler)
        t_end = time.perf_counter()
    step_s = median(wrapped.times)
    print(json.dumps({
        "vm_hwm_mb": vm_hwm_mb(), "vm_hwm_built_mb": rss_built, "params_m": n_params / 1e6,
        "image_shape": list(image.shape), "image_size": size, "steps": steps, "sampler": sampler,
        "real_steps": len(wrapped.times), "unet_calls": wrapped.calls, "step_s": step_s, "decode_s": decode_t.get("s"),
        "vm_hwm_before_decode_mb": decode_t.get("hwm_before"),
        "build_s": t_built - t_start, "measured_s": t_end - t_start,
        "extrapolated_s": (t_built - t_start) + (t_end - t_built) + step_s * (wrapped.calls - len(wrapped.times)),
        "threads": torch.get_num_threads(), "load": load_average()}))


def bench_memory(args) -> dict:
    import resource

    rows = []
    variants = [("fp32, MONAI attention (`use_flash_attention: false`)", False, False),
                ("fp32, SDPA attention (configs as shipped)", True, False),
                ("bf16 UNet + text encoder, SDPA (`unet_dtype: bfloat16`)", True, True)]
    for label, flash, bf16 in variants:
        spec = json.dumps({"flash": flash, "bf16": bf16, "steps": args.memory_steps, "threads": args.threads})
        log(f"memory: {label} (child process)")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child", spec],
                              capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            raise RuntimeError(f"memory child failed ({label}):\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        res["ru_maxrss_children_mb"] = after / 1024 if after > before else None  # a new maximum among children
        res["label"] = label
        rows.append(res)
        log(f"  peak RSS {res['vm_hwm_mb'] / 1024:.2f} GB (after build {res['vm_hwm_built_mb'] / 1024:.2f} GB, "
            f"before decoding {res['vm_hwm_before_decode_mb'] / 1024:.2f} GB), "
            f"UNet step {res['step_s']:.1f} s, decode {res['decode_s']:.1f} s, "
            f"extrapolated {res['extrapolated_s']:.0f} s/image")
    return {"rows": rows, **snapshot()}


# ----------------------------------------------------------------------------------------------- report
def render(results: dict, args, command: str) -> str:
    env = results["env"]
    L = ["### Latent diffusion text-to-mammogram (`scripts/bench_ldm.py`)", "",
         f"Command: `{command}`  ", f"Date {env['date']}; torch {env['torch']}, MONAI {env['monai']}, Python "
         f"{env['python']}, {env['cpu']} ({env['cores']} cores), torch threads {env['threads']} "
         f"(torch default {env['default_threads']}); load average at start {fmt_load(env['load_start'])}, "
         f"at end {fmt_load(results.get('load_end', env['load_start']))}; whole run "
         f"{results.get('total_s', 0) / 60:.1f} min.", ""]
    loads = collect_loads(results)
    L += [f"1-min load average during the measurements: {min(loads):.1f} - {max(loads):.1f} on {env['cores']} cores; "
          f"this benchmark itself accounts for about {env['threads']} (its thread count; 2 in the 2-thread "
          "variants).", ""]
    if max(loads) > env["threads"] + 0.75:
        L += ["**The machine was shared** with other jobs during the run: absolute times are pessimistic and "
              "noisy; ratios and fractions come from interleaved runs and are medians over repeats.", ""]
    else:
        L += ["The machine was nearly free during this run (other jobs were running before it: in "
              "an earlier `--quick` run at load average 2-7 every figure was noisier, and the 2-thread training "
              "steps were 2-30x slower than 1-thread ones, because each OpenMP region waits for the descheduled "
              "thread; on a shared machine use `--threads 1` / `OMP_NUM_THREADS=1`).", ""]
    if "train" in results:
        L += ["**Training step, bundle vs bare PyTorch.** Pre-made random latents + prompt tokens in a Python list "
              "(no data loading); the same network, optimizer, noise scheduler and batches. The bundle's "
              "`SupervisedTrainer` (`DiffusionPrepareBatch` or `VPredictionPrepareBatch` + `DiffusionInferer`) is "
              "built by `ConfigParser` from the configs and overrides below, without the bundle's handlers "
              "(checkpoints, logging, validation samples); the bare loop calls `train()` once and "
              "`zero_grad(set_to_none=True)`. ms/step as wall time (process CPU time in brackets); ratios are "
              "medians of per-repeat ratios, runs interleaved in rotating order. With one thread the CPU-time "
              "ratio is the one to read on a shared machine: it excludes the time the process waited for a core, "
              "which is what makes the wall times jump. Goal: ratio <= 1.05.", "",
              "| setting | params UNet + text | bare ms/step | bundle ms/step | ratio wall / CPU | "
              "bundle + `decollate: false`, `optim_set_to_none: true`: ratio wall / CPU | "
              "bundle fed MetaTensor latents: ratio wall / CPU | iterations x repeats | load |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for name, r in results["train"].items():
            def rat(kind: str) -> str:
                return f"{r[kind]['ratio_wall']:.3f} / {r[kind]['ratio_cpu']:.3f}" if kind in r else "not run"
            L.append(f"| `{name}` | {r['params_unet_m']:.2f} M + {r['params_text_m']:.2f} M | "
                     f"{r['bare']['wall_ms']:.1f} ({r['bare']['cpu_ms']:.1f}) | "
                     f"{r['bundle']['wall_ms']:.1f} ({r['bundle']['cpu_ms']:.1f}) | {rat('bundle')} | "
                     f"{rat('bundle_opt')} | {rat('bundle_meta')} | {r['iters']} x {r['repeats']} | "
                     f"{min(r.get('loads') or r['load'][:1]):.1f}-{max(r.get('loads') or r['load'][:1]):.1f} |")
        L += [""] + [f"* `{n}`: {SETTINGS[n]['label']}; configs {' + '.join(SETTINGS[n]['configs'])}"
                     + (f", overrides `{json.dumps(SETTINGS[n]['overrides'])}`" if SETTINGS[n]["overrides"] else "")
                     + f"; {r['prediction']} target. Per-repeat ratios (CPU time): "
                     + ", ".join(f"{x:.3f}" for x in r["bundle"]["ratios_cpu"]) + "."
                     for n, r in results["train"].items()]
        L += ["* MetaTensor column: the latents as `monai.data.MetaTensor`, which is what the bundle's "
              "`CacheDataset` + `DataLoader` yield (the latents inherit the loaded image's meta data), so the UNet "
              "then runs through `MetaTensor.__torch_function__`.", ""]
    if "flops" in results:
        f = results["flops"]
        L += ["**UNet training throughput vs fp32 matmul.** One bare training step (forward + backward + AdamW); "
              "FLOPs of forward + backward counted once with `torch.utils.flop_counter.FlopCounterMode` on the "
              "plain model and divided by the step time; the matmul reference is the best of 3 fp32 `torch.mm` "
              f"{args.mm_size}^2 at the same thread count, measured in every repeat just before the steps; the "
              "fraction is the median of the per-repeat fractions. The CPU-time fraction (1 thread only) divides "
              "CPU-time GFLOP/s by CPU-time matmul GFLOP/s: it discounts the time the process was descheduled "
              "on the shared machine.", ""]
        for name, st in f["settings"].items():
            L += [f"`{name}` ({st['label']}): {st['gflop_per_step']:.1f} GFLOP per step, {st['steps']} step(s) x "
                  f"{st['repeats']} repeats per variant.", "",
                  "| variant | ms/step | GFLOP/s | matmul GFLOP/s | fraction of matmul | fraction, CPU time | load |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
            for r in st["rows"]:
                plain = r["threads"] == env["default_threads"] and not (r["channels_last"] or r["flash"] or r["fused"])
                fc = f"{100 * r['fraction_cpu']:.0f} %" if r["fraction_cpu"] is not None else "-"
                L.append(f"| {r['name']}{' (plain MONAI)' if plain else ''} | {r['ms']:.0f} | {r['gflops']:.1f} | "
                         f"{r['peak']:.0f} | {100 * r['fraction']:.0f} % | {fc} | {r['load']:.1f} |")
            L.append("")
        L += [f"torch's default thread count here is {env['default_threads']} (cores: {f['cores']}), so "
              "\"`set_num_threads` = cores\" is the plain MONAI row. `use_flash_attention` is the "
              "`DiffusionModelUNet` argument (`torch.nn.functional.scaled_dot_product_attention`); channels_last is "
              "`network.to(memory_format=torch.channels_last)`; fused AdamW is `\"optimizer#fused\": true`.", ""]
    if "sample" in results or "fid" in results:
        sf = results.get("sample_fid", {})
        L += [f"**Sampling on the demo model** (`{args.demo_dir}`, CFG guidance {sf.get('guidance')}, "
              "classifier-free guidance batches the conditional and unconditional branch into one UNet call; "
              "time includes text encoding and decoding).", "",
              "| sampler | batch (images) | s/image | UNet calls per batch run | load |",
              "| --- | ---: | ---: | ---: | --- |"]
        for r in results.get("sample", {}).get("rows", []):
            L.append(f"| {r['sampler']} | {r['batch']} | {r['s_per_image']:.3f} | {r['unet_calls']} | "
                     f"{r['load']:.1f} |")
        for r in results.get("fid", {}).get("rows", []):
            per_batch = r["unet_calls"] // max(1, -(-r["n"] // r["batch"]))
            L.append(f"| {r['sampler']} (FID run, {r['n']} images) | {r['batch']} | {r['s_per_image']:.3f} | "
                     f"{per_batch} | {r['load']:.1f} |")
        L.append("")
        b16 = results.get("sample", {}).get("bf16")
        if b16:
            L += [f"UNet + text encoder in bfloat16 (inputs cast per call, latents / scheduler / decoder fp32) on the "
                  f"trained demo model, DPM-Solver++ 20, {b16['n']} images, same seeds: mean |difference| to fp32 "
                  f"{b16['mean_abs']:.4f}, max {b16['max_abs']:.3f} (images in [0, 1]).", ""]
    if "fid" in results:
        fr = results["fid"]
        L += [f"**FID on the demo model** vs the {fr['n_real']} real demo images (all splits, bundle "
              "preprocessing), TF-Inception pool3 features (`breastgen.metrics.fid`); generated images use the "
              "real images' prompts, the same prompts and seeds for every sampler. Goal: DPM-Solver++ 20 within "
              "10 % of DDPM 1000.", "",
              "| sampler | images | FID | KID | UNet calls |", "| --- | ---: | ---: | ---: | ---: |"]
        for r in fr["rows"]:
            L.append(f"| {r['sampler']} | {r['n']} | {r['fid']:.2f} | {r['kid']:.4f} | {r['unet_calls']} |")
        verdict = "meets" if abs(fr["rel_diff"]) <= 0.10 else "misses"
        seed_rows = [r for r in fr["rows"] if "other seeds" in r["sampler"]]
        seed_note = ""
        if seed_rows:
            spread = abs(seed_rows[0]["fid"] - fr["rows"][0]["fid"]) / fr["rows"][0]["fid"]
            seed_note = (f" Changing only the seeds moves the DPM-Solver++ FID by {100 * spread:.1f} %: that is the "
                         f"resolution of an FID on {fr['rows'][0]['n']} images.")
        ddpm_fid = next(r["fid"] for r in fr["rows"] if r["sampler"].startswith("DDPM"))
        L += ["", f"DPM-Solver++ 20 vs DDPM 1000: FID {fr['rows'][0]['fid']:.2f} vs {ddpm_fid:.2f}, "
              f"relative difference {100 * fr['rel_diff']:+.1f} % ({verdict} the 10 % goal); "
              f"FID between the two sample sets {fr['fid_dpm_vs_ddpm']:.2f}; {fr['call_ratio']:.0f}x fewer UNet "
              f"calls.{seed_note} FIDs on so few images are biased upwards (2048-d covariances from "
              f"<= {fr['rows'][0]['n']} samples): compare them with each other, not with published FIDs.", ""]
    if "memory" in results:
        m = results["memory"]
        L += ["**Peak RSS of 512^2 inference** (full-size `train.json` + `inference.json`: AutoencoderKL "
              "[128,256,512,512], UNet [320,640,1280,1280], 768-d text encoder; randomly initialised, no "
              "checkpoint loaded; one image, DPM-Solver++ 20 steps, CFG batch of 2; VmHWM of a child process). "
              f"Only the first {args.memory_steps} UNet step(s) are computed, the remaining ones return the previous "
              "output (identical memory), and the time is extrapolated. Goal: <= 4 GB.", "",
              "| variant | params | peak RSS GB | after building GB | after the UNet steps GB | UNet step s | "
              "decode s | s/image (extrapolated) | load |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in m["rows"]:
            L.append(f"| {r['label']} | {r['params_m']:.0f} M | {r['vm_hwm_mb'] / 1024:.2f} | "
                     f"{r['vm_hwm_built_mb'] / 1024:.2f} | {r['vm_hwm_before_decode_mb'] / 1024:.2f} | "
                     f"{r['step_s']:.1f} | {r['decode_s']:.1f} | {r['extrapolated_s']:.0f} | {r['load'][0]:.1f} |")
        L += ["", "Peak RSS is the child's VmHWM (`/proc/self/status`); `after building` includes the Python / "
              "torch runtime. bf16: UNet and text encoder built directly in bfloat16 (`torch.set_default_dtype`, "
              "so no fp32 copy ever exists), latents, scheduler and autoencoder stay fp32 (inputs cast per UNet "
              "call). A real checkpoint is memory-mapped by `breastgen.engines.load_checkpoint` (`mmap=True`, "
              "copy-on-write): `load_state_dict` copies the weights from the file's pages, which the kernel may "
              "drop again, instead of from a second full copy in memory."]
        L.append("")
    return "\n".join(L)


def collect_loads(obj: Any, key: str | None = None) -> list[float]:
    """Every 1-min load average recorded in ``results`` ("load": value or (1, 5, 15)-min tuple; "loads": list)."""
    out: list[float] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("load", "load_start", "load_end") and isinstance(v, (int, float)):
                out.append(float(v))
            elif k in ("load", "load_start", "load_end") and isinstance(v, (list, tuple)) and v:
                out.append(float(v[0]))
            elif k == "loads" and isinstance(v, (list, tuple)):
                out += [float(x) for x in v]
            else:
                out += collect_loads(v, k)
    elif isinstance(obj, list):
        for v in obj:
            out += collect_loads(v, key)
    return out


def fmt_load(load: Sequence[float]) -> str:
    return " / ".join(f"{x:.1f}" for x in load)


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--quick", action="store_true", help="fewer repeats / samples (fits ~15 min on 2 free cores)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the train/sample/fid/memory parts (default: torch's default)")
    ap.add_argument("--settings", default="demo,unet64", help="training settings for the train/flops parts")
    ap.add_argument("--demo-dir", type=Path, default=Path("/tmp/ldm_bench"),
                    help="output folder of the bundle demo (models/autoencoder.pt, models/diffusion.pt)")
    ap.add_argument("--demo-data", type=Path, default=Path("/tmp/dd_bench"),
                    help="demo data folder the demo model was trained on (scripts/make_demo_data.py --out)")
    ap.add_argument("--fid-samples", type=int, default=None, help="generated images per sampler (default 96, quick 48)")
    ap.add_argument("--fid-batch", type=int, default=48)
    ap.add_argument("--memory-steps", type=int, default=None, help="UNet steps computed in the memory part")
    ap.add_argument("--mm-size", type=int, default=2048)
    ap.add_argument("--results", type=Path, default=None, help="also write the raw results as JSON here")
    ap.add_argument("--write", type=Path, default=None, help="update the bench_ldm block of this markdown file")
    ap.add_argument("--render-from", type=Path, default=None,
                    help="re-render the doc block from a --results JSON of an earlier run (no measuring)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    args.repeats = 3 if q else 5
    args.repeats_big = 2 if q else 3
    args.train_iters_demo = 10 if q else 20
    args.train_iters_big = 2 if q else 3
    args.flops_steps_demo = 5 if q else 10
    args.flops_steps_big = 1 if q else 2
    args.fid_samples = args.fid_samples or (48 if q else 96)
    args.memory_steps = args.memory_steps or (1 if q else 2)
    return args


@main_guard
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    if args.render_from is not None:
        if not args.render_from.is_file():
            raise BreastGenError("results file not found", args.render_from)
        saved = json.loads(args.render_from.read_text(encoding="utf-8"))
        for k, v in saved.get("args", {}).items():
            setattr(args, k, Path(v) if k == "demo_dir" else v)
        block = render(saved, args, saved["command"])
        print(block)
        if args.write:
            write_doc_block(args.write, NAME, block)
        return
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    args.settings = [x.strip() for x in args.settings.split(",") if x.strip()]
    if not args.settings or set(args.settings) - set(SETTINGS):
        raise BreastGenError(f"--settings: choose from {', '.join(SETTINGS)}")
    bad = parts - set(PARTS)
    if bad or not parts:
        raise BreastGenError(f"unknown part(s) {sorted(bad)}; choose from {', '.join(PARTS)}")
    if args.threads is not None and args.threads < 1:
        raise BreastGenError(f"--threads must be >= 1, got {args.threads}")
    if args.fid_samples < 2 or args.fid_batch < 1 or args.memory_steps < 1:
        raise BreastGenError("--fid-samples must be >= 2, --fid-batch and --memory-steps >= 1")
    if parts & {"sample", "fid"}:
        for f in (args.demo_dir / "models" / "autoencoder.pt", args.demo_dir / "models" / "diffusion.pt"):
            if not f.is_file():
                raise BreastGenError("demo checkpoint not found: run `OMP_NUM_THREADS=1 python -m breastgen.bundle "
                                     "demo bundles/mammo_ldm_text2image --data D --out O` and pass --demo-dir O", f)
    if "fid" in parts:
        from breastgen.metrics.fid import inception_path

        inception_path()  # missing Inception weights -> one-line error before any work
        if not (args.demo_data / "mammo" / "datalist.json").is_file():
            raise BreastGenError("demo data not found (scripts/make_demo_data.py --out D; pass --demo-data D)",
                                 args.demo_data / "mammo" / "datalist.json")
    if args.write is not None and args.write.exists() and not args.write.is_file():
        raise BreastGenError("not a file", args.write)

    import monai

    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python scripts/bench_ldm.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                 else sys.argv[1:]))
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " + command
    results: dict[str, Any] = {"env": {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "monai": monai.__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "cores": physical_cores(), "threads": torch.get_num_threads(), "default_threads": default_threads,
        "load_start": load_average()}}
    t_all = time.perf_counter()

    def save() -> None:
        if args.results:
            from breastgen.io import atomic_write_json

            atomic_write_json(args.results, {**results, "command": command,
                                             "args": {"mm_size": args.mm_size, "memory_steps": args.memory_steps,
                                                      "demo_dir": str(args.demo_dir)}})

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "train" in parts:
            results["train"] = bench_train(args, workdir)
            save()
        if "flops" in parts:
            results["flops"] = bench_flops(args, workdir)
            save()
        if parts & {"sample", "fid"}:
            with num_threads(args.threads, blas=True):  # NumPy / SciPy BLAS (KID) too
                sf = bench_sample_fid(args, workdir, parts)
            results["sample_fid"] = {"guidance": sf["guidance"]}
            results.update({k: sf[k] for k in ("sample", "fid") if k in sf})
            save()
        if "memory" in parts:
            results["memory"] = bench_memory(args)
    results["load_end"] = load_average()
    results["total_s"] = time.perf_counter() - t_all
    save()
    block = render(results, args, command)
    print(block)
    log(f"total {results['total_s'] / 60:.1f} min")
    if args.write:
        write_doc_block(args.write, NAME, block)


if __name__ == "__main__":
    main()
