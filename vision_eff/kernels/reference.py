"""The exact PyTorch path: attention and token matching written as plain tensor maths.

This is the CPU implementation of the custom ops in :mod:`vision_eff.kernels.ops` and the
reference the fast kernels are tested against (run it in float64 for a ground truth).
Semantics shared by every backend:

- ``q [B, H, Nq, D]``, ``k [B, H, Nk, D]``, ``v [B, H, Nk, Dv]`` (SDPA layout);
- ``bias`` is added to the scaled scores and broadcasts from ``[B|1, H|1, Nq|1, Nk]``;
- ``kv_lens [B]`` (integer): keys ``j >= kv_lens[b]`` are padding and are ignored;
- a query row with no visible key (all keys padded or biased to -inf) returns zeros and
  ``lse = -inf``; its gradients are zero;
- ``lse`` is the float32 (float64 for float64 inputs) log-sum-exp of each score row.

Half-precision inputs are computed in float32 and rounded once at the end.
"""
from __future__ import annotations

import torch
from torch import Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def key_padding(kv_lens: Tensor, nk: int) -> Tensor:
    """Boolean ``[B, 1, 1, Nk]``: True where a key is padding."""
    return torch.arange(nk, device=kv_lens.device)[None, None, None, :] >= kv_lens.to(torch.long)[:, None, None, None]


def _scores(q: Tensor, k: Tensor, bias: Tensor | None, kv_lens: Tensor | None, scale: float) -> Tensor:
    acc = accumulate_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(acc)
    if kv_lens is not None:
        s = s.masked_fill(key_padding(kv_lens, k.shape[-2]), float("-inf"))
    return s


def _probs(s: Tensor, lse: Tensor) -> Tensor:
    finite = torch.isfinite(lse)[..., None]
    lse_safe = torch.where(finite, lse[..., None], torch.zeros_like(lse[..., None]))
    return torch.where(finite, torch.exp(s - lse_safe), torch.zeros_like(s))


def attention_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, kv_lens: Tensor | None,
                      scale: float) -> tuple[Tensor, Tensor]:
    """``(out, lse)``; ``out`` has q's dtype, ``lse`` the accumulation dtype."""
    s = _scores(q, k, bias, kv_lens, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = _probs(s, lse)
    out = torch.matmul(p, v.to(p.dtype))
    return out.to(q.dtype), lse


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, kv_lens: Tensor | None,
                       out: Tensor, lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dscores)``: ``dscores [B, H, Nq, Nk]`` is the gradient of the full bias."""
    acc = accumulate_dtype(q.dtype)
    p = _probs(_scores(q, k, bias, kv_lens, scale), lse)
    do = dout.to(acc)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, v.to(acc).transpose(-1, -2))
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, k.to(acc)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds


def reduce_to_shape(grad: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Sum a broadcast gradient back to ``shape`` (the inverse of broadcasting)."""
    lead = grad.dim() - len(shape)
    if lead > 0:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, kv_lens: Tensor | None = None,
              scale: float | None = None) -> Tensor:
    """Differentiable reference attention by autograd (no custom op): the test oracle."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = _scores(q, k, bias, kv_lens, scale)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(_probs(s, lse), v.to(s.dtype)).to(q.dtype)


def match_tokens(a: Tensor, b: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Cosine similarity of every row of ``a [B, Na, C]`` with every row of ``b [B, Nb, C]``:
    ``(max_sim [B, Na] float32, argmax [B, Na] int64)``, ties going to the lowest index."""
    acc = accumulate_dtype(a.dtype)
    an = a.to(acc)
    bn = b.to(acc)
    an = an / an.norm(dim=-1, keepdim=True).clamp_min(eps)
    bn = bn / bn.norm(dim=-1, keepdim=True).clamp_min(eps)
    sim = torch.matmul(an, bn.transpose(-1, -2))
    best, idx = sim.max(dim=-1)
    return best, idx
