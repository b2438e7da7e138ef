"""Per-model step-schedule optimization (trajectory matching, as in Align Your Steps / LD3 / GITS).

``optimize_schedule(model_or_pipe, nfe=N)`` draws a small batch of tuning noise (32-256 samples),
solves each to a high-NFE reference endpoint, then searches the N call sigmas (the first stays at
sigma_max, the others move freely, kept decreasing by a log-increment parametrisation) that minimise the
RMSE between our N-call sampler and that reference (Nelder-Mead, a fixed budget of model calls). The
result is a small JSON schedule file that our schedulers load with ``schedule=path``.

With ``coefficients=True`` it also fits, for each candidate schedule, the update of every step as a linear
combination of the current state and the last few model outputs (sequential least squares against the
reference trajectory through those same sigmas, see :func:`fit_coefficients`) and keeps them when they
beat the plain solver on held-out tuning noise: per-model "improved multistep coefficients".
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .functional import FittedSolver, Solver, get_solver, sample
from .schedules import NoiseSchedule, model_fingerprint, save_schedule_file, spacing


@dataclass
class Target:
    """What the optimizer needs from a model: D(x_ve, sigma), its noise schedule, a sample shape, a name."""

    denoise: Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]  # (x_ve, sigma, labels) -> D
    noise: NoiseSchedule
    prediction_type: str
    shape: tuple[int, ...]
    name: str
    fingerprint: str | None
    num_classes: int | None = None
    scheduler_config: dict | None = None


def _pipeline_target(pipe, guidance_scale: float) -> Target:
    from .schedulers import PCMultistepScheduler

    if not hasattr(pipe, "_denoise") or not hasattr(pipe, "denoiser"):
        raise TypeError("optimize_schedule needs a vision_eff.zoo pipeline, a zoo model name, a GaussianMixture, "
                        "or a Target(denoise=..., ...) for other models")
    sched = PCMultistepScheduler.from_config(pipe.scheduler.config)
    dtype = next(pipe.denoiser.parameters()).dtype
    from ..zoo import NUM_CLASSES

    def denoise(x_ve, sigma, labels):
        a = sched.noise.alpha(sigma)
        x = (x_ve * a).to(dtype)
        t = torch.full((x.shape[0],), float(sched.noise.sigma_to_t(sigma)), dtype=torch.float32)
        if guidance_scale > 1:
            out = pipe._denoise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([torch.full_like(labels, NUM_CLASSES), labels]))
            u, c = out.chunk(2)
            out = u + guidance_scale * (c - u)
        else:
            out = pipe._denoise(x, t, labels)
        return sched._to_denoised(out.to(x_ve.dtype), x.to(x_ve.dtype), sigma)

    name = getattr(pipe, "_zoo_name", None) or type(pipe.denoiser).__name__
    return Target(denoise, sched.noise, sched.config.prediction_type, tuple(pipe.latent_shape), name,
                  model_fingerprint(pipe.denoiser), NUM_CLASSES, dict(pipe.scheduler.config))


def _mixture_target(mixture) -> Target:
    return Target(lambda x, s, labels: mixture.denoise(x, s), NoiseSchedule.ddpm(), "epsilon", (mixture.dim,),
                  "digits-gmm-oracle", None)


def as_target(model_or_pipe, guidance_scale: float = 1.0) -> Target:
    from .oracle import GaussianMixture

    if isinstance(model_or_pipe, Target):
        return model_or_pipe
    if isinstance(model_or_pipe, GaussianMixture):
        return _mixture_target(model_or_pipe)
    if isinstance(model_or_pipe, str):
        from ..zoo import load_pipeline

        pipe = load_pipeline(model_or_pipe)
        pipe._zoo_name = model_or_pipe
        return _pipeline_target(pipe, guidance_scale)
    return _pipeline_target(model_or_pipe, guidance_scale)


def _batched(fn, x, labels, batch_size):
    return torch.cat([fn(x[i:i + batch_size], labels[i:i + batch_size] if labels is not None else None)
                      for i in range(0, x.shape[0], batch_size)])


def _sigmas_from(z: np.ndarray, smax: float) -> list[float]:
    ls = math.log(smax) - np.cumsum(np.exp(z))
    return [smax] + np.exp(ls).tolist() + [0.0]


def _z_from(sig: Sequence[float]) -> np.ndarray:
    ls = np.log(np.asarray(sig[:-1], dtype=np.float64))
    return np.log(np.maximum(-np.diff(ls), 1e-6))


def _resample(sigmas: Sequence[float], n: int) -> list[float]:
    """An ``n``-call schedule shaped like ``sigmas`` (another call count): log sigma of the positive sigmas
    interpolated over the normalised step index, so the first and last positive sigmas stay where they are."""
    ls = np.log(np.asarray(sigmas[:-1], dtype=np.float64))
    if n == 1 or len(ls) == 1:
        return [float(sigmas[0]), 0.0]
    new = np.exp(np.interp(np.linspace(0.0, 1.0, n), np.linspace(0.0, 1.0, len(ls)), ls))
    return [float(sigmas[0])] + new[1:].tolist() + [0.0]


def _fine_grid(sigmas: Sequence[float], sigma_min: float, substeps: int) -> tuple[list[float], list[int]]:
    """A fine schedule through every sigma of ``sigmas`` (``substeps`` per interval, uniform in log sigma; the
    step to 0 goes on to ``sigma_min`` first, as the tuning reference does) and the fine index of each
    coarse sigma after the first."""
    fine, idx = [float(sigmas[0])], []
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        if b > 0:
            seg = np.exp(np.linspace(math.log(a), math.log(b), substeps + 1))[1:].tolist()
        else:
            lo = min(sigma_min, a / 2)
            seg = np.exp(np.linspace(math.log(a), math.log(lo), substeps + 1))[1:].tolist() + [0.0]
        fine += seg
        idx.append(len(fine) - 1)
    return fine, idx


def trajectory_states(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                      sigmas: Sequence[float], sigma_min: float, substeps: int = 16) -> list[torch.Tensor]:
    """The high-accuracy ODE states at ``sigmas[1:]`` from ``x`` at ``sigmas[0]`` (order-3 PC on a fine grid)."""
    fine, idx = _fine_grid(sigmas, sigma_min, substeps)
    want, got = set(idx), {}

    def keep(i, xi):
        if i + 1 in want:
            got[i + 1] = xi.clone()

    sample(denoise, x.clone(), fine, Solver(order=3, corrector=True), callback=keep)
    return [got[j] for j in idx]


def fit_coefficients(denoise: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, sigmas: Sequence[float],
                     targets: Sequence[torch.Tensor], history: int = 3) -> list[list[float]]:
    """Per-step coefficients ``[a, w_newest, ...]`` of a :class:`FittedSolver` by sequential least squares.

    Step ``i`` runs the already fitted steps from ``x``, calls the model at ``sigmas[i]``, and solves
    ``min || a x_i + sum_j w_j D_{i-j} - targets[i] ||`` over all samples and pixels (float64, columns
    scaled to unit norm); the fitted state then feeds step ``i + 1``. ``denoise(x, sigma)`` takes the whole batch.
    """
    if len(targets) != len(sigmas) - 1:
        raise ValueError(f"need one target state per step ({len(sigmas) - 1}), got {len(targets)}")
    if history < 1:
        raise ValueError(f"history must be >= 1, got {history}")
    xi, ds, coefs = x.double(), [], []
    for i in range(len(sigmas) - 1):
        ds.insert(0, denoise(xi, float(sigmas[i])).double())
        del ds[history:]
        cols = torch.stack([f.reshape(-1) for f in [xi] + ds], 1)
        scale = cols.norm(dim=0).clamp_min(1e-30)
        sol = torch.linalg.lstsq(cols / scale, targets[i].double().reshape(-1, 1), driver="gelsd").solution[:, 0]
        c = sol / scale
        coefs.append([float(v) for v in c])
        xi = (cols @ c).view_as(xi)
    return coefs


def optimize_schedule(model_or_pipe, nfe: int | Sequence[int] = 6, *, out: str | None = None, samples: int = 64,
                      seed: int = 1234, reference_nfe: int = 100, max_evals: int = 80, solver: str | Solver = "pc",
                      guidance_scale: float = 1.0, batch_size: int = 64, progress: bool = True,
                      init: str = "jump", sigma_data: float | Sequence[float] = 0.5, orders: Sequence[int] | None = None,
                      validate: bool = True, coefficients: bool = False, history: int = 3,
                      warm_start: bool = True, restarts: int = 0) -> dict:
    """Find the call sigmas for each NFE in ``nfe`` that best match a ``reference_nfe``-call trajectory.

    Model cost: ``samples * reference_nfe`` + ``max_evals * samples * N`` per NFE. Returns the schedule file's
    content (``sigmas`` per NFE and a ``report`` with the tuning RMSE before and after) and writes it to
    ``out`` when given. Use separate noise (another ``seed``) to judge the gain. ``orders`` (e.g. (2, 3)) also
    picks the predictor order per NFE (each order costs another search); the file records the choice.
    A list of ``sigma_data`` values starts one search from each "jump" schedule (multi-start).
    With ``validate`` (default) another ``samples // 2`` tuning-noise samples pick among the start schedule and
    the optimized ones, so the result does not overfit the tuning batch.
    ``coefficients`` also fits per-step update coefficients (``history`` past model outputs) to each candidate
    schedule, at a cost of ``samples * reference_nfe`` more calls per candidate, and keeps them where they win on
    the held-out tuning noise (the file's ``coefficients``; our schedulers use them unless told not to).
    ``warm_start`` (default) runs the NFEs in increasing order and also starts each search from the previous
    NFE's optimized schedule, resampled to the new call count (one more search per order).
    ``restarts`` reruns Nelder-Mead that many times from where the last run stopped, with a fresh simplex
    and another ``max_evals`` (Nelder-Mead's simplex often collapses before it reaches the optimum).
    """
    from scipy.optimize import minimize
    from tqdm.auto import tqdm

    nfes = [nfe] if isinstance(nfe, (int, np.integer)) else list(nfe)
    if not nfes or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in nfes):
        raise ValueError(f"nfe must be an integer >= 1 or a list of them, got {nfe!r}")
    nfes = sorted(set(int(n) for n in nfes))
    if samples < 2:
        raise ValueError(f"samples must be >= 2, got {samples}")
    if isinstance(restarts, bool) or not isinstance(restarts, (int, np.integer)) or restarts < 0:
        raise ValueError(f"restarts must be an integer >= 0, got {restarts!r}")
    target = as_target(model_or_pipe, guidance_scale)
    solver = get_solver(solver)
    ns = target.noise
    smax = ns.sigma_max
    g = torch.Generator().manual_seed(seed)
    work = torch.float64 if target.name == "digits-gmm-oracle" else torch.float32
    n_val = max(2, samples // 2) if validate else 0  # held-out tuning noise that picks the final candidate
    noise = torch.randn((samples + n_val,) + target.shape, generator=g, dtype=work)
    labels = torch.randint(0, target.num_classes, (samples + n_val,), generator=g) if target.num_classes else None
    x_all = noise * math.sqrt(1 + smax * smax) if not ns.flow else noise * (1 + smax)
    calls = [0]

    def run_den(xv, s, lab):
        calls[0] += 1
        return target.denoise(xv.to(work), float(s), lab)

    def run(sig, x, lab, how=None):
        return sample(lambda xv, s: run_den(xv, s, lab), x.clone(), sig, how or solver)

    t0 = time.time()
    ref_sig = spacing("logsnr", reference_nfe, ns.sigma_min, smax)
    ref_all = _batched(lambda x, lab: run(ref_sig, x, lab), x_all, labels, batch_size)
    x_start, ref, x_val, ref_val = x_all[:samples], ref_all[:samples], x_all[samples:], ref_all[samples:]
    lab_val = labels[samples:] if labels is not None else None
    labels = labels[:samples] if labels is not None else None

    def rmse(sig, how=None, held_out=False):  # of our sampler on the tuning (or held-out tuning) noise
        xs, labs, target_x = (x_val, lab_val, ref_val) if held_out else (x_start, labels, ref)
        y = _batched(lambda x, lab: run(sig, x, lab, how), xs, labs, batch_size)
        return (y.double() - target_x.double()).pow(2).mean().sqrt().item()

    def fit(sig):  # per-step coefficients on the tuning noise for the schedule ``sig``
        sub = max(4, math.ceil(reference_nfe / (len(sig) - 1)))
        parts = []
        for i in range(0, samples, batch_size):
            lab = labels[i:i + batch_size] if labels is not None else None
            parts.append(trajectory_states(lambda xv, s, lab=lab: run_den(xv, s, lab), x_start[i:i + batch_size], sig,
                                           ns.sigma_min, sub))
        targets = [torch.cat([p[j] for p in parts]) for j in range(len(sig) - 1)]

        def den_all(xv, s):
            return _batched(lambda x, lab: run_den(x, s, lab), xv, labels, batch_size).double()
        return fit_coefficients(den_all, x_start, sig, targets, history)

    results, report = {}, {"samples": samples, "seed": seed, "reference_nfe": reference_nfe, "solver": repr(solver),
                           "guidance_scale": guidance_scale}
    orders = list(orders) if orders else [solver.order]
    chosen, fitted = {}, {}
    sds = [sigma_data] if isinstance(sigma_data, (int, float)) else list(sigma_data)
    searched = [n for n in nfes if n > 1]
    warm = max(0, len(searched) - 1) if warm_start else 0
    bar = tqdm(total=max_evals * (1 + restarts) * len(orders) * (len(searched) * len(sds) + warm),
               desc="optimize schedule", disable=not progress)
    prev = None  # the previous NFE's optimized sigmas (warm start)
    for n in nfes:
        if n == 1:
            results[n] = [smax, 0.0]
            continue
        best = None
        starts = [(o, spacing(init, n, ns.sigma_min, smax, ns, sigma_data=sd).tolist(), "init")
                  for sd in sds for o in orders]
        if warm_start and prev is not None:
            starts += [(o, _resample(prev, n), "warm") for o in orders]
        for order, init_sig, kind in starts:
            solver = Solver(order=order, corrector=solver.corrector, final=solver.final, final_order=solver.final_order)

            def loss(z):
                v = rmse(_sigmas_from(z, smax))
                bar.update(1)
                return v if math.isfinite(v) else 1e9

            z0 = _z_from(init_sig)
            before = loss(z0)
            nm = dict(method="Nelder-Mead", options=dict(maxfev=max(max_evals - 1, 1), xatol=1e-3, fatol=1e-6))
            res = minimize(loss, z0, **nm)
            for _ in range(restarts):
                again = minimize(loss, res.x, **nm)
                res = again if again.fun < res.fun else res
            after = float(min(res.fun, before))
            for z, tune in [(z0, before), (res.x, float(res.fun))]:
                # pick on held-out noise (or on the tuning noise without validation), with and without fitting
                sig = _sigmas_from(z, smax)
                options = [(rmse(sig, held_out=True) if validate else tune, tune, None)]
                if coefficients:
                    c = fit(sig)
                    how = FittedSolver.from_rows(c)
                    t_fit = rmse(sig, how)
                    options.append((rmse(sig, how, held_out=True) if validate else t_fit, t_fit, c))
                for score, t, c in options:
                    if best is None or score < best[0]:
                        best = (score, z, order, before, t, init_sig, c, kind)
        score, best_z, order, before, after, init_sig, c, kind = best
        results[n], chosen[n] = _sigmas_from(best_z, smax), order
        prev = results[n]
        report[str(n)] = {"rmse_before": before, "rmse_after": after, "validation_rmse": score if validate else None,
                          "order": order, "init": init_sig, "start": kind, "fitted_coefficients": c is not None}
        if c is not None:
            fitted[n] = c
        bar.set_postfix(nfe=n, before=f"{before:.4f}", after=f"{after:.4f}")
    bar.close()
    report["model_calls"] = calls[0]
    report["seconds"] = round(time.time() - t0, 1)
    doc = {"format": "vision-eff-schedule", "version": 1, "model": target.name, "fingerprint": target.fingerprint,
           "noise_schedule": ns.identity(), "prediction_type": target.prediction_type,
           "solver": {"order": solver.order, "corrector": solver.corrector, "final": solver.final,
                      "final_order": solver.final_order},
           "sigmas": {str(k): [float(v) for v in s] for k, s in sorted(results.items())},
           "orders": {str(k): o for k, o in sorted(chosen.items())}, "report": report}
    if fitted:
        doc["coefficients"] = {str(k): c for k, c in sorted(fitted.items())}
    if out is not None:
        save_schedule_file(out, model=doc["model"], fingerprint=doc["fingerprint"], noise=ns,
                           prediction_type=doc["prediction_type"], solver=doc["solver"],
                           schedules=results, report=report, orders=chosen, coefficients=fitted)
    return doc


def use_schedule(pipe, schedule, scheduler_cls=None, fitted_coefficients: bool = True):
    """Swap ``pipe.scheduler`` for our scheduler with ``schedule`` (a file or dict), after checking it was
    optimized for this very model (parameter fingerprint), not just the same noise schedule. The file's
    fitted per-step coefficients are used unless ``fitted_coefficients=False``."""
    from .schedules import check_schedule_matches, read_schedule_file
    from .schedulers import PCMultistepScheduler

    cls = scheduler_cls or PCMultistepScheduler
    doc = read_schedule_file(schedule)
    sched = cls.from_config(pipe.scheduler.config)
    check_schedule_matches(doc, sched.noise, sched.config.prediction_type, model_fingerprint(pipe.denoiser))
    solver = doc.get("solver") or {}
    extra = {k: v for k, v in (("predictor_order", solver.get("order")), ("final_step", solver.get("final")),
                                 ("final_order", solver.get("final_order"))) if v is not None}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, schedule=doc, fitted_coefficients=fitted_coefficients, **extra)
    return pipe.scheduler
