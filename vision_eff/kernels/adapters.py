"""Routing a model's attention into :func:`vision_eff.kernels.attention`, without copying any forward.

The attention modules of diffusers (``Attention`` with ``AttnProcessor2_0``, as in
``UNet2DConditionModel`` and ``DiTTransformer2DModel``; ``AttentionModuleMixin`` modules whose
processors go through diffusers' attention dispatcher with its native backend, as in Flux) and
of timm (``Attention`` and every timm attention with the ``fused_attn`` switch) all end in
``torch.nn.functional.scaled_dot_product_attention``. The adapter wraps each such module's own
forward (on the instance, through the patch handle) so that, while that forward runs, a
``TorchFunctionMode`` hands the SDPA call to our dispatcher: the mask becomes the additive bias
(bool masks: True = attend), ``scale`` passes through. Calls we do not implement (dropout while
training, ``is_causal``, grouped-query heads) go to the original SDPA unchanged.

Wrapping the module forward (rather than installing a processor object) keeps whatever processor
the model has, including diffusers' signature introspection of ``processor.__call__``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .api import attention

_SDPA = F.scaled_dot_product_attention


def _sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


class SDPARedirect(TorchFunctionMode):
    """While active, ``F.scaled_dot_product_attention`` calls that we implement go to ``attention()``."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.calls = 0  # how many SDPA calls were redirected (for tests and diagnostics)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            q, k, v, mask, dropout_p, is_causal, scale, enable_gqa = _sdpa_args(*args, **kwargs)
            servable = (q.dim() == 4 and k.dim() == 4 and not is_causal
                        and not (dropout_p > 0.0) and q.shape[1] == k.shape[1])
            if servable:
                self.calls += 1
                return attention(q, k, v, bias=mask, scale=scale, backend=self.backend)
        return func(*args, **kwargs)


def redirected(forward: Callable, backend: str) -> Callable:
    """``forward`` run under :class:`SDPARedirect` (same signature, for introspection)."""

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any):
        with SDPARedirect(backend):
            return forward(*args, **kwargs)

    return run


class FastAttnProcessor:
    """A diffusers attention processor: runs ``inner`` (default ``AttnProcessor2_0``) with its SDPA
    call sent to :func:`attention`. For users of diffusers' own API::

        unet.set_attn_processor(FastAttnProcessor())

    ``vision_eff.apply(model, FastAttention())`` does the same reversibly, for any processor."""

    def __init__(self, inner: Any = None, backend: str = "auto"):
        if inner is None:
            from diffusers.models.attention_processor import AttnProcessor2_0

            inner = AttnProcessor2_0()
        self.inner = inner
        self.backend = backend

    def __call__(self, attn: nn.Module, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args: Any, **kwargs: Any):
        with SDPARedirect(self.backend):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


# --- which modules ---------------------------------------------------------------------------------
def _diffusers_classes() -> tuple[type, ...]:
    try:
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention
    except ImportError:  # diffusers is optional for timm users
        return ()
    return (Attention, AttentionModuleMixin)


def is_diffusers_attention(m: nn.Module) -> bool:
    classes = _diffusers_classes()
    return bool(classes) and isinstance(m, classes) and hasattr(m, "processor")


def is_timm_attention(m: nn.Module) -> bool:
    return type(m).__module__.startswith("timm.") and isinstance(getattr(m, "fused_attn", None), bool)


def attention_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in root.named_modules():
        if is_diffusers_attention(m) or is_timm_attention(m):
            yield name, m


def innermost_processor(m: nn.Module) -> Any:
    """The processor that does the work: wrappers that keep the wrapped one as ``.inner`` (e.g. token
    merging's) are looked through."""
    proc = getattr(m, "processor", None)
    seen = 0
    while "inner" in getattr(proc, "__dict__", {}) and seen < 16:
        proc, seen = proc.__dict__["inner"], seen + 1
    return proc


def uses_dispatcher(m: nn.Module) -> bool:
    """A diffusers processor that calls ``dispatch_attention_fn`` carries an ``_attention_backend``."""
    return hasattr(innermost_processor(m), "_attention_backend")


def native_backend() -> Any:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName.NATIVE


def module_reason(m: nn.Module) -> str | None:
    """Why this attention module cannot be routed (None when it can)."""
    if is_diffusers_attention(m):
        proc = innermost_processor(m)
        # diffusers' convention: the "...2_0" processors are the ones that call SDPA
        if not uses_dispatcher(m) and not type(proc).__name__.endswith("2_0"):
            return (f"its processor {type(proc).__name__} is not one that calls SDPA "
                    "(use AttnProcessor2_0: model.set_attn_processor(AttnProcessor2_0()))")
    return None


def route(m: nn.Module, handle: Any, backend: str) -> None:
    """Route one module's SDPA calls to ``attention()``, recording every change on ``handle``."""
    if is_timm_attention(m) and not m.fused_attn:
        handle.set_attr(m, "fused_attn", True)  # the SDPA branch of timm's own forward
    if is_diffusers_attention(m) and uses_dispatcher(m):
        handle.set_attr(innermost_processor(m), "_attention_backend", native_backend())  # dispatcher -> SDPA
    handle.wrap_forward(m, lambda forward: redirected(forward, backend))
