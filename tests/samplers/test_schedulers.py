"""Contract tests shared by every scheduler in vision_eff.samplers.SCHEDULERS."""
import json
import math

import numpy as np
import pytest
import torch

from vision_eff.samplers import SCHEDULERS, PCMultistepScheduler, sample
from vision_eff.samplers.functional import Solver

CFG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
ALL = pytest.mark.parametrize("cls", list(SCHEDULERS.values()), ids=list(SCHEDULERS))

# data ~ N(MU, diag(S)) in 3x4x4: closed-form denoiser and ODE solution (variance-exploding sigma)
G = torch.Generator().manual_seed(0)
MU = torch.randn(3, 4, 4, dtype=torch.float64, generator=G) * 0.3
S = torch.rand(3, 4, 4, dtype=torch.float64, generator=G) * 0.5 + 0.05


def gauss_D(x_ve, sigma):
    return MU + S / (S + sigma**2) * (x_ve - MU)


def gauss_model(sched, prediction_type):
    """A VP (or flow) model of the given prediction type for the Gaussian data, as diffusers would call it."""
    def model(x, t):
        sigma = sched._sig[sched.index_for_timestep(t)]  # the exact sigma (timesteps are float32)
        a = sched.noise.alpha(sigma)
        x64 = x.double()
        d = gauss_D(x64 / a, sigma)
        st = sigma * a
        eps = (x64 - a * d) / st
        out = {"epsilon": eps, "sample": d, "v_prediction": a * eps - st * d,
               "flow_prediction": eps - d}[prediction_type]
        return out.to(x.dtype)
    return model


def run(sched, model, x):
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
    return x


@ALL
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow_prediction"])
def test_prediction_types_reach_the_exact_ode_endpoint(cls, prediction_type):
    flow = prediction_type == "flow_prediction"
    sched = cls(**CFG, prediction_type=prediction_type, use_flow_sigmas=flow, spacing="logsnr")
    sched.set_timesteps(80)
    s0 = sched._sig[0]
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = run(sched, gauss_model(sched, prediction_type), noise * sched.init_noise_sigma)
    x0_ve = noise / sched.noise.alpha(s0)
    truth = MU + torch.sqrt(S / (S + s0**2)) * (x0_ve - MU)
    assert (x - truth).abs().max() < 2e-4


@ALL
def test_functional_loop_equals_scheduler(cls):
    sched = cls(**CFG)
    sched.set_timesteps(7)
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x_sched = run(sched, gauss_model(sched, "epsilon"), noise)
    s0 = sched._sig[0]
    x_fn = sample(lambda x, s: gauss_D(x, float(s)), noise / sched.noise.alpha(s0), sched._sig, sched.solver)
    torch.testing.assert_close(x_sched, x_fn, rtol=1e-10, atol=1e-10)


@ALL
def test_save_load_round_trip(cls, tmp_path):
    sched = cls(**CFG, prediction_type="v_prediction", predictor_order=2, spacing="karras")
    sched.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert strip(loaded.config) == strip(sched.config)
    sched.set_timesteps(6)
    loaded.set_timesteps(6)
    torch.testing.assert_close(sched.timesteps, loaded.timesteps)
    torch.testing.assert_close(sched.sigmas, loaded.sigmas)


@pytest.fixture(scope="module")
def tiny_pipe():
    """The built-in UNet architecture with random weights (structure only)."""
    from vision_eff.zoo import default_scheduler
    from vision_eff.zoo.models import build
    from vision_eff.zoo.pipeline import ShapesUNetPipeline

    torch.manual_seed(0)
    m = build("shapes-unet")
    pipe = ShapesUNetPipeline(unet=m["unet"].eval(), label_encoder=m["label_encoder"].eval(),
                              scheduler=default_scheduler("shapes-unet"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@ALL
def test_from_config_swap_into_pipeline(cls, tiny_pipe):
    from diffusers import DDIMScheduler

    from vision_eff.zoo import default_scheduler

    pipe = tiny_pipe
    pipe.scheduler = default_scheduler("shapes-unet")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    from vision_eff.zoo import entry

    assert pipe.scheduler.config.prediction_type == entry("shapes-unet").prediction_type  # carried over
    assert pipe.scheduler.config.predictor_order == 3  # diffusers' solver_order does not leak in
    out = pipe(class_labels=[0, 3], num_inference_steps=3, guidance_scale=2.0, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    # and back to a diffusers scheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.num_train_timesteps == 1000


@ALL
def test_flow_matching_config(cls):
    from diffusers import FlowMatchEulerDiscreteScheduler

    fm = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched = cls.from_config(fm.config)
    assert sched.config.use_flow_sigmas and sched.config.prediction_type == "flow_prediction"
    assert sched.config.flow_shift == 3.0
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8))  # SD3 pipelines pass sigmas like this
    assert len(sched.timesteps) == 8 and sched.sigmas[-1] == 0
    assert abs(float(sched.timesteps[1]) - 875.0) < 1e-2  # timestep = s * 1000


@ALL
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_step_shapes_and_dtypes(cls, dtype):
    sched = cls(**CFG)
    sched.set_timesteps(5)
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(3)).to(dtype)
    model = gauss_model(sched, "epsilon")
    for t in sched.timesteps:
        out = sched.step(model(x, t), t, x)
        assert out.prev_sample.shape == x.shape and out.prev_sample.dtype == dtype
        x = out.prev_sample
    assert torch.isfinite(x.float()).all()
    # low precision, same timesteps, second-order predictor: error against float64 within 4x that of diffusers'
    # DPM-Solver++(2M) in the same dtype (measured 1-3.3x; the default order 3 amplifies rounding more on very uneven steps)
    from diffusers import DPMSolverMultistepScheduler

    def err(make):
        x_lo = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(3)).to(dtype)
        outs = []
        for xx in (x_lo, x_lo.double()):
            sch = make()
            sch.set_timesteps(timesteps=[999, 750, 500, 250, 50])
            model = gauss_model(sch, "epsilon") if hasattr(sch, "_sig") else gauss_model_t(sch)
            outs.append(run(sch, model, xx).double())
        return (outs[0] - outs[1]).abs().max().item()

    ours, theirs = err(lambda: cls(**CFG, predictor_order=2)), err(lambda: DPMSolverMultistepScheduler(**CFG))
    assert ours <= 4 * theirs + 1e-7, (ours, theirs)


