"""``attention()`` and ``match_tokens()``: validate, pick a backend, run it."""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor

from . import ops
from .backends import AUTO_EXCLUDED, BACKENDS, Call

logger = logging.getLogger("vision_eff.kernels")
_LOGGED: set[tuple[str, str]] = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this call (the message says why)."""


def _normalize_bias(bias: Tensor, b: int, h: int, nq: int, nk: int, dtype: torch.dtype) -> Tensor:
    if bias.dtype == torch.bool:  # SDPA convention: True = attend
        bias = torch.zeros(bias.shape, dtype=torch.float32 if dtype == torch.float64 else dtype,
                           device=bias.device).masked_fill(~bias, float("-inf"))
    if not bias.is_floating_point():
        raise TypeError(f"bias must be a float (additive) or bool (True = attend) tensor, got {bias.dtype}")
    if bias.dim() > 4:
        raise ValueError(f"bias has {bias.dim()} dims; expected at most 4 ([B|1, H|1, Nq|1, Nk])")
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    want = (b, h, nq, nk)
    for i, (got, n, name) in enumerate(zip(bias.shape, want, ("batch", "heads", "queries", "keys"))):
        ok = got == n if i == 3 else got in (1, n)
        if not ok:
            raise ValueError(
                f"bias shape {tuple(bias.shape)} does not broadcast to [B, H, Nq, Nk] = {list(want)} "
                f"(its {name} dim is {got}; use {n}{'' if i == 3 else ' or 1'}). A per-key bias is [B, 1, 1, Nk]."
            )
    return bias


def make_call(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float | None,
              kv_lens: Tensor | Sequence[int] | None) -> Call:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, N, D] (SDPA layout), "
                             f"got {getattr(t, 'shape', type(t))}; transpose [B, N, H, D] inputs with .transpose(1, 2)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"attention needs floating-point inputs, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, nq, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h):
        raise ValueError(f"batch and head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "(repeat k/v heads for grouped-query attention)")
    if k.shape[-1] != d or k.shape[2] != v.shape[2]:
        raise ValueError(f"k must be [B, H, Nk, {d}] and v [B, H, Nk, Dv]; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    nk = k.shape[2]
    if bias is not None:
        bias = _normalize_bias(bias, b, h, nq, nk, q.dtype)
        if bias.device != q.device:
            raise ValueError(f"bias is on {bias.device}, q on {q.device}")
    if kv_lens is not None:
        if not isinstance(kv_lens, Tensor):
            kv_lens = torch.tensor(list(kv_lens), device=q.device)
        if kv_lens.shape != (b,) or kv_lens.is_floating_point():
            raise ValueError(f"kv_lens must be an integer tensor of shape [{b}] (valid keys per batch row), "
                             f"got {kv_lens.dtype} {tuple(kv_lens.shape)}")
        kv_lens = kv_lens.to(device=q.device, dtype=torch.int32)
    scale = d ** -0.5 if scale is None else float(scale)
    return Call(q, k, v, bias, kv_lens, scale)


def _log_once(name: str, reason: str, chosen: str) -> None:
    if (name, reason) in _LOGGED:
        return
    _LOGGED.add((name, reason))
    logger.info("vision_eff attention: backend %r not used (%s); using %r", name, reason, chosen)


def _auto_key(call: Call) -> tuple:
    """Everything the registered backends' checks look at (the registry's names included)."""
    bias = call.bias
    return (tuple(BACKENDS), call.q.device.type, call.q.dtype, call.q.shape[-1], call.v.shape[-1],
            None if bias is None else (bias.dtype, call.bias_needs_grad), call.kv_lens is not None)


_AUTO_CACHE: dict[tuple, tuple[str, dict[str, str]]] = {}


def choose(call: Call, backend: str = "auto") -> tuple[str, dict[str, str]]:
    """``(backend name, {skipped backend: reason})`` for a call; raises for an unusable explicit backend."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
        be = BACKENDS[backend]
        reason = be.available() or be.supports(call)
        if reason is not None:
            raise BackendUnavailableError(f"attention backend {backend!r} cannot serve this call: {reason}. "
                                          "Use backend='auto' to fall back automatically.")
        return backend, {}
    compiling = torch.compiler.is_compiling()
    key = None if compiling else _auto_key(call)
    if key is not None and key in _AUTO_CACHE:
        return _AUTO_CACHE[key]
    skipped: dict[str, str] = {}
    chosen = "sdpa"
    candidates = sorted((be for n, be in BACKENDS.items() if n not in AUTO_EXCLUDED), key=lambda be: be.rank(call))
    for be in candidates:
        reason = be.available() or be.supports(call)
        if reason is None:
            chosen = be.name
            break
        skipped[be.name] = reason
    if key is not None:
        _AUTO_CACHE[key] = (chosen, skipped)
    return chosen, skipped


