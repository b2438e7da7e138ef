"""Solver maths as plain functions on tensors (no diffusers): the one place each update rule lives.

Convention (k-diffusion's): the state ``x`` lives in variance-exploding space, ``x = x0 + sigma * noise``
with ``sigma = sigma_vp / alpha_vp``, and ``denoiser(x, sigma)`` returns the data prediction
``D = E[x0 | x]``. The probability-flow ODE is ``dx/dsigma = (x - D) / sigma``. The schedulers in
``schedulers.py`` convert diffusers' variance-preserving / flow-matching samples to this form and call the
same ``Solver.step`` as :func:`sample` does, so the two give the same numbers.

Solvers (``SOLVERS``):

* ``"multistep"`` - exponential Adams-Bashforth of order k in lambda = -log sigma on the data
  prediction (DPM-Solver++ kM, order 1 is DDIM), with the exact integrals of the Lagrange
  interpolant for any step sizes (Gauss-Legendre quadrature, no small-h formulas).
* ``"pc"`` - the same predictor plus an exponential Adams-Moulton corrector of order k+1 that reuses
  the model call made at the predicted point (UniPC's structure, so no extra call): the corrected
  state seeds the next step.

The last step to sigma = 0 cannot use interpolation in lambda (lambda = inf); ``final="eps"`` integrates
the epsilon prediction, interpolated in sigma, from the last sigma to 0 (Adams-Bashforth in sigma,
order ``final_order``), ``final="denoise"`` returns the last data prediction (first order, what
diffusers does). One model call per step: NFE = number of steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import math

import numpy as np
import torch

_GL = np.polynomial.legendre.leggauss(24)


def _lagrange_integrals(nodes: Sequence[float], a: float, b: float, weight: Callable[[np.ndarray], np.ndarray]) -> list[float]:
    """int_a^b weight(u) L_j(u) du for the Lagrange basis L_j on ``nodes`` (float64, Gauss-Legendre)."""
    xi, wq = _GL
    u = a + (b - a) * (xi + 1) / 2
    wu = wq * (b - a) / 2 * weight(u)
    nodes = np.asarray(nodes, dtype=np.float64)
    out = []
    for j, nj in enumerate(nodes):
        basis = np.ones_like(u)
        for m, nm in enumerate(nodes):
            if m != j:
                basis = basis * (u - nm) / (nj - nm)
        out.append(float(wu @ basis))
    return out


def exp_weights(node_sigmas: Sequence[float], sigma_s: float, sigma_t: float) -> tuple[float, list[float]]:
    """Coefficients of x_t = a * x_s + sum_j w_j D_j (exponential integrator, D interpolated in lambda).

    x_t = (sigma_t / sigma_s) x_s + int_{lam_s}^{lam_t} e^{lam - lam_t} D(lam) dlam, lam = -log sigma.
    """
    if sigma_t <= 0:
        raise ValueError("exp_weights needs sigma_t > 0; the step to sigma = 0 uses final_weights")
    lam_s, lam_t = -math.log(sigma_s), -math.log(sigma_t)
    nodes = [-math.log(s) for s in node_sigmas]
    w = _lagrange_integrals(nodes, lam_s, lam_t, lambda u: np.exp(u - lam_t))
    return sigma_t / sigma_s, w


def final_weights(node_sigmas: Sequence[float], sigma_s: float, sigma_t: float = 0.0) -> list[float]:
    """Coefficients of x_t = x_s + sum_j v_j eps_j with eps interpolated in sigma (Adams-Bashforth in sigma)."""
    return _lagrange_integrals(list(node_sigmas), sigma_s, sigma_t, np.ones_like)


@dataclass
class SolverState:
    """What a multistep solver remembers between steps (reset by ``set_timesteps``)."""

    sigmas: list[float] = field(default_factory=list)  # sigma of each past model call, oldest first
    denoised: list[torch.Tensor] = field(default_factory=list)  # D at each past call
    eps: list[torch.Tensor] = field(default_factory=list)  # (x - D) / sigma at each past call
    last_x: torch.Tensor | None = None  # the state the previous step started from (for the corrector)
    last_sigma: float | None = None
    calls: int = 0  # model calls seen since the reset (the step index of a fitted solver)

    def push(self, sigma: float, x: torch.Tensor, denoised: torch.Tensor, keep: int) -> None:
        self.calls += 1
        self.sigmas.append(sigma)
        self.denoised.append(denoised)
        self.eps.append((x - denoised) / sigma)
        del self.sigmas[:-keep], self.denoised[:-keep], self.eps[:-keep]


def _combine(a: float, x: torch.Tensor | None, ws: Sequence[float], ts: Sequence[torch.Tensor]) -> torch.Tensor:
    out = x * a if x is not None else torch.zeros_like(ts[0])
    for w, t in zip(ws, ts):
        out = out + w * t
    return out


@dataclass(frozen=True)
class Solver:
    """A multistep ODE solver: ``order`` 1-4, optional corrector, rule for the last step to sigma = 0."""

    order: int = 3
    corrector: bool = True
    final: str = "eps"  # "eps" | "denoise"
    final_order: int = 2

    def __post_init__(self):
        if not (isinstance(self.order, int) and 1 <= self.order <= 4):
            raise ValueError(f"solver order must be an integer in 1..4, got {self.order!r}")
        if self.final not in ("eps", "denoise"):
            raise ValueError(f"final must be 'eps' or 'denoise', got {self.final!r}")
        if not (isinstance(self.final_order, int) and 1 <= self.final_order <= 4):
            raise ValueError(f"final_order must be an integer in 1..4, got {self.final_order!r}")

    def step(self, state: SolverState, x: torch.Tensor, sigma: float, sigma_next: float, denoised: torch.Tensor) -> torch.Tensor:
        """One step from ``sigma`` to ``sigma_next`` given D(x, sigma); updates ``state``. One model call."""
        sigma, sigma_next = float(sigma), float(sigma_next)
        if sigma <= 0:
            raise ValueError(f"cannot step from sigma = {sigma}: the model call must be at sigma > 0")
        keep = max(self.order + 1, self.final_order)
        x_pred = x
        if self.corrector and state.last_x is not None:
            # Adams-Moulton: redo the previous step with D at this point included (no new model call)
            nodes = state.sigmas[-self.order:] + [sigma]
            ds = state.denoised[-self.order:] + [denoised]
            a, w = exp_weights(nodes, state.last_sigma, sigma)
            x = _combine(a, state.last_x, w, ds)
        state.push(sigma, x_pred, denoised, keep)
        state.last_x, state.last_sigma = x, sigma
        if sigma_next == sigma:
            return x
        if sigma_next <= 0:
            if self.final == "denoise":
                return denoised
            k = min(self.final_order, len(state.sigmas))
            v = final_weights(state.sigmas[-k:], sigma, 0.0)
            return _combine(1.0, x, v, state.eps[-k:])
        k = min(self.order, len(state.sigmas))
        a, w = exp_weights(state.sigmas[-k:], sigma, sigma_next)
        return _combine(a, x, w, state.denoised[-k:])


@dataclass(frozen=True)
class FittedSolver:
    """A solver whose update at each step is a learned linear combination (per model and schedule).

    Step ``i`` computes ``x_{i+1} = c[0] x_i + c[1] D_i + c[2] D_{i-1} + ...`` with ``c = coefficients[i]``
    (newest model output first). ``optimize.fit_coefficients`` fits them by least squares to a high-NFE
    reference trajectory through the same sigmas: "improved multistep coefficients" for one model. They
    belong to one schedule, so a run must make exactly ``len(coefficients)`` steps from the first.
    """

    coefficients: tuple[tuple[float, ...], ...]

    def __post_init__(self):
        c = self.coefficients
        if not c or any(len(row) < 2 or not all(math.isfinite(v) for v in row) for row in c):
            raise ValueError("fitted coefficients need, for each step, finite [a, w_newest, ...] (at least 2 values)")

    @classmethod
    def from_rows(cls, rows) -> "FittedSolver":
        """From nested lists (a schedule file's ``coefficients`` for one NFE)."""
        return cls(tuple(tuple(float(v) for v in row) for row in rows))

    @property
    def history(self) -> int:
        return max(len(row) for row in self.coefficients) - 1

    def step(self, state: SolverState, x: torch.Tensor, sigma: float, sigma_next: float, denoised: torch.Tensor) -> torch.Tensor:
        i = state.calls
        if i >= len(self.coefficients):
            raise ValueError(f"fitted coefficients cover {len(self.coefficients)} steps, this is step {i + 1}: "
                             "they only apply to the schedule they were fitted on")
        state.push(float(sigma), x, denoised, self.history)
        row = self.coefficients[i]
        ds = state.denoised[::-1][: len(row) - 1]
        if len(ds) < len(row) - 1:
            raise ValueError(f"step {i + 1} needs {len(row) - 1} past model outputs, the run has {len(ds)}")
        return _combine(row[0], x, row[1:], ds)


SOLVERS = {
    "ddim": Solver(order=1, corrector=False, final="denoise"),
    "dpmpp2m": Solver(order=2, corrector=False, final="denoise"),
    "multistep": Solver(order=3, corrector=False, final="eps"),
    "pc": Solver(order=3, corrector=True, final="eps"),
}


def get_solver(solver: str | Solver | FittedSolver) -> Solver | FittedSolver:
    if isinstance(solver, (Solver, FittedSolver)):
        return solver
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)} or pass a Solver(...)")
    return SOLVERS[solver]