def gauss_model_t(sched):
    """epsilon model for a diffusers scheduler (sigma from the integer timestep)."""
    ac = sched.alphas_cumprod.double()

    def model(x, t):
        a = ac[int(t)].sqrt().item()
        sigma = math.sqrt(1 - a * a) / a
        eps = (x.double() - a * gauss_D(x.double() / a, sigma)) / (a * sigma)
        return eps.to(x.dtype)
    return model


@ALL
def test_custom_timesteps_and_sigmas(cls):
    sched = cls(**CFG)
    sched.set_timesteps(timesteps=[999, 600, 250, 40])
    torch.testing.assert_close(sched.timesteps, torch.tensor([999.0, 600.0, 250.0, 40.0]))
    assert sched.num_inference_steps == 4 and float(sched.sigmas[-1]) == 0.0
    sched.set_timesteps(sigmas=[80.0, 5.0, 0.5])
    assert sched.num_inference_steps == 3
    torch.testing.assert_close(sched.sigmas, torch.tensor([80.0, 5.0, 0.5, 0.0]))
    # timesteps map back to the same sigmas (no rounding)
    back = sched.noise.t_to_sigma(sched.timesteps.double().numpy())
    np.testing.assert_allclose(back, [80.0, 5.0, 0.5], rtol=1e-6)
    sched.set_timesteps(sigmas=[80.0, 5.0, 0.5, 0.0])
    assert sched.num_inference_steps == 3


@ALL
def test_begin_index_for_img2img(cls):
    sched = cls(**CFG)
    sched.set_timesteps(10)
    begin = 4
    sched.set_begin_index(begin)
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t_start = sched.timesteps[begin:begin + 1].repeat(2)
    x = sched.add_noise(x0, noise, t_start)
    sig = sched._sig[begin]
    a = sched.noise.alpha(sig)
    torch.testing.assert_close(x, a * x0 + a * sig * noise)
    model = gauss_model(sched, "epsilon")
    x_start = x
    for t in sched.timesteps[begin:]:
        x = sched.step(model(x, t), t, x).prev_sample
    assert sched.step_index == 10
    x_fn = sample(lambda y, s: gauss_D(y, float(s)), x_start / a, sched._sig[begin:], sched.solver)
    torch.testing.assert_close(x, x_fn, rtol=1e-10, atol=1e-10)


@ALL
def test_bad_input_gives_clear_errors(cls):
    sched = cls(**CFG)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="integer >= 1"):
            sched.set_timesteps(bad)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sched.set_timesteps(timesteps=[100, 500, 999])
    with pytest.raises(ValueError, match="strictly decreasing"):
        sched.set_timesteps(timesteps=[999, 500, 500, 10])
    with pytest.raises(ValueError, match="exactly one"):
        sched.set_timesteps(4, timesteps=[999, 500])
    with pytest.raises(ValueError, match="prediction_type"):
        cls(**CFG, prediction_type="score")
    with pytest.raises(ValueError, match="set_timesteps"):
        cls(**CFG).step(torch.zeros(1), 999, torch.zeros(1))


