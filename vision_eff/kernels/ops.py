"""``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` traces through our kernels.

``vision_eff::attention_fwd`` / ``vision_eff::attention_bwd`` take an ``impl`` string naming the
implementation ("reference" = the exact PyTorch path, "triton" = the flash kernels); the
backward is registered with ``register_autograd``. Fake (meta) implementations give shapes
only. ``vision_eff::match_tokens`` has no gradient (it returns an argmax).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference

IMPLS = ("reference", "triton")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLS}")


@torch.library.custom_op("vision_eff::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], kv_lens: Optional[Tensor],
                  scale: float, impl: str) -> tuple[Tensor, Tensor]:
    _check_impl(impl)
    if impl == "triton":
        from .triton import flash

        return flash.forward(q, k, v, bias, kv_lens, scale)
    out, lse = reference.attention_forward(q, k, v, bias, kv_lens, scale)
    return out.contiguous(), lse.float().contiguous()


@attention_fwd.register_fake
def _(q, k, v, bias, kv_lens, scale, impl):
    b, h, nq, _ = q.shape
    return q.new_empty(b, h, nq, v.shape[-1]), q.new_empty(b, h, nq, dtype=torch.float32)


@torch.library.custom_op("vision_eff::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], kv_lens: Optional[Tensor],
                  out: Tensor, lse: Tensor, scale: float, impl: str,
                  bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dbias)``; ``dbias`` is already reduced to ``bias``'s shape, or empty when not asked."""
    _check_impl(impl)
    if impl == "triton":
        if bias_grad:
            raise NotImplementedError("the triton attention backward does not compute a bias gradient")
        from .triton import flash

        dq, dk, dv = flash.backward(dout, q, k, v, bias, kv_lens, out, lse, scale)
        return dq, dk, dv, q.new_empty(0)
    lse_acc = lse.to(reference.accumulate_dtype(q.dtype))
    dq, dk, dv, ds = reference.attention_backward(dout, q, k, v, bias, kv_lens, out, lse_acc, scale)
    if bias_grad and bias is not None:
        dbias = reference.reduce_to_shape(ds, bias.shape).to(bias.dtype).contiguous()
    else:
        dbias = q.new_empty(0)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dbias


@attention_bwd.register_fake
def _(dout, q, k, v, bias, kv_lens, out, lse, scale, impl, bias_grad):
    dbias = bias.new_empty(bias.shape) if (bias_grad and bias is not None) else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, kv_lens, scale, impl = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, kv_lens, out, lse)
    ctx.scale, ctx.impl = scale, impl
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[3]


def _backward(ctx, dout, dlse):
    q, k, v, bias, kv_lens, out, lse = ctx.saved_tensors
    dq, dk, dv, dbias = attention_bwd(dout.contiguous(), q, k, v, bias, kv_lens, out, lse, ctx.scale, ctx.impl,
                                      ctx.bias_grad)
    return dq, dk, dv, (dbias if ctx.bias_grad else None), None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("vision_eff::match_tokens", mutates_args=())
def match_tokens(a: Tensor, b: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    if impl == "triton":
        from .triton import match

        return match.match_tokens(a, b)
    if impl == "cuda":
        from . import extension

        return extension.load().match_tokens(a.contiguous(), b.contiguous())
    best, idx = reference.match_tokens(a, b)
    return best.float().contiguous(), idx.contiguous()


@match_tokens.register_fake
def _(a, b, impl):
    return a.new_empty(a.shape[:-1], dtype=torch.float32), a.new_empty(a.shape[:-1], dtype=torch.long)
