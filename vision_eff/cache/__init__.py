"""Step caching: reuse features across denoising steps.

    import vision_eff as ve
    h = ve.apply(pipe, ve.StepCache(interval=3))            # UNet: DeepCache-style deep-branch reuse
    h = ve.apply(pipe, ve.StepCache(threshold=0.1, order=1)) # DiT: adaptive block-residual caching
    h.remove()
    steps = calibrate_full_steps(pipe, 8, run=lambda: pipe(...))   # non-uniform schedule from one run
    h = ve.apply(pipe, ve.StepCache(full_steps=steps, order=1))

The step index comes from the pipeline's own loop (:mod:`.clock`), so every scheduler works.
"""
from .calibrate import calibrate_full_steps, drift_per_step, full_steps_from_drift
from .clock import Clock
from .technique import StepCache

__all__ = ["StepCache", "Clock", "calibrate_full_steps", "drift_per_step", "full_steps_from_drift"]
