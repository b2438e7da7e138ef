"""The exact oracle against independent computations (scipy densities, the analytic Gaussian ODE)."""
import math

import numpy as np
import torch
from scipy.stats import multivariate_normal

from vision_eff.samplers.oracle import GaussianMixture, checked_endpoint, gaussian_fd


def _toy_mixture(seed=0, k=3, d=4):
    rng = np.random.default_rng(seed)
    covs = []
    for _ in range(k):
        a = rng.normal(size=(d, d)) * 0.4
        covs.append(a @ a.T + 0.05 * np.eye(d))
    ev, vecs = np.linalg.eigh(np.stack(covs))
    w = rng.random(k) + 0.2
    return GaussianMixture(torch.from_numpy(w / w.sum()), torch.from_numpy(rng.normal(size=(k, d))),
                           torch.from_numpy(ev), torch.from_numpy(vecs)), covs


def test_denoiser_matches_bayes_rule_with_scipy_densities():
    mix, covs = _toy_mixture()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    sigma = 0.7
    got = mix.denoise(x, sigma)
    w, mu = mix.weights.numpy(), mix.means.numpy()
    for i, xi in enumerate(x.numpy()):
        dens = np.array([w[k] * multivariate_normal(mu[k], covs[k] + sigma**2 * np.eye(4)).pdf(xi) for k in range(3)])
        post = dens / dens.sum()
        cond = [mu[k] + covs[k] @ np.linalg.solve(covs[k] + sigma**2 * np.eye(4), xi - mu[k]) for k in range(3)]
        np.testing.assert_allclose(got[i].numpy(), post @ np.stack(cond), rtol=1e-10, atol=1e-12)


def test_ode_endpoint_of_a_single_gaussian_is_exact():
    # one component: x(0) = mu + S^(1/2) (S + s0^2)^(-1/2) (x_start - mu), known in closed form
    mix, covs = _toy_mixture(k=1)
    s0 = 30.0
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * math.sqrt(1 + s0**2)
    end, change = checked_endpoint(mix, x, s0, rtol=1e-7)
    ev, vecs = mix.eigvals[0].numpy(), mix.eigvecs[0].numpy()
    m = vecs @ np.diag(np.sqrt(ev / (ev + s0**2))) @ vecs.T
    truth = mix.means[0].numpy() + (x.numpy() - mix.means[0].numpy()) @ m.T
    assert change < 1e-5
    np.testing.assert_allclose(end.numpy(), truth, atol=1e-6)


def test_fd_of_true_samples_is_small_and_of_shifted_samples_large():
    mix, _ = _toy_mixture()
    m, c = mix.mean_cov()
    xs = mix.sample(4000, torch.Generator().manual_seed(3))
    assert gaussian_fd(xs, m, c) < 0.05
    assert gaussian_fd(xs + 0.5, m, c) > 0.9  # shifting every coordinate by 0.5 adds 4 * 0.25 = 1
