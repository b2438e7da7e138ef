"""Step caching: reuse features across denoising steps.

    import vision_eff as ve
    h = ve.apply(pipe, ve.StepCache(interval=3))            # UNet: DeepCache-style deep-branch reuse
    h = ve.apply(pipe, ve.StepCache(threshold=0.1, order=1)) # DiT: adaptive block-residual caching
    h.remove()

The step index comes from the pipeline's own loop (:mod:`.clock`), so every scheduler works.
"""
from .clock import Clock
from .technique import StepCache

__all__ = ["StepCache", "Clock"]
