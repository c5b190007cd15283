"""Samplers: DPM-Solver++ against diffusers, the factory, the guided sampling loop, and real image quality."""

import warnings

import numpy as np
import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from scipy import ndimage

from breastgen.errors import BreastGenError
from breastgen.schedulers import (SCHEDULERS, DPMSolverMultistepScheduler, check_sampling_request, guided_sample,
                                  make_scheduler, seeded_noise)

# ---------------------------------------------------------------- DPM-Solver++ vs the diffusers reference

SCHEDULES = {"scaled_linear_beta": ("scaled_linear", 0.00085, 0.012), "linear_beta": ("linear", 1e-4, 0.02)}


def _compare_with_diffusers(steps, prediction_type, schedule="scaled_linear_beta", **options):
    """Run ours and diffusers' solver on the same trajectory-dependent model; return (timesteps equal, rel. error)."""
    diffusers = pytest.importorskip("diffusers")
    name, beta_start, beta_end = SCHEDULES[schedule]
    ours = DPMSolverMultistepScheduler(
        1000, schedule, prediction_type=prediction_type, beta_start=beta_start, beta_end=beta_end, **options
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=1000, beta_schedule=name, beta_start=beta_start, beta_end=beta_end,
            algorithm_type="dpmsolver++", prediction_type=prediction_type, **options,
        )  # fmt: skip
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(steps)
    weight = torch.randn(64, 64, generator=g) / 8

    def model(x, t):  # a fixed random linear map of the current sample: a wrong step changes all later inputs
        return (x.reshape(2, 64) @ weight).reshape(x.shape) + torch.sin(t / 100.0)

    a = b = torch.randn(2, 1, 8, 8, generator=g)
    for t in ours.timesteps:
        a = ours.step(model(a, t), t, a)[0]
        b = ref.step(model(b, t), t, b).prev_sample
    return torch.equal(ours.timesteps, ref.timesteps), ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("steps", [10, 20, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule", ["scaled_linear_beta", "linear_beta"])
def test_dpm_solver_matches_diffusers(steps, prediction_type, schedule):
    same_timesteps, rel_err = _compare_with_diffusers(steps, prediction_type, schedule, solver_order=2)
    assert same_timesteps and rel_err <= 1e-5


@pytest.mark.parametrize(
    "options",
    [
        {"solver_order": 1},
        {"timestep_spacing": "leading", "steps_offset": 1},
        {"timestep_spacing": "trailing"},
        {"lower_order_final": False},
        {"final_sigmas_type": "sigma_min"},
    ],
)
@pytest.mark.parametrize("steps", [7, 20])
def test_dpm_solver_options_match_diffusers(options, steps):
    same_timesteps, rel_err = _compare_with_diffusers(steps, "epsilon", **options)
    assert same_timesteps and rel_err <= 1e-5


def test_dpm_solver_sample_prediction_and_thresholding_match_diffusers():
    for options in ({}, {"thresholding": True, "sample_max_value": 1.5}):
        same_timesteps, rel_err = _compare_with_diffusers(15, "sample", **options)
        assert same_timesteps and rel_err <= 1e-5


def test_dpm_solver_state_resets_and_errors():
    sched = DPMSolverMultistepScheduler(100, "scaled_linear_beta", beta_start=0.0085, beta_end=0.12)
    noise = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(BreastGenError, match="set_timesteps"):
        sched.step(noise, 99, noise)

    def run(n_steps):
        x = noise
        for t in sched.timesteps[:n_steps]:
            x = sched.step(0.5 * x, t, x)[0]
        return x

    sched.set_timesteps(10)
    first = run(10)
    run(4)  # an abandoned trajectory leaves history behind ...
    sched.set_timesteps(10)  # ... which set_timesteps must clear
    assert torch.equal(run(10), first)
    assert sched.timesteps.dtype == torch.int64 and len(sched.timesteps) == 10
    with pytest.raises(BreastGenError, match="timestep 3 is not"):
        sched.step(noise, 3, noise)
    for bad in ({"solver_order": 3}, {"timestep_spacing": "karras"}, {"prediction_type": "flow"}):
        with pytest.raises(BreastGenError):
            DPMSolverMultistepScheduler(**bad)
    with pytest.raises(BreastGenError, match="between 1 and 100"):
        sched.set_timesteps(101)


# ---------------------------------------------------------------- factory


def test_factory_builds_each_sampler():
    kinds = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler}
    assert set(SCHEDULERS) == set(kinds)
    for name, cls in kinds.items():
        sched = make_scheduler(name, num_train_timesteps=100, prediction_type="v_prediction")
        assert type(sched) is cls and sched.prediction_type == "v_prediction"
        assert sched.clip_sample is False  # MONAI's clip_sample=True default is a trap, see make_scheduler
        assert torch.allclose(sched.betas[[0, -1]], torch.tensor([0.00085, 0.012]))
    assert isinstance(make_scheduler(" DPMSolver++ "), DPMSolverMultistepScheduler)
    assert make_scheduler("ddim", clip_sample=True).clip_sample is True  # a config may override
    assert make_scheduler("dpm++2m", timestep_spacing="trailing", solver_order=1).solver_order == 1
    assert make_scheduler("ddim", schedule="cosine", s=0.01).num_train_timesteps == 1000  # no beta range needed


def test_factory_errors():
    with pytest.raises(BreastGenError, match="'ddpm', 'ddim', 'dpm\\+\\+2m', 'dpmsolver\\+\\+'"):
        make_scheduler("euler")
    with pytest.raises(BreastGenError, match="noise schedule"):
        make_scheduler("ddim", schedule="quadratic")
    with pytest.raises(BreastGenError, match="prediction_type"):
        make_scheduler("ddpm", prediction_type="noise")
    with pytest.raises(BreastGenError, match="clip_sampel"):
        make_scheduler("ddim", clip_sampel=False)
    with pytest.raises(BreastGenError, match="solver_order"):
        make_scheduler("ddim", solver_order=2)  # a DPM option given to DDIM


# ---------------------------------------------------------------- guided sampling loop


class ToyModel(torch.nn.Module):
    """Deterministic 'network': linear in x plus the mean of the conditioning; records every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, timesteps, context=None, class_labels=None):
        self.calls.append(
            {"shape": tuple(x.shape), "x": x[:, :1].clone(), "t": timesteps, "context": context,
             "labels": class_labels, "training": self.training}
        )  # fmt: skip
        out = 0.3 * x[:, :1]
        if context is not None:
            out = out + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if class_labels is not None:
            out = out + 0.1 * class_labels.view(-1, 1, 1, 1).float()
        if x.shape[1] > 1:  # concat channels
            out = out + x[:, 1:].mean(dim=1, keepdim=True)
        return out


def _noise(batch=2):
    return torch.randn(batch, 1, 4, 4, generator=torch.Generator().manual_seed(0))


def test_guidance_scale_one_is_plain_conditional_sampling_and_plugs_into_monai_inferer():
    model, cond, uncond = ToyModel(), torch.full((2, 3, 8), 0.5), torch.zeros(1, 3, 8)
    sched = make_scheduler("dpm++2m", num_train_timesteps=100)
    plain = guided_sample(model, _noise(), sched, 12, context=cond)
    guided_at_one = guided_sample(model, _noise(), sched, 12, context=cond, uncond_context=uncond, guidance_scale=1)
    assert torch.equal(plain, guided_at_one)
    assert all(c["shape"][0] == 2 for c in model.calls) and len(model.calls) == 24
    sched.set_timesteps(12)
    via_monai = DiffusionInferer(sched).sample(_noise(), model, sched, conditioning=cond, verbose=False)
    torch.testing.assert_close(via_monai, plain)


def test_guidance_moves_towards_cond_minus_uncond():
    # with x0 ("sample") prediction the last DPM-Solver++ step returns the guided model output, which for the toy
    # model is 0.3 x + uncond + s (cond - uncond): the negative prompt is pushed away from, the prompt towards
    model, sched = ToyModel(), make_scheduler("dpm++2m", num_train_timesteps=100, prediction_type="sample")
    cond, negative = torch.full((1, 3, 8), 1.0), torch.full((1, 3, 8), -0.5)
    for scale in (0.0, 1.0, 3.0):
        out = guided_sample(model, _noise(), sched, 10, context=cond, uncond_context=negative, guidance_scale=scale)
        last = model.calls[-1]
        assert last["shape"][0] == (2 if scale == 1 else 4)
        expected = 0.3 * last["x"][:2] + (-0.5 + scale * 1.5)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # epsilon prediction with DDIM: the final sample is affine in the guided output, so x(3) - x(1) = 2 (x(1) - x(0))
    sched = make_scheduler("ddim", num_train_timesteps=100)
    labels, null = torch.tensor([3, 5]), torch.tensor([0])
    x = {s: guided_sample(model, _noise(), sched, 10, class_labels=labels, uncond_class_labels=null, guidance_scale=s)
         for s in (0.0, 1.0, 3.0)}  # fmt: skip
    step = x[1.0] - x[0.0]
    assert step.abs().min() > 1e-3
    torch.testing.assert_close(x[3.0] - x[1.0], 2 * step, rtol=1e-4, atol=1e-5)
    assert (step[1] - step[0]).mean() < 0  # label 5 adds more predicted noise than label 3: more is removed


def test_one_forward_per_step_with_batched_cfg_concat_and_eval_mode():
    model, sched = ToyModel(), make_scheduler("ddim", num_train_timesteps=100)
    model.train()
    mask, seen = torch.ones(1, 2, 4, 4), []
    out = guided_sample(
        model, _noise(3), sched, 7, context=torch.ones(3, 3, 8), uncond_context=torch.zeros(1, 3, 8),
        class_labels=torch.tensor([1, 2, 3]), guidance_scale=4.0, concat=mask,
        progress=lambda i, n: seen.append((i, n)),
    )  # fmt: skip
    assert out.shape == (3, 1, 4, 4) and len(model.calls) == 7 and seen == [(i, 7) for i in range(7)]
    call = model.calls[0]
    assert call["shape"] == (6, 3, 4, 4) and not call["training"] and model.training  # mode restored
    assert call["t"].shape == (6,) and int(call["t"][0]) == int(sched.timesteps[0])
    assert torch.equal(call["context"], torch.cat([torch.ones(3, 3, 8), torch.zeros(3, 3, 8)]))  # cond, then uncond
    assert torch.equal(call["labels"], torch.tensor([1, 2, 3, 1, 2, 3]))  # no null labels: shared by both branches
    model.calls.clear()
    guided_sample(model, _noise(3), sched, 5)  # unconditional: no conditioning kwargs at all
    assert len(model.calls) == 5 and model.calls[0]["context"] is None and model.calls[0]["labels"] is None


def test_guided_sample_validation():
    model, sched = ToyModel(), make_scheduler("ddim", num_train_timesteps=100)
    with pytest.raises(BreastGenError, match="guidance_scale must be >= 0"):
        guided_sample(model, _noise(), sched, 5, guidance_scale=-1)
    with pytest.raises(BreastGenError, match="at least 1"):
        guided_sample(model, _noise(), sched, 0)
    with pytest.raises(BreastGenError, match="DDPM sampling runs all 100 training steps"):
        guided_sample(model, _noise(), make_scheduler("ddpm", num_train_timesteps=100), 20)
    with pytest.raises(BreastGenError, match="without context"):
        guided_sample(model, _noise(), sched, 5, uncond_context=torch.zeros(1, 3, 8), guidance_scale=2)
    with pytest.raises(BreastGenError, match="batch size 3"):
        guided_sample(model, _noise(2), sched, 5, context=torch.zeros(3, 3, 8))
    with pytest.raises(BreastGenError, match="per sample"):
        guided_sample(model, _noise(), sched, 5, context=torch.zeros(1, 3, 8), uncond_context=torch.zeros(1, 4, 8),
                      guidance_scale=2)  # fmt: skip
    with pytest.warns(UserWarning, match="ignored"):
        guided_sample(model, _noise(), sched, 3, context=torch.zeros(1, 3, 8), guidance_scale=2)
    for steps in (2.5, True, "ten", None):  # the check pipelines run before any work, on its own
        with pytest.raises(BreastGenError, match="must be an integer"):
            check_sampling_request(sched, steps, 1.0)
    with pytest.raises(BreastGenError, match="guidance_scale must be >= 0"):
        check_sampling_request(sched, 5, float("nan"))
    check_sampling_request(sched, 5.0, 0.0)  # an integral float is fine
    check_sampling_request(make_scheduler("ddpm", num_train_timesteps=100), 100, 3.0)


def test_seeded_noise_depends_on_each_seed_only():
    a = seeded_noise((3, 4, 4), [5, 9])
    assert a.shape == (2, 3, 4, 4) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a[0], torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(seeded_noise([3, 4, 4], [9])[0], a[1])  # not the batch
    assert not torch.equal(a[0], a[1])


# ---------------------------------------------------------------- image quality of a really trained model

T_TRAIN = 100
SCHEDULE = {"num_train_timesteps": T_TRAIN, "beta_start": 0.0085, "beta_end": 0.12, "prediction_type": "v_prediction"}


def _discs(n, generator):
    """16x16 images in [-1, 1]: a bright disc (radius 3.5) at a random position on a dark background."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    centre = torch.rand(n, 2, generator=generator) * 8 + 4
    dist = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2).sqrt()
    return torch.where(dist < 3.5, 1.0, -1.0).unsqueeze(1)