def attention(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = None, scale: float | None = None,
              backend: str = "auto", kv_lens: Tensor | Sequence[int] | None = None) -> Tensor:
    """Scaled dot-product attention with an additive bias and key padding, ``softmax(q k^T * scale + bias) v``.

    Args:
        q, k, v: ``[B, H, Nq, D]``, ``[B, H, Nk, D]``, ``[B, H, Nk, Dv]`` (SDPA layout); float16, bfloat16,
            float32 (float64 on the PyTorch paths); any head dim up to 256.
        bias: additive, broadcastable from ``[B|1, H|1, 1, Nk]`` (per key, e.g. token merging's log of
            token sizes) or ``[B|1, H|1, Nq, Nk]``; a bool tensor means True = attend. Differentiable.
        scale: defaults to ``D ** -0.5``.
        backend: ``"auto"`` (fastest backend that supports the call, else PyTorch SDPA; the reason is
            logged once), or one of ``"triton"``, ``"sdpa"``, ``"xformers"``, ``"reference"`` (raises
            :class:`BackendUnavailableError` with the reason when it cannot serve the call).
        kv_lens: ``[B]`` integer count of valid keys per batch row (variable token counts packed with
            padding); keys past it are ignored. A row with no visible key returns zeros.
    """
    call = make_call(q, k, v, bias, scale, kv_lens)
    name, skipped = choose(call, backend)
    if skipped and not torch.compiler.is_compiling():
        for skipped_name, reason in skipped.items():
            _log_once(skipped_name, reason, name)
    return BACKENDS[name].run(call)


# --- fused token matching -----------------------------------------------------------------------
def _match_impl(a: Tensor, backend: str) -> str:
    from .backends import _ENV

    reasons = {}
    if a.device.type == "cuda" and _ENV["triton"]:
        reasons["triton"] = None
    elif not _ENV["triton"]:
        reasons["triton"] = "triton is not installed"
    elif a.device.type == "cpu" and _ENV["interpret"]:
        reasons["triton"] = None
    else:
        reasons["triton"] = f"tensors are on {a.device.type}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1)"
    if a.device.type != "cuda":
        reasons["cuda"] = f"tensors are on {a.device.type}; the CUDA C++ kernel needs CUDA tensors"
    elif a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons["cuda"] = f"dtype {a.dtype} is not supported"
    else:
        from . import extension

        reasons["cuda"] = extension.unavailable_reason()
    reasons["reference"] = None
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32) and reasons["triton"] is None:
        reasons["triton"] = f"dtype {a.dtype} is not supported"
    if backend == "auto":
        return next(n for n in ("triton", "cuda", "reference") if reasons[n] is None)
    if backend not in reasons:
        raise ValueError(f"unknown match_tokens backend {backend!r}; choose 'auto', 'triton', 'cuda' or 'reference'")
    if reasons[backend] is not None:
        raise BackendUnavailableError(f"match_tokens backend {backend!r} cannot serve this call: {reasons[backend]}")
    return backend


def match_tokens(a: Tensor, b: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """For each row of ``a [B, Na, C]`` its most cosine-similar row of ``b [B, Nb, C]``, without
    materialising the ``Na x Nb`` matrix on the fused backends.

    Returns ``(max_sim [B, Na] float32, argmax [B, Na] int64)``; ties resolve to the lowest index.
    """
    if a.dim() == 2 and b.dim() == 2:
        s, i = match_tokens(a[None], b[None], backend=backend)
        return s[0], i[0]
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"match_tokens needs a [B, Na, C] and b [B, Nb, C], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError("a and b must share dtype and device")
    if b.shape[1] == 0:
        raise ValueError("b has no tokens to match against")
    return ops.match_tokens(a, b, _match_impl(a, backend))
