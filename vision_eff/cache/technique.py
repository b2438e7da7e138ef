"""The :class:`StepCache` config: which features are reused across denoising steps, and when."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._validate import check_int as _check_int

__all__ = ["StepCache"]


@dataclass(frozen=True)
class StepCache:
    """Feature reuse across denoising steps.

    UNets (DeepCache-style): the deep branch (everything between the outermost skip connections)
    is computed on full steps and replayed on the others, where only the shallow branch runs.
    Transformers (first-block / DBCache-style): the first ``probe`` blocks always run; the residual
    of the remaining blocks is computed on full steps and reused (optionally extrapolated) on others.

    interval: with ``threshold=None``, a full step every ``interval`` steps; with a threshold, the
        longest gap between full steps. ``interval=1`` computes every step (the cache is off).
    threshold: adaptive rule. A step reuses the cache when the relative L1 change of a probe since the
        last full step is below ``threshold`` for every sample (UNet probe: the ``conv_in`` features;
        transformer probe: the residual of the first ``probe`` blocks). None: fixed interval.
    warmup: the first ``warmup`` steps of every run are full.
    branch: UNet only: skip connections kept in the shallow branch beyond ``conv_in``'s
        (0 = the shallowest and fastest, like DeepCache's default; larger is slower and closer).
    probe: transformers only: leading blocks that always run (and whose residual drives ``threshold``);
        0 (fixed interval only) runs no block on cached steps.
    full_steps: fixed schedule only: the step indices (of the pipeline's loop) computed in full, a
        non-uniform schedule (e.g. from :func:`vision_eff.cache.calibrate_full_steps`); steps after the
        last listed one fall back to a full step every ``interval`` steps. (``warmup`` steps stay full.)
    order: 0 reuses the cached features (UNet: deep-branch outputs; transformers: the residual), 1
        extrapolates them linearly from the last two full steps (TaylorSeer-style first order).
    """

    interval: int = 3
    threshold: float | None = None
    warmup: int = 1
    branch: int = 0
    probe: int = 1
    order: int = 0
    full_steps: tuple[int, ...] | None = None

    key = "step_cache"

    def __post_init__(self) -> None:
        _check_int("interval", self.interval, 1)
        if self.threshold is not None and (isinstance(self.threshold, bool)
                                           or not isinstance(self.threshold, (int, float)) or self.threshold <= 0):
            raise ValueError(f"threshold must be a positive number (or None for a fixed interval), got {self.threshold!r}")
        _check_int("warmup", self.warmup, 0)
        _check_int("branch", self.branch, 0)
        _check_int("probe", self.probe, 0)
        if self.probe == 0 and self.threshold is not None:
            raise ValueError("probe=0 caches every block, which leaves nothing to measure drift on: "
                             "use probe >= 1 with a threshold, or threshold=None for a fixed interval")
        if self.full_steps is not None:
            if self.threshold is not None:
                raise ValueError("full_steps is a fixed schedule: pass threshold=None with it")
            steps = tuple(self.full_steps) if isinstance(self.full_steps, (list, tuple)) else None
            if not steps or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in steps):
                raise ValueError(f"full_steps must be a non-empty sequence of step indices >= 0, got {self.full_steps!r}")
            object.__setattr__(self, "full_steps", tuple(sorted(set(steps))))
        if self.order not in (0, 1) or isinstance(self.order, bool):
            raise ValueError(f"order must be 0 (reuse) or 1 (linear extrapolation), got {self.order!r}")

    def supports(self, obj: Any) -> str | None:
        from .._patching import UnsupportedModelError, denoiser_of
        from ..tokens.diffusers import model_kind

        try:
            model = denoiser_of(obj)
        except UnsupportedModelError as exc:
            return str(exc)
        kind = model_kind(model)
        if kind == "unet":
            from .unet import plan_unet

            try:
                plan_unet(model, self.branch)
            except ValueError as exc:
                return str(exc)
            return None
        if kind is not None:
            from .blocks import transformer_blocks

            n = len(transformer_blocks(model))
            if n <= self.probe:
                return f"{type(model).__name__} has {n} transformer blocks; probe={self.probe} must leave at least one to cache"
            return None
        return (f"{type(model).__name__} is not a supported denoiser: StepCache works on UNet2DConditionModel and on "
                "DiT/PixArt/SD3/Flux transformers")

    def apply(self, obj: Any, handle: Any) -> None:
        from .._patching import denoiser_of
        from ..tokens.diffusers import model_kind
        from .clock import install_clock

        model = denoiser_of(obj)
        clock = install_clock(obj, model, handle)
        handle.state["clock"] = clock
        if model_kind(model) == "unet":
            from .unet import apply_unet

            apply_unet(model, self, handle, clock)
        else:
            from .blocks import apply_blocks

            apply_blocks(model, self, handle, clock)
