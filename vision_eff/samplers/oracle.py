"""An exact oracle for sampler benchmarks: a Gaussian mixture whose denoiser is known in closed form.

The data distribution is a full-covariance Gaussian mixture fitted to scikit-learn's 8x8 digits
(64 dimensions, pixels mapped to [-1, 1]). Under the variance-exploding parametrisation
``x = x0 + sigma * noise`` the exact denoiser is

    E[x0 | x] = sum_k p(k | x) (mu_k + S_k (S_k + sigma^2 I)^-1 (x - mu_k)),
    p(k | x) ~ pi_k N(x; mu_k, S_k + sigma^2 I),

computed in float64 from each component's eigendecomposition. The probability-flow ODE
``dx/dsigma = (x - D(x, sigma)) / sigma`` is solved with scipy to a tight tolerance and checked
against a second solve at a 100x tighter tolerance, which gives the ground-truth endpoint that a
sampler started from the same noise at the same sigma should reach.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


@dataclass(frozen=True)
class GaussianMixture:
    """Mixture weights [K], means [K, d], covariance eigenvalues [K, d] and eigenvectors [K, d, d]."""

    weights: torch.Tensor
    means: torch.Tensor
    eigvals: torch.Tensor
    eigvecs: torch.Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """The mixture's overall mean and covariance (for FD against the true distribution)."""
        w, mu = self.weights.numpy(), self.means.numpy()
        covs = np.einsum("kij,kj,klj->kil", self.eigvecs.numpy(), self.eigvals.numpy(), self.eigvecs.numpy())
        m = w @ mu
        d = mu - m
        return m, np.einsum("k,kij->ij", w, covs) + np.einsum("k,ki,kj->ij", w, d, d)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + torch.einsum("nij,nj->ni", self.eigvecs[k], self.eigvals[k].sqrt() * z)

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """E[x0 | x0 + sigma * noise = x] in float64; x is [N, d], sigma a scalar or [N]."""
        x = x.double()
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1) ** 2  # [N or 1, 1, 1]
        # coordinates of x - mu_k in component k's eigenbasis: [N, K, d]
        y = torch.einsum("kji,nkj->nki", self.eigvecs, x[:, None, :] - self.means[None])
        var = self.eigvals[None] + s2  # [N or 1, K, d]
        logp = -0.5 * ((y**2 / var).sum(-1) + var.log().sum(-1)) + self.weights.log()[None]
        post = torch.softmax(logp, dim=1)  # [N, K]
        shrunk = y * (self.eigvals[None] / var)  # S (S + s^2)^-1 (x - mu) in the eigenbasis
        xk = self.means[None] + torch.einsum("kij,nkj->nki", self.eigvecs, shrunk)
        return torch.einsum("nk,nkd->nd", post, xk)


@lru_cache(maxsize=4)
def digits_mixture(components: int = 16, reg: float = 2e-3, seed: int = 0) -> GaussianMixture:
    """A full-covariance mixture fitted (EM, scikit-learn) to the 1797 digits, pixels in [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.mixture import GaussianMixture as SkGMM
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the sampler oracle needs scikit-learn: pip install 'vision-eff[test]'") from e
    data = load_digits().data / 8.0 - 1.0
    gmm = SkGMM(components, covariance_type="full", reg_covar=reg, random_state=seed, max_iter=200).fit(data)
    ev, vecs = np.linalg.eigh(gmm.covariances_)
    return GaussianMixture(
        weights=torch.from_numpy(gmm.weights_ / gmm.weights_.sum()),
        means=torch.from_numpy(gmm.means_),
        eigvals=torch.from_numpy(np.clip(ev, reg, None)),
        eigvecs=torch.from_numpy(vecs),
    )


def ode_endpoint(mixture: GaussianMixture, x_start: torch.Tensor, sigma_start: float, rtol: float = 1e-10,
                 sigma_end: float = 1e-7) -> torch.Tensor:
    """Solve the PF-ODE from (x_start, sigma_start) to sigma = 0 (float64, DOP853 in u = log sigma).

    In u the ODE is dx/du = x - D(x, e^u), whose Jacobian has eigenvalues in [0, 1] for a mixture, so
    it is not stiff; below ``sigma_end`` the remaining change is O(sigma_end^2 / min eigenvalue) and
    the endpoint is taken as D(x, sigma_end).
    """
    from scipy.integrate import solve_ivp

    shape = x_start.shape
    x0 = x_start.double().reshape(shape[0], -1)

    def rhs(u, y):
        x = torch.from_numpy(y).view_as(x0)
        return (x - mixture.denoise(x, float(np.exp(u)))).reshape(-1).numpy()

    sol = solve_ivp(rhs, (float(np.log(sigma_start)), float(np.log(sigma_end))), x0.reshape(-1).numpy(),
                    method="DOP853", rtol=rtol, atol=rtol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    x = torch.from_numpy(sol.y[:, -1].copy()).view_as(x0)
    return mixture.denoise(x, sigma_end).reshape(shape)


def checked_endpoint(mixture: GaussianMixture, x_start: torch.Tensor, sigma_start: float,
                     rtol: float = 1e-9) -> tuple[torch.Tensor, float]:
    """The ODE endpoint at ``rtol`` and its max-abs difference from a solve at ``rtol / 100``."""
    a = ode_endpoint(mixture, x_start, sigma_start, rtol=rtol)
    b = ode_endpoint(mixture, x_start, sigma_start, rtol=rtol / 100)
    return b, float((a - b).abs().max())


def gaussian_fd(samples: torch.Tensor, mean: np.ndarray, cov: np.ndarray) -> float:
    """Frechet distance between a sample set [N, d] and a Gaussian (mean, cov), in float64."""
    from ..metrics import frechet_distance

    f = samples.double().reshape(samples.shape[0], -1).numpy()
    return frechet_distance(f.mean(0), np.cov(f, rowvar=False), mean, cov)