def check_sigmas(sigmas) -> list[float]:
    """Validate a sampling schedule: >= 2 values, strictly decreasing, all positive except maybe the last."""
    s = [float(v) for v in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]
    if len(s) < 2:
        raise ValueError(f"a schedule needs at least 2 sigmas (NFE >= 1), got {len(s)}")
    if any(not math.isfinite(v) for v in s):
        raise ValueError("sigmas must be finite")
    if any(b >= a for a, b in zip(s, s[1:])):
        raise ValueError(f"sigmas must be strictly decreasing (no duplicates), got {s}")
    if s[-1] < 0 or s[-2] <= 0:
        raise ValueError("sigmas must be positive, except the last which may be 0")
    return s


@torch.no_grad()
def sample(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, sigmas,
           solver: str | Solver | FittedSolver = "pc", callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """k-diffusion-style loop: ``x`` at ``sigmas[0]`` (e.g. noise * sigmas[0]) -> x at ``sigmas[-1]``.

    ``denoiser(x, sigma)`` gets a 0-d tensor sigma of x's dtype and returns D(x, sigma). NFE = len(sigmas) - 1.
    """
    s = check_sigmas(sigmas)
    solver = get_solver(solver)
    if isinstance(solver, FittedSolver) and len(solver.coefficients) != len(s) - 1:
        raise ValueError(f"fitted coefficients for {len(solver.coefficients)} steps cannot run a {len(s) - 1}-step schedule")
    state = SolverState()
    for i in range(len(s) - 1):
        d = denoiser(x, torch.tensor(s[i], dtype=x.dtype, device=x.device))
        x = solver.step(state, x, s[i], s[i + 1], d)
        if callback is not None:
            callback(i, x)
    return x