def _image_stats(x):
    """Mean, fraction of bright pixels, fraction of clearly decided pixels, 99th percentile of |x|, and the
    fraction of images whose bright pixels form exactly one blob of disc-like area."""
    blobs = []
    for im in x[:, 0].numpy():
        labels, count = ndimage.label(im > 0)
        blobs.append(count == 1 and 25 <= (labels > 0).sum() <= 55)
    return {
        "mean": x.mean().item(),
        "bright": (x > 0).float().mean().item(),
        "decided": (x.abs() > 0.5).float().mean().item(),
        "p99": float(np.percentile(x.abs().numpy(), 99)),
        "one_disc": float(np.mean(blobs)),
    }


@pytest.fixture(scope="module")
def trained_unet():
    """A tiny MONAI DiffusionModelUNet trained briefly (v-prediction, 200 Adam steps of 16 images) on disc images."""
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = _discs(2048, g)
    model = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32),
                               attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)  # fmt: skip
    sched = make_scheduler("ddpm", **SCHEDULE)
    steps, lr = 200, 3e-3
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (16,), generator=g)]
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, T_TRAIN, (16,), generator=g)
        pred = model(sched.add_noise(x, noise, t), timesteps=t)
        loss = torch.nn.functional.mse_loss(pred, sched.get_velocity(x, noise, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_schedule.step()
    return model, _image_stats(data)


@pytest.mark.slow
@pytest.mark.parametrize("name,steps", [("ddpm", T_TRAIN), ("ddim", 50), ("dpm++2m", 20)])
def test_samplers_produce_images_like_the_data(trained_unet, name, steps):
    model, data = trained_unet
    noise = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    out = guided_sample(model, noise, make_scheduler(name, **SCHEDULE), steps,
                        generator=torch.Generator().manual_seed(2))  # fmt: skip
    got = _image_stats(out)

    def looks_like_data(s):
        return (
            abs(s["mean"] - data["mean"]) < 0.1  # data -0.70, pure noise 0.0
            and abs(s["bright"] - data["bright"]) < 0.05  # data 0.15, noise 0.5
            and s["decided"] > 0.9  # data 1.0, noise 0.62
            and s["p99"] < 1.6  # data 1.0, noise 2.6
            and s["one_disc"] >= 0.8  # data 1.0, noise 0.0
        )

    assert torch.isfinite(out).all()
    assert looks_like_data(got), f"{name}: {got} vs data {data}"
    assert not looks_like_data(_image_stats(noise))  # the criteria do reject pure noise
