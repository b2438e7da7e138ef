"""Non-uniform full-step schedules for :class:`StepCache`, calibrated from one uncached run.

The features a step cache reuses do not change at an even pace across a run: on the built-in UNet the
deep branch's output moves about four times more per step late in the run than early. A fixed interval
spends as many full steps where little changes as where much does. ``calibrate_full_steps`` runs the
model once without caching, measures the per-step relative change ``d_i`` of exactly the feature the
cache would reuse (UNet: the deep branch's output that the shallow branch reads; transformer: the
residual of the cached blocks), and places the full steps so that each gap between them covers an
equal share of ``sum(d_i ** alpha)``. ``alpha=0`` gives the uniform schedule, ``alpha=1`` equal drift
per gap; ``alpha=0.5`` (the default) sits between the two and did best on the built-in UNet.

    steps = calibrate_full_steps(pipe, 8, run=lambda: pipe(class_labels=labels, num_inference_steps=50))
    handle = ve.apply(pipe, StepCache(full_steps=steps, order=1))

The schedule belongs to a number of inference steps and a scheduler; calibrate again when either changes.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .._validate import check_int

__all__ = ["drift_per_step", "full_steps_from_drift", "calibrate_full_steps"]


def full_steps_from_drift(drift: Sequence[float] | torch.Tensor, num_full: int, alpha: float = 0.5) -> tuple[int, ...]:
    """Step indices of ``num_full`` full steps for a run of ``len(drift) + 1`` steps.

    ``drift[i]`` is the change of the cached feature from step ``i`` to ``i + 1``. Step 0 is always full;
    full step ``k`` is the first step by which the cumulative ``drift ** alpha`` reaches ``k / num_full``
    of its total.
    """
    check_int("num_full", num_full, 1)
    d = torch.as_tensor(drift, dtype=torch.float64).flatten()
    if not torch.isfinite(d).all() or (d < 0).any():
        raise ValueError("drift must be finite and non-negative")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    steps = len(d) + 1
    if num_full > steps:
        raise ValueError(f"num_full={num_full} is more than the run's {steps} steps")
    w = d.clamp_min(1e-12) ** alpha
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), w.cumsum(0)])  # cum[i]: drift before step i
    chosen = {0} | {int(torch.searchsorted(cum, cum[-1] * k / num_full)) for k in range(1, num_full)}
    while len(chosen) < num_full:  # ties: split the widest gap
        s = sorted(chosen) + [steps]
        a, b = max(zip(s, s[1:]), key=lambda ab: ab[1] - ab[0])
        chosen.add((a + b) // 2)
    return tuple(sorted(chosen))


def _first_tensor(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return next(x for x in out if torch.is_tensor(x))


def drift_per_step(obj: Any, run: Callable[[], Any], branch: int = 0, probe: int = 1) -> torch.Tensor:
    """Relative change of the cached feature between consecutive steps of one uncached ``run()``.

    ``obj`` is the pipeline (or denoiser) ``run`` calls; ``branch`` / ``probe`` as in :class:`StepCache`.
    Returns ``d`` of length steps - 1: the mean over samples (and over the model calls of a step)
    of ``||f[i+1] - f[i]|| / ||f[i+1]||``.
    """
    from .._patching import PatchHandle, denoiser_of
    from ..tokens.diffusers import model_kind
    from .blocks import _hidden, _indices, _inputs, transformer_blocks
    from .clock import install_clock

    model = denoiser_of(obj)
    kind = model_kind(model)
    handle = PatchHandle(obj)
    clock = install_clock(obj, model, handle)
    feats: dict[int, list[torch.Tensor]] = {}

    def keep(t: torch.Tensor) -> None:
        feats.setdefault(clock.index, []).append(t.detach().float().flatten(1).clone())

    try:
        if kind == "unet":
            from .unet import plan_unet

            handle.add_hook(plan_unet(model, branch)[-1].register_forward_hook(lambda m, a, o: keep(_first_tensor(o))))
        elif kind is not None:
            blocks = transformer_blocks(model)
            if probe >= len(blocks):
                raise ValueError(f"probe={probe} leaves no block to cache in this {len(blocks)}-block model")
            start: list[torch.Tensor] = []
            handle.add_hook(blocks[probe].register_forward_pre_hook(
                lambda m, a, k: start.__setitem__(slice(None), [_inputs(a, k)[0]]), with_kwargs=True))
            handle.add_hook(blocks[-1].register_forward_hook(
                lambda m, a, o: keep(_hidden(o, _indices(m)) - start[0])))
        else:
            raise ValueError(f"{type(model).__name__} is not a denoiser StepCache supports")
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    order = sorted(feats)
    if len(order) < 2 or order != list(range(len(order))):
        raise RuntimeError(f"run() made model calls at steps {order[:5]}...; it must run one whole denoising loop")
    return torch.stack([torch.stack([((y - x).norm(dim=1) / y.norm(dim=1).clamp_min(1e-12)).mean()
                                     for x, y in zip(feats[i], feats[i + 1])]).mean() for i in order[:-1]])


def calibrate_full_steps(obj: Any, num_full: int, run: Callable[[], Any], alpha: float = 0.5,
                         branch: int = 0, probe: int = 1) -> tuple[int, ...]:
    """``num_full`` full-step indices for :class:`StepCache` (``full_steps=``) from one uncached ``run()``."""
    return full_steps_from_drift(drift_per_step(obj, run, branch=branch, probe=probe), num_full, alpha)