def _schedule_doc(**over):
    from vision_eff.samplers.schedules import NoiseSchedule

    doc = {"format": "vision-eff-schedule", "version": 1, "model": "toy", "fingerprint": "abc",
           "noise_schedule": NoiseSchedule.ddpm(**CFG).identity(), "prediction_type": "epsilon", "solver": {},
           "sigmas": {"3": [157.4, 3.0, 0.3, 0.0]}, "report": {}}
    doc.update(over)
    return doc


@ALL
def test_schedule_file_is_used_and_checked(cls, tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(_schedule_doc()))
    sched = cls.from_config(cls(**CFG).config, schedule=str(path))
    sched.set_timesteps(3)
    torch.testing.assert_close(sched.sigmas, torch.tensor([157.4, 3.0, 0.3, 0.0]))
    sched.save_pretrained(tmp_path / "saved")  # the schedule travels inside the config
    again = cls.from_pretrained(tmp_path / "saved")
    again.set_timesteps(3)
    torch.testing.assert_close(again.sigmas, sched.sigmas)
    # another model's noise schedule or prediction type: a clear error
    with pytest.raises(ValueError, match="optimized for noise schedule"):
        cls(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            schedule=str(path))
    with pytest.raises(ValueError, match="prediction_type"):
        cls(**CFG, prediction_type="v_prediction", schedule=str(path))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a vision-eff schedule file"):
        cls(**CFG, schedule=str(bad))
    with pytest.raises(FileNotFoundError, match="samplers optimize"):
        cls(**CFG, schedule=str(tmp_path / "missing.json"))


def test_use_schedule_rejects_another_models_file(tmp_path, tiny_pipe):
    from vision_eff.samplers.optimize import use_schedule
    from vision_eff.samplers.schedules import model_fingerprint
    from vision_eff.zoo import default_scheduler

    pipe = tiny_pipe
    pipe.scheduler = default_scheduler("shapes-unet")
    path = tmp_path / "s.json"
    pt = pipe.scheduler.config.prediction_type
    path.write_text(json.dumps(_schedule_doc(fingerprint="0000000000000000", prediction_type=pt)))
    with pytest.raises(ValueError, match="not this model"):
        use_schedule(pipe, path)
    path.write_text(json.dumps(_schedule_doc(fingerprint=model_fingerprint(pipe.unet), prediction_type=pt)))
    sched = use_schedule(pipe, path)
    assert isinstance(pipe.scheduler, PCMultistepScheduler) and sched is pipe.scheduler


def test_optimize_schedule_beats_its_start_on_new_noise(tmp_path):
    from vision_eff.samplers.bench import BASE, oracle_model, run_loop
    from vision_eff.samplers.optimize import optimize_schedule
    from vision_eff.samplers.oracle import digits_mixture, ode_endpoint
    from vision_eff.samplers.schedules import NoiseSchedule

    mix = digits_mixture()
    out = tmp_path / "oracle.json"
    doc = optimize_schedule(mix, nfe=4, samples=32, seed=7, max_evals=40, reference_nfe=40, progress=False,
                            out=str(out), init="logsnr")
    assert json.loads(out.read_text())["sigmas"]["4"] == doc["sigmas"]["4"]
    assert doc["report"]["4"]["rmse_after"] < doc["report"]["4"]["rmse_before"]
    ns = NoiseSchedule.ddpm(**BASE)
    noise = torch.randn(48, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(99))  # other noise
    s0 = ns.sigma_max
    truth = ode_endpoint(mix, noise * math.sqrt(1 + s0 * s0), s0, rtol=1e-7)
    model = oracle_model(mix, ns)
    errs = {}
    for name, kw in {"start": dict(spacing="logsnr"), "optimized": dict(schedule=str(out))}.items():
        x, calls, _ = run_loop(PCMultistepScheduler.from_config(BASE, **kw), model, noise, 4)
        assert calls == 4
        errs[name] = (x - truth).pow(2).mean().sqrt().item()
    assert errs["optimized"] < 0.8 * errs["start"], errs


def test_benchmark_peers_get_their_settings_from_a_saved_pipeline_config():
    """A scheduler config loaded from a pipeline lists its defaulted keys in `_use_default_values`; the
    benchmark's peers must still get their own settings (order, spacing, solver type, final sigma)."""
    from vision_eff.samplers.bench import PEERS, peer_scheduler
    from vision_eff.zoo import default_scheduler

    config = default_scheduler("shapes-unet").config
    assert "use_karras_sigmas" in config.get("_use_default_values", [])  # the trap this guards against
    for name in ("dpm++3m-lu", "dpm++2m-karras", "unipc-bh1-trailing-smin", "deis3-karras"):
        sched = peer_scheduler(name, config)
        for key, value in PEERS[name][1].items():
            assert sched.config[key] == value, (name, key)
    a, b = peer_scheduler("dpm++2m", config), peer_scheduler("dpm++2m-karras", config)
    a.set_timesteps(6)
    b.set_timesteps(6)
    assert not torch.equal(a.timesteps, b.timesteps)
