"""The backend registry: each backend says whether it can serve a call, and why not.

A backend is a name, an availability check for this process (``available() -> reason|None``),
a capability check for one call (``supports(call) -> reason|None``), a preference for
``"auto"`` (``rank(call)``, lower wins) and ``run(call)``. ``"auto"`` tries backends in rank
order and falls back to PyTorch SDPA. Third-party backends can be added with
:func:`register_backend`.

The ranks are provisional: no GPU measurement exists yet (cuda/results/ is where the table
goes). Until then "auto" prefers the Triton kernel exactly where FlashAttention-style SDPA
kernels are known to be weak: an additive bias, key padding, or a head dim that is not a
power of two; plain attention at D=64/128 goes to SDPA.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops, reference

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Call:
    """One attention call after validation; ``bias`` is 4-D (broadcastable) or None."""

    q: Tensor
    k: Tensor
    v: Tensor
    bias: Tensor | None
    kv_lens: Tensor | None
    scale: float

    @property
    def bias_needs_grad(self) -> bool:
        return torch.is_grad_enabled() and self.bias is not None and self.bias.requires_grad


@dataclass(frozen=True)
class Backend:
    name: str
    available: Callable[[], str | None]
    supports: Callable[[Call], str | None]
    run: Callable[[Call], Tensor]
    rank: Callable[[Call], int]


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


# --- what this process has (computed once, without importing triton/xformers) ------------------
def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


_ENV = {
    "triton": _has("triton"),
    "xformers": _has("xformers"),
    "cuda": torch.cuda.is_available(),
    "interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
}


def _triton_available() -> str | None:
    if not _ENV["triton"]:
        return "triton is not installed (pip install triton)"
    if not (_ENV["cuda"] or _ENV["interpret"]):
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run it on CPU, slowly)"
    return None


def _triton_supports(c: Call) -> str | None:
    if c.q.device.type != "cuda" and not (_ENV["interpret"] and c.q.device.type == "cpu"):
        return f"tensors are on {c.q.device.type}, the Triton kernels need CUDA tensors"
    if c.q.dtype not in FLOATS:
        return f"dtype {c.q.dtype} is not supported (float16, bfloat16, float32)"
    if max(c.q.shape[-1], c.v.shape[-1]) > 256:
        return f"head dim {max(c.q.shape[-1], c.v.shape[-1])} > 256"
    if c.bias_needs_grad:
        return "the bias requires a gradient, which the Triton backward does not compute"
    if c.bias is not None and not c.bias.is_floating_point():
        return "the bias must be a float tensor"
    return None


def _triton_rank(c: Call) -> int:
    d = c.q.shape[-1]
    special = c.bias is not None or c.kv_lens is not None or d & (d - 1) != 0
    return 0 if special else 20


def _run_custom(impl: str) -> Callable[[Call], Tensor]:
    def run(c: Call) -> Tensor:
        return ops.attention_fwd(c.q, c.k, c.v, c.bias, c.kv_lens, float(c.scale), impl)[0]

    return run


def sdpa_mask(c: Call) -> Tensor | None:
    """The bias and the key padding as one SDPA ``attn_mask`` in the query's dtype."""
    mask = None if c.bias is None else c.bias.to(c.q.dtype)
    if c.kv_lens is not None:  # a row with no key attends to key 0 here and is zeroed by _sdpa_run (no NaN)
        pad = reference.key_padding(c.kv_lens.clamp_min(1), c.k.shape[-2])
        neg = torch.zeros(pad.shape, dtype=c.q.dtype, device=c.q.device).masked_fill(pad, float("-inf"))
        mask = neg if mask is None else mask + neg
    return mask


def _sdpa_run(c: Call) -> Tensor:
    out = F.scaled_dot_product_attention(c.q, c.k, c.v, attn_mask=sdpa_mask(c), scale=c.scale)
    if c.kv_lens is not None:  # rows with no visible key: zeros, as every backend defines them
        out = torch.where((c.kv_lens == 0)[:, None, None, None], torch.zeros_like(out), out)
    return out


def _xformers_available() -> str | None:
    if not _ENV["xformers"]:
        return "xformers is not installed (optional: pip install xformers)"
    if not _ENV["cuda"]:
        return "no CUDA device"
    return None


def _xformers_supports(c: Call) -> str | None:
    if c.q.device.type != "cuda":
        return "xformers needs CUDA tensors"
    if c.q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {c.q.dtype}: the xformers path is used for float16/bfloat16 only"
    if c.kv_lens is not None:
        return "key padding (kv_lens) is not routed to xformers"
    return None


def _xformers_run(c: Call) -> Tensor:
    import xformers.ops as xops

    bias = None
    if c.bias is not None:
        b, h, nq, nk = *c.q.shape[:3], c.k.shape[2]
        bias = c.bias.to(c.q.dtype).expand(b, h, nq, nk)
    q, k, v = (t.transpose(1, 2) for t in (c.q, c.k, c.v))
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=c.scale).transpose(1, 2)


def _always(_: Call | None = None) -> None:
    return None


def _reference_supports(c: Call) -> str | None:
    if c.q.dtype not in (*FLOATS, torch.float64):
        return f"dtype {c.q.dtype} is not a floating type"
    return None


register_backend(Backend("triton", _triton_available, _triton_supports, _run_custom("triton"), _triton_rank))
register_backend(Backend("xformers", _xformers_available, _xformers_supports, _xformers_run, lambda c: 15))
register_backend(Backend("sdpa", _always, _always, _sdpa_run, lambda c: 10))
# the exact PyTorch path behind the custom op: explicit only (SDPA is the faster fallback)
register_backend(Backend("reference", _always, _reference_supports, _run_custom("reference"), lambda c: 100))

AUTO_EXCLUDED = ("reference",)
