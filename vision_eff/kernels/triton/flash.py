"""Launchers for the Triton flash attention kernels (called by the ``vision_eff::attention_*`` ops)."""
from __future__ import annotations

import torch
import triton
from torch import Tensor

from .common import interpreting, precision
from .flash_bwd import flash_bwd_dkdv_kernel, flash_bwd_dq_kernel
from .flash_fwd import LOG2E, flash_fwd_kernel, split_dim


def launch_config(d: int, dv: int, backward: bool = False, interpret: bool | None = None) -> dict:
    """Tile sizes and launch options: small under the interpreter, register-budgeted on a GPU
    (hand-picked for Hopper; autotuning them on a GPU is future work). Head dims are covered by two
    power-of-two pieces where that pads less than one (see ``split_dim``)."""
    interpret = interpreting() if interpret is None else interpret
    (d0, d1), (dv0, dv1) = split_dim(d), split_dim(dv)
    dims = dict(BLOCK_D0=d0, BLOCK_D1=d1, BLOCK_DV0=dv0, BLOCK_DV1=dv1)
    widest = max(d0 + d1, dv0 + dv1)
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, **dims)
    if backward:
        bm, bn, warps = (64, 64, 4) if widest <= 64 else (32, 64, 4) if widest <= 128 else (32, 32, 8)
    else:
        bm, bn, warps = (128, 64, 4) if widest <= 64 else (128, 64, 8) if widest <= 128 else (64, 32, 8)
    return dict(BLOCK_M=bm, BLOCK_N=bn, **dims, num_warps=warps, num_stages=2)


def _bias_args(bias: Tensor | None, like: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
    if bias is None:
        return like, (0, 0, 0, 0)
    strides = tuple(0 if n == 1 else s for n, s in zip(bias.shape, bias.stride()))
    return bias, strides  # type: ignore[return-value]


def _lens_arg(kv_lens: Tensor | None, like: Tensor) -> Tensor:
    return like if kv_lens is None else kv_lens.to(device=like.device, dtype=torch.int32)


def forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, kv_lens: Tensor | None,
            scale: float) -> tuple[Tensor, Tensor]:
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    out = torch.empty((b, h, nq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    bias_t, sb = _bias_args(bias, q)
    cfg = launch_config(d, dv)
    grid = (triton.cdiv(nq, cfg["BLOCK_M"]), b * h)
    flash_fwd_kernel[grid](
        q, k, v, bias_t, _lens_arg(kv_lens, q), out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *sb, lse.stride(0), lse.stride(1),
        h, nq, nk, d, dv, scale * LOG2E,
        HAS_BIAS=bias is not None, HAS_LENS=kv_lens is not None, PRECISION=precision(q.dtype), **cfg,
    )
    return out, lse


def _like(t: Tensor) -> tuple[Tensor, Tensor]:
    """``(t', grad buffer)`` with identical strides (copying ``t`` only when its layout is not dense)."""
    g = torch.empty_like(t)
    if g.stride() != t.stride():
        t = t.contiguous()
        g = torch.empty_like(t)
    return t, g


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, kv_lens: Tensor | None,
             out: Tensor, lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    b, h, nq, d = q.shape
    nk, dv_ = k.shape[2], v.shape[3]
    q, dq = _like(q)
    k, dk = _like(k)
    v, dv = _like(v)
    do = dout.contiguous()
    lse = lse.contiguous()
    delta = (do.float() * out.float()).sum(-1).contiguous()
    bias_t, sb = _bias_args(bias, q)
    lens = _lens_arg(kv_lens, q)
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *sb, lse.stride(0), lse.stride(1),
              h, nq, nk, d, dv_, scale * LOG2E, scale)
    flags = dict(HAS_BIAS=bias is not None, HAS_LENS=kv_lens is not None, PRECISION=precision(q.dtype))
    cfg = launch_config(d, dv_, backward=True)
    flash_bwd_dkdv_kernel[(triton.cdiv(nk, cfg["BLOCK_N"]), b * h)](
        q, k, v, bias_t, lens, do, lse, delta, dk, dv, *common, **flags, **cfg)
    flash_bwd_dq_kernel[(triton.cdiv(nq, cfg["BLOCK_M"]), b * h)](
        q, k, v, bias_t, lens, do, lse, delta, dq, *common, **flags, **cfg)
    return dq, dk, dv
