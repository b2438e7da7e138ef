"""Fitted per-step coefficients (FittedSolver, fit_coefficients) against an analytic Gaussian."""
import json
import math

import numpy as np
import pytest
import torch

from vision_eff.samplers import PCMultistepScheduler, sample
from vision_eff.samplers.functional import FittedSolver, Solver
from vision_eff.samplers.optimize import fit_coefficients, trajectory_states

# isotropic Gaussian data N(MU, V I): the exact ODE step x(s1) = MU + r (x(s0) - MU), r = sqrt((V + s1^2) / (V + s0^2)),
# is an affine map, i.e. exactly a x + w D(x) for scalars a, w: a fitted solver must reproduce it to rounding error.
G = torch.Generator().manual_seed(3)
MU = torch.randn(12, dtype=torch.float64, generator=G) * 0.4
V = 0.09


def iso_D(x, sigma):
    return MU + V / (V + float(sigma) ** 2) * (x - MU)


def iso_exact(x0, s0, s1):
    return MU + math.sqrt((V + s1**2) / (V + s0**2)) * (x0 - MU)


SIG = [40.0, 2.0, 0.5, 0.1, 0.0]


def _targets(x):
    out, xi = [], x
    for s0, s1 in zip(SIG[:-1], SIG[1:]):
        xi = iso_exact(xi, s0, s1)
        out.append(xi)
    return out


