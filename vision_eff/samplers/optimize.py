"""Per-model step-schedule optimization (trajectory matching, as in Align Your Steps / LD3 / GITS).

``optimize_schedule(model_or_pipe, nfe=N)`` draws a small batch of tuning noise (32-256 samples),
solves each to a high-NFE reference endpoint, then searches the N call sigmas (the first stays at
sigma_max, the others move freely, kept decreasing by a log-increment parametrisation) that minimise the
RMSE between our N-call sampler and that reference (Nelder-Mead, a fixed budget of model calls). The
result is a small JSON schedule file that our schedulers load with ``schedule=path``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .functional import Solver, get_solver, sample
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
    return Target(denoise, sched.noise, sched.config.prediction_type, (3, pipe.sample_size, pipe.sample_size), name,
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


def optimize_schedule(model_or_pipe, nfe: int | Sequence[int] = 6, *, out: str | None = None, samples: int = 64,
                      seed: int = 1234, reference_nfe: int = 100, max_evals: int = 80, solver: str | Solver = "pc",
                      guidance_scale: float = 1.0, batch_size: int = 64, progress: bool = True,
                      init: str = "jump", sigma_data: float | Sequence[float] = 0.5, orders: Sequence[int] | None = None,
                      validate: bool = True) -> dict:
    """Find the call sigmas for each NFE in ``nfe`` that best match a ``reference_nfe``-call trajectory.

    Model cost: ``samples * reference_nfe`` + ``max_evals * samples * N`` per NFE. Returns the schedule file's
    content (``sigmas`` per NFE and a ``report`` with the tuning RMSE before and after) and writes it to
    ``out`` when given. Use separate noise (another ``seed``) to judge the gain. ``orders`` (e.g. (2, 3)) also
    picks the predictor order per NFE (each order costs another search); the file records the choice.
    A list of ``sigma_data`` values starts one search from each "jump" schedule (multi-start).
    With ``validate`` (default) another ``samples // 2`` tuning-noise samples pick among the start schedule and
    the optimized ones, so the result does not overfit the tuning batch.
    """
    from scipy.optimize import minimize
    from tqdm.auto import tqdm

    nfes = [nfe] if isinstance(nfe, (int, np.integer)) else list(nfe)
    if not nfes or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in nfes):
        raise ValueError(f"nfe must be an integer >= 1 or a list of them, got {nfe!r}")
    if samples < 2:
        raise ValueError(f"samples must be >= 2, got {samples}")
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

    def run(sig, x, lab):
        def den(xv, s):
            calls[0] += 1
            return target.denoise(xv, float(s), lab)
        return sample(den, x.clone(), sig, solver)

    t0 = time.time()
    ref_sig = spacing("logsnr", reference_nfe, ns.sigma_min, smax)
    ref_all = _batched(lambda x, lab: run(ref_sig, x, lab), x_all, labels, batch_size)
    x_start, ref, x_val, ref_val = x_all[:samples], ref_all[:samples], x_all[samples:], ref_all[samples:]
    lab_val = labels[samples:] if labels is not None else None
    labels = labels[:samples] if labels is not None else None

    def val_rmse(sig):
        y = _batched(lambda x, lab: run(sig, x, lab), x_val, lab_val, batch_size)
        return (y.double() - ref_val.double()).pow(2).mean().sqrt().item()
    results, report = {}, {"samples": samples, "seed": seed, "reference_nfe": reference_nfe, "solver": repr(solver)}
    orders = list(orders) if orders else [solver.order]
    chosen = {}
    sds = [sigma_data] if isinstance(sigma_data, (int, float)) else list(sigma_data)
    bar = tqdm(total=max_evals * len(nfes) * len(orders) * len(sds), desc="optimize schedule", disable=not progress)
    for n in nfes:
        if n == 1:
            results[n] = [smax, 0.0]
            continue
        best = None
        for order, sd in [(o, sd) for sd in sds for o in orders]:
            init_sig = spacing(init, n, ns.sigma_min, smax, ns, sigma_data=sd).tolist()
            solver = Solver(order=order, corrector=solver.corrector, final=solver.final, final_order=solver.final_order)

            def loss(z):
                sig = _sigmas_from(z, smax)
                y = _batched(lambda x, lab: run(sig, x, lab), x_start, labels, batch_size)
                bar.update(1)
                v = (y.double() - ref.double()).pow(2).mean().sqrt().item()
                return v if math.isfinite(v) else 1e9

            z0 = _z_from(init_sig)
            before = loss(z0)
            res = minimize(loss, z0, method="Nelder-Mead", options=dict(maxfev=max(max_evals - 1, 1), xatol=1e-3, fatol=1e-6))
            after = float(min(res.fun, before))
            cands = [(z0, before), (res.x, float(res.fun))]
            for z, tune in cands:  # pick on held-out noise (or on the tuning noise without validation)
                score = val_rmse(_sigmas_from(z, smax)) if validate else tune
                if best is None or score < best[0]:
                    best = (score, z, order, before, tune, init_sig)
        score, best_z, order, before, after, init_sig = best
        results[n], chosen[n] = _sigmas_from(best_z, smax), order
        report[str(n)] = {"rmse_before": before, "rmse_after": after, "validation_rmse": score if validate else None,
                          "order": order, "init": init_sig}
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
    if out is not None:
        save_schedule_file(out, model=doc["model"], fingerprint=doc["fingerprint"], noise=ns,
                           prediction_type=doc["prediction_type"], solver=doc["solver"],
                           schedules=results, report=report, orders=chosen)
    return doc


def use_schedule(pipe, schedule, scheduler_cls=None):
    """Swap ``pipe.scheduler`` for our scheduler with ``schedule`` (a file or dict), after checking it was
    optimized for this very model (parameter fingerprint), not just the same noise schedule."""
    from .schedules import check_schedule_matches, read_schedule_file
    from .schedulers import PCMultistepScheduler

    cls = scheduler_cls or PCMultistepScheduler
    doc = read_schedule_file(schedule)
    sched = cls.from_config(pipe.scheduler.config)
    check_schedule_matches(doc, sched.noise, sched.config.prediction_type, model_fingerprint(pipe.denoiser))
    solver = doc.get("solver") or {}
    extra = {k: v for k, v in (("predictor_order", solver.get("order")), ("final_step", solver.get("final")),
                                 ("final_order", solver.get("final_order"))) if v is not None}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, schedule=doc, **extra)
    return pipe.scheduler
