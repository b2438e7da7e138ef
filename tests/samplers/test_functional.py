"""Solver maths against an analytic Gaussian (exact denoiser and exact ODE solution), and diffusers' DDIM."""
import math

import numpy as np
import pytest
import torch

from vision_eff.samplers.functional import Solver, SolverState, check_sigmas, sample
from vision_eff.samplers.schedules import spacing

# data ~ N(mu, diag(s)): D(x, sigma) = mu + s / (s + sigma^2) (x - mu);
# the ODE solution is x(sigma) = mu + sqrt((s + sigma^2) / (s + sigma0^2)) (x0 - mu)
G = torch.Generator().manual_seed(0)
MU = torch.randn(8, dtype=torch.float64, generator=G) * 0.3
S = torch.rand(8, dtype=torch.float64, generator=G) * 0.9 + 0.05


def denoise(x, sigma):
    s2 = float(sigma) ** 2
    return MU + S / (S + s2) * (x - MU)


def exact(x0, sigma0, sigma):
    return MU + torch.sqrt((S + sigma**2) / (S + sigma0**2)) * (x0 - MU)


X0 = torch.randn(4, 8, dtype=torch.float64, generator=G) * 5.0


def _global_error(solver, n, lo=0.2, hi=5.0):
    sig = np.exp(np.linspace(math.log(hi), math.log(lo), n + 1))
    out = sample(denoise, X0.clone(), sig, solver)
    return (out - exact(X0, hi, lo)).abs().max().item()


def _local_error(solver, h, k, lam0=0.0):
    """One step with an exact history of k - 1 earlier calls spaced h apart in lambda."""
    lams = [lam0 - h * j for j in range(k - 1, -1, -1)]  # oldest first, the last is the current point
    sig = [math.exp(-v) for v in lams]
    state = SolverState()
    hist_x = [exact(X0, 5.0, s) for s in sig]
    for s, x in zip(sig[:-1], hist_x[:-1]):
        state.push(s, x, denoise(x, s), keep=8)
    x = hist_x[-1]
    sigma_next = math.exp(-(lam0 + h))
    solver_nc = Solver(order=solver.order, corrector=False, final=solver.final)
    out = solver_nc.step(state, x, sig[-1], sigma_next, denoise(x, sig[-1]))
    return (out - exact(X0, 5.0, sigma_next)).abs().max().item()


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_local_order_of_exponential_adams_bashforth(order):
    # exact-history one-step error is O(h^(order+1)): halving h divides it by ~2^(order+1)
    e1, e2 = _local_error(Solver(order=order), 0.4, order), _local_error(Solver(order=order), 0.2, order)
    ratio = e1 / e2
    assert 2 ** (order + 1) * 0.7 < ratio < 2 ** (order + 1) * 1.5, (order, e1, e2, ratio)


@pytest.mark.parametrize("solver,expected", [
    (Solver(order=1, corrector=False), 1), (Solver(order=2, corrector=False), 2),
    (Solver(order=1, corrector=True), 2), (Solver(order=2, corrector=True), 3),
])
def test_global_convergence_order(solver, expected):
    e1, e2 = _global_error(solver, 16), _global_error(solver, 32)
    order = math.log2(e1 / e2)
    assert expected - 0.3 < order < expected + 0.6, (e1, e2, order)


def test_higher_order_is_more_accurate():
    errs = [_global_error(Solver(order=k, corrector=c), 12) for k, c in [(1, False), (2, False), (3, False), (3, True)]]
    assert errs[0] > errs[1] > errs[2] > errs[3]


def test_final_step_to_zero_is_consistent():
    # integrating to sigma = 0: the eps rule of order 2 converges at second order to the exact x(0)
    errs = []
    for n in (16, 32):
        sig = np.concatenate([np.exp(np.linspace(math.log(5.0), math.log(0.05), n)), [0.0]])
        out = sample(denoise, X0.clone(), sig, Solver(order=2, corrector=True, final="eps", final_order=2))
        errs.append((out - exact(X0, 5.0, 0.0)).abs().max().item())
    assert errs[1] < errs[0] / 2.5


def test_order_one_equals_diffusers_ddim_update():
    from diffusers import DPMSolverMultistepScheduler

    from vision_eff.samplers import ExpMultistepScheduler

    cfg = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    ts = [999, 700, 400, 150, 20]
    ours = ExpMultistepScheduler(**cfg, predictor_order=1, final_step="denoise")
    theirs = DPMSolverMultistepScheduler(**cfg, solver_order=1)
    ours.set_timesteps(timesteps=ts)
    theirs.set_timesteps(timesteps=ts)
    x_a = x_b = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for i in range(len(ts)):
        eps = torch.tanh(x_a) * 0.5 + 0.1 * i  # any model output
        x_a = ours.step(eps, ours.timesteps[i], x_a).prev_sample
        x_b = theirs.step(eps, theirs.timesteps[i], x_b).prev_sample
    torch.testing.assert_close(x_a, x_b, rtol=1e-4, atol=1e-5)


def test_check_sigmas_rejects_bad_schedules():
    with pytest.raises(ValueError, match="at least 2"):
        check_sigmas([1.0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_sigmas([1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_sigmas([2.0, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=">= 1"):
        spacing("jump", 0, 0.01, 100.0)
    with pytest.raises(ValueError, match="order"):
        Solver(order=0)