@pytest.mark.parametrize("history", [1, 3])
def test_fitted_coefficients_reproduce_the_exact_gaussian_flow_on_new_noise(history):
    x_fit = torch.randn(16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * SIG[0]
    coefs = fit_coefficients(iso_D, x_fit, SIG, _targets(x_fit), history=history)
    assert len(coefs) == len(SIG) - 1 and all(len(r) <= history + 1 for r in coefs)
    x_new = torch.randn(16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * SIG[0]
    out = sample(iso_D, x_new, SIG, FittedSolver(tuple(map(tuple, coefs))))
    truth = iso_exact(x_new, SIG[0], 0.0)
    assert (out - truth).abs().max() < 1e-9
    # the plain solver on the same 4 steps is far from it: the fit is doing the work
    plain = sample(iso_D, x_new, SIG, Solver(order=3))
    assert (plain - truth).abs().max() > 1e-4


def test_trajectory_states_match_the_exact_flow():
    x = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * SIG[0]
    states = trajectory_states(iso_D, x, SIG, sigma_min=0.01, substeps=24)
    for got, want in zip(states, _targets(x)):
        assert (got - want).abs().max() < 1e-5


def test_fitted_solver_rejects_misuse():
    with pytest.raises(ValueError, match="finite"):
        FittedSolver(((1.0,),))
    with pytest.raises(ValueError, match="finite"):
        FittedSolver(((1.0, float("nan")),))
    fs = FittedSolver(((0.5, 0.5), (0.5, 0.5)))
    with pytest.raises(ValueError, match="cannot run a 3-step schedule"):
        sample(iso_D, torch.zeros(1, 12), [4.0, 2.0, 1.0, 0.0], fs)
    with pytest.raises(ValueError, match="one target state per step"):
        fit_coefficients(iso_D, torch.zeros(1, 12), SIG, [torch.zeros(1, 12)])


CFG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def _doc(coefs, sig):
    from vision_eff.samplers.schedules import NoiseSchedule

    return {"format": "vision-eff-schedule", "version": 1, "model": "toy", "fingerprint": None,
            "noise_schedule": NoiseSchedule.ddpm(**CFG).identity(), "prediction_type": "epsilon", "solver": {},
            "sigmas": {str(len(sig) - 1): sig}, "coefficients": {str(len(sig) - 1): coefs}, "report": {}}


def _eps_model(sched):
    def model(x, t):
        sigma = sched._sig[sched.index_for_timestep(t)]
        a = sched.noise.alpha(sigma)
        d = iso_D(x.double() / a, sigma)
        return ((x.double() - a * d) / (sigma * a)).to(x.dtype)
    return model


def test_scheduler_uses_the_files_coefficients_and_can_be_told_not_to(tmp_path):
    sig = [157.0, 2.0, 0.5, 0.1, 0.0]
    x_fit = torch.randn(16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sig[0]
    targets, xi = [], x_fit
    for s0, s1 in zip(sig[:-1], sig[1:]):
        xi = iso_exact(xi, s0, s1)
        targets.append(xi)
    coefs = fit_coefficients(iso_D, x_fit, sig, targets, history=2)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(_doc(coefs, sig)))
    noise = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    outs = {}
    for fitted in (True, False):
        sched = PCMultistepScheduler(**CFG, schedule=str(path), fitted_coefficients=fitted)
        sched.set_timesteps(4)
        assert isinstance(sched.solver, FittedSolver) == fitted
        x, model = noise * sched.init_noise_sigma, _eps_model(sched)
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x).prev_sample
        outs[fitted] = x
    truth = iso_exact(noise / PCMultistepScheduler(**CFG).noise.alpha(sig[0]), sig[0], 0.0)
    assert (outs[True] - truth).abs().max() < 1e-8
    assert (outs[False] - truth).abs().max() > 1e-4
    # the coefficients travel with save_pretrained; another step count uses the plain solver
    sched = PCMultistepScheduler(**CFG, schedule=str(path))
    sched.save_pretrained(tmp_path / "saved")
    again = PCMultistepScheduler.from_pretrained(tmp_path / "saved")
    again.set_timesteps(4)
    assert again.solver == FittedSolver(tuple(tuple(r) for r in coefs))
    again.set_timesteps(6)
    assert isinstance(again.solver, Solver)


def test_img2img_from_a_later_step_falls_back_to_the_plain_rule(tmp_path):
    sig = [157.0, 2.0, 0.5, 0.1, 0.0]
    coefs = [[0.0, 1.0]] * 4  # deliberately wrong: must not be used from step 2 on
    sched = PCMultistepScheduler(**CFG, schedule=_doc(coefs, sig))
    sched.set_timesteps(4)
    sched.set_begin_index(2)
    x = torch.randn(2, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x0 = x
    model = _eps_model(sched)
    for t in sched.timesteps[2:]:
        x = sched.step(model(x, t), t, x).prev_sample
    assert isinstance(sched.solver, Solver)
    a = sched.noise.alpha(sig[2])
    want = sample(iso_D, x0.double() / a, sig[2:], sched.solver)
    torch.testing.assert_close(x, want, rtol=1e-10, atol=1e-10)


def test_corrupt_coefficients_in_a_schedule_file_are_rejected(tmp_path):
    doc = _doc([[1.0, 0.0]] * 2, [157.0, 2.0, 0.5, 0.0])  # 2 rows for 3 steps
    with pytest.raises(ValueError, match="do not match its sigmas"):
        PCMultistepScheduler(**CFG, schedule=doc)


def test_optimize_schedule_fits_and_records_coefficients(tmp_path):
    from vision_eff.samplers.optimize import optimize_schedule
    from vision_eff.samplers.oracle import digits_mixture
    from vision_eff.samplers.schedules import read_schedule_file

    out = tmp_path / "o.json"
    doc = optimize_schedule(digits_mixture(), nfe=3, samples=24, seed=5, max_evals=4, reference_nfe=24,
                            progress=False, out=str(out), coefficients=True, history=2)
    rep = doc["report"]["3"]
    saved = read_schedule_file(str(out))
    assert saved.get("coefficients", {}) == doc.get("coefficients", {})
    assert ("3" in saved.get("coefficients", {})) == rep["fitted_coefficients"]
    # the fitted options are added to the same candidates, so the pick is at least as good on held-out noise
    plain = optimize_schedule(digits_mixture(), nfe=3, samples=24, seed=5, max_evals=4, reference_nfe=24,
                              progress=False)
    assert rep["validation_rmse"] <= plain["report"]["3"]["validation_rmse"] + 1e-12


def test_resample_keeps_the_ends_and_the_shape():
    from vision_eff.samplers.optimize import _resample

    sig = [100.0, 10.0, 1.0, 0.1, 0.0]
    for n in (2, 4, 6, 9):
        out = _resample(sig, n)
        assert len(out) == n + 1 and out[-1] == 0.0
        assert out[0] == 100.0 and abs(out[-2] - 0.1) < 1e-12
        assert all(a > b for a, b in zip(out[:-1], out[1:]))
    # resampling to the same count is the identity; log-uniform stays log-uniform
    assert max(abs(a - b) for a, b in zip(_resample(sig, 4), sig)) < 1e-9
    import numpy as np

    mid = np.log(_resample(sig, 7)[:-1])
    assert np.allclose(np.diff(mid), np.diff(mid)[0])


def test_warm_start_only_adds_candidates():
    from vision_eff.samplers.optimize import optimize_schedule
    from vision_eff.samplers.oracle import digits_mixture

    kw = dict(nfe=[4, 3], samples=16, seed=3, max_evals=3, reference_nfe=20, progress=False)
    warm = optimize_schedule(digits_mixture(), **kw)
    cold = optimize_schedule(digits_mixture(), warm_start=False, **kw)
    assert warm["report"]["3"]["start"] == "init"  # NFEs run in increasing order: nothing to warm-start NFE 3
    assert warm["sigmas"]["3"] == cold["sigmas"]["3"]
    # NFE 4 chooses among a superset of the cold candidates, by the same held-out score
    assert warm["report"]["4"]["validation_rmse"] <= cold["report"]["4"]["validation_rmse"] + 1e-12
    assert warm["report"]["4"]["start"] in ("init", "warm")


def test_nelder_mead_restarts_never_lose_tuning_accuracy():
    from vision_eff.samplers.optimize import optimize_schedule
    from vision_eff.samplers.oracle import digits_mixture

    kw = dict(nfe=4, samples=16, seed=3, max_evals=6, reference_nfe=20, progress=False)
    once = optimize_schedule(digits_mixture(), **kw)
    again = optimize_schedule(digits_mixture(), restarts=2, **kw)
    # one start: the restarts continue from where the first run stopped and keep the better point
    assert again["report"]["4"]["rmse_after"] <= once["report"]["4"]["rmse_after"] + 1e-12
    assert again["report"]["model_calls"] > once["report"]["model_calls"]
    with pytest.raises(ValueError, match="restarts must be an integer >= 0"):
        optimize_schedule(digits_mixture(), restarts=-1, **kw)
