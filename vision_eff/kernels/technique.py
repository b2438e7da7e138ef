"""``FastAttention(backend="auto")``: route a diffusers pipeline's / timm model's attention through
:func:`vision_eff.kernels.attention`, reversibly (``vision_eff.apply`` / ``remove``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._patching import PatchHandle, denoiser_of
from . import adapters
from .backends import BACKENDS


@dataclass(frozen=True)
class FastAttention:
    """Send every attention call of a model to our kernels.

    ``backend="auto"`` picks, per call, the fastest backend that supports it (falling back to
    PyTorch SDPA); a named backend (``"triton"``, ``"sdpa"``, ``"xformers"``, ``"reference"``) is
    checked for availability when applied and raises at call time if it cannot serve a call.
    Works on diffusers pipelines / UNet2DConditionModel / DiT and dispatcher-based transformers
    (their processors are switched to diffusers' native backend while applied, so the SDPA call
    exists to be routed), and on timm models (``Attention`` and other attentions with ``fused_attn``,
    which is switched on while applied). Stacks with token merging in either order.
    """

    backend: str = "auto"

    @property
    def key(self) -> str:
        return "attention"

    def supports(self, obj: Any) -> str | None:
        if self.backend != "auto":
            if self.backend not in BACKENDS:
                return f"unknown backend {self.backend!r}; use 'auto' or one of {sorted(BACKENDS)}"
            why = BACKENDS[self.backend].available()
            if why is not None:
                return f"backend {self.backend!r} is unavailable here: {why} (use backend='auto')"
        try:
            root = denoiser_of(obj)
        except TypeError as e:
            return str(e)
        modules = list(adapters.attention_modules(root))
        if not modules:
            return "it has no diffusers or timm attention modules"
        for name, m in modules:
            why = adapters.module_reason(m)
            if why is not None:
                return f"attention module {name!r}: {why}"
        return None

    def apply(self, obj: Any, handle: PatchHandle) -> None:
        names = []
        for name, m in adapters.attention_modules(denoiser_of(obj)):
            adapters.route(m, handle, self.backend)
            names.append(name)
        handle.state["modules"] = names
