"""Attention and token-matching kernels with a backend registry and an exact PyTorch fallback.

    from vision_eff.kernels import attention, match_tokens
    out = attention(q, k, v, bias=log_sizes[:, None, None, :])      # [B, H, N, D], per-key bias
    best, idx = match_tokens(a, b)                                   # fused cosine max/argmax

``FastAttention(backend="auto")`` routes a diffusers pipeline's or a timm ViT's attention
through :func:`attention` (``vision_eff.apply(model, FastAttention())``, undone by ``remove()``).
Triton and the compiled extension ``vision_eff._C`` are imported lazily.
"""
from __future__ import annotations

from .api import BackendUnavailableError, attention, choose, make_call, match_tokens
from .backends import BACKENDS, Backend, register_backend

__all__ = ["attention", "match_tokens", "FastAttention", "FastAttnProcessor", "BackendUnavailableError",
           "BACKENDS", "Backend",
           "register_backend", "choose", "make_call", "available_backends"]


def available_backends() -> dict[str, str | None]:
    """Every registered attention backend -> None if usable in this process, else the reason."""
    return {name: be.available() for name, be in BACKENDS.items()}


def __getattr__(name: str):
    if name == "FastAttention":
        from .technique import FastAttention

        return FastAttention
    if name == "FastAttnProcessor":
        from .adapters import FastAttnProcessor

        return FastAttnProcessor
    raise AttributeError(f"module 'vision_eff.kernels' has no attribute {name!r}")
