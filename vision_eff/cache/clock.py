"""The denoising-step index, taken from the pipeline's own loop.

A pipeline calls ``scheduler.set_timesteps`` once before its loop and ``scheduler.step`` once per
loop iteration, whatever the solver (DDIM, DPM-Solver++ multistep, Heun's two model calls per
step, vision_eff's samplers). The clock wraps those two methods on the scheduler *instance*:
``index`` is the number of ``step`` calls since the last ``set_timesteps``, i.e. the loop index
``i`` that ``callback_on_step_end`` also sees, and ``run`` counts ``set_timesteps`` calls (a new
run invalidates every cache). A scheduler swapped in after ``apply`` is picked up at the next model
call. Applied to a bare model (no scheduler), the clock counts model calls and starts a new run when
the timestep goes up (this reads the timestep on the host once per call).
"""
from __future__ import annotations

from typing import Any

import torch


class Clock:
    """Loop index and run counter for one patched denoiser."""

    def __init__(self) -> None:
        self.index = 0
        self.run = 0
        self.scheduler: Any = None
        self._last_t: float | None = None

    def new_run(self) -> None:
        self.index = 0
        self.run += 1

    def __repr__(self) -> str:
        return f"Clock(run={self.run}, index={self.index})"


def _hook_scheduler(clock: Clock, sched: Any, handle: Any) -> None:
    set_timesteps, step = sched.set_timesteps, sched.step

    def set_timesteps_hooked(*args, **kwargs):
        out = set_timesteps(*args, **kwargs)
        clock.new_run()
        return out

    def step_hooked(*args, **kwargs):
        out = step(*args, **kwargs)
        clock.index += 1
        return out

    handle.set_attr(sched, "set_timesteps", set_timesteps_hooked)
    handle.set_attr(sched, "step", step_hooked)
    clock.scheduler = sched


def _timestep(args: tuple, kwargs: dict) -> float | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        return None
    if torch.is_tensor(t):
        return float(t.flatten()[0]) if t.numel() else None
    return float(t)


def install_clock(obj: Any, model: torch.nn.Module, handle: Any) -> Clock:
    """A clock for ``model`` (the denoiser of ``obj``); its pre-hook runs before the caller's hooks."""
    clock = Clock()
    pipe = obj if obj is not model and hasattr(getattr(obj, "scheduler", None), "step") else None
    if pipe is not None:
        _hook_scheduler(clock, pipe.scheduler, handle)

    def pre_hook(module, args, kwargs):
        if pipe is not None:
            if pipe.scheduler is not clock.scheduler:  # swapped after apply: its set_timesteps already ran
                _hook_scheduler(clock, pipe.scheduler, handle)
                clock.new_run()
            return None
        t = _timestep(args, kwargs)
        if clock._last_t is None or (t is not None and t > clock._last_t):
            clock.new_run()
        else:
            clock.index += 1
        clock._last_t = t
        return None

    handle.add_hook(model.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True))
    return clock
