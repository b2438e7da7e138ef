"""vision-eff: plugins that make diffusers pipelines and timm ViTs fast, in place and reversibly.

    import vision_eff as ve
    h = ve.apply(pipe, ve.TokenMerge(ratio=0.5), ve.StepCache(interval=3))
    ...
    h.remove()            # the model is bit-exactly what it was

Technique configs and sub-packages are imported lazily, so ``import vision_eff`` stays cheap.
"""
from __future__ import annotations

import importlib

from ._patching import Handle, PatchHandle, UnsupportedModelError, active_techniques, apply, patched, remove

__version__ = "0.1.0"

# public name -> module that defines it (resolved on first access)
_LAZY = {
    "TokenMerge": "vision_eff.tokens",
    "TokenPrune": "vision_eff.tokens",
    "StepCache": "vision_eff.cache",
    "FastAttention": "vision_eff.kernels",
    "ChunkedFeedForward": "vision_eff.layers",
    "attention": "vision_eff.kernels",
    "load_pipeline": "vision_eff.zoo",
    "keep_freed_memory": "vision_eff._timing",
}

__all__ = ["apply", "remove", "patched", "active_techniques", "Handle", "PatchHandle",
           "UnsupportedModelError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        try:
            return getattr(module, name)
        except AttributeError:
            raise AttributeError(f"vision_eff.{name} is not available in this version") from None
    raise AttributeError(f"module 'vision_eff' has no attribute {name!r}")
