"""First-block / DBCache-style residual caching for diffusers transformers (DiT, PixArt, SD3, Flux).

The first ``probe`` blocks always run (``probe=0`` with a fixed interval: none do, and the cached
residual is that of the whole stack, as TaylorSeer-style caches do). On a full step the remaining blocks run too and their total
residual ``R = h_out - h_probe`` is kept; on a cached step they are skipped (each returns its input)
and the last one returns ``h_probe + R`` (``order=1``: ``R`` extrapolated linearly from the last two
full steps). With a ``threshold`` a step is cached when the probe blocks' residual has drifted by less
than the threshold (relative L1, every sample) since the last full step. Only block forwards are
wrapped; the transformer's own forward and the blocks' maths are untouched.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .schedule import Schedule, Slot, blend, extrapolate, push_history

__all__ = ["transformer_blocks", "apply_blocks"]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks += list(getattr(model, name, None) or [])
    return blocks


def _indices(block: nn.Module) -> tuple[int, int | None]:
    """Positions of hidden_states / encoder_hidden_states in a block's tuple output (diffusers' registry)."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry

        md = TransformerBlockRegistry.get(type(block))
        return md.return_hidden_states_index, md.return_encoder_hidden_states_index
    except Exception:  # not registered: a block that returns hidden_states (tensor or first item)
        return 0, None


def _inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
    h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return h, enc


def _pack(length: int | None, h: torch.Tensor, enc: Any, idx: tuple[int, int | None]) -> Any:
    """A block's output in its own format (length: None for a tensor, else the tuple's length)."""
    if length is None:
        return h
    items: list[Any] = [None] * length
    items[idx[0]] = h
    if idx[1] is not None:
        items[idx[1]] = enc
    return tuple(items)


def _hidden(out: Any, idx: tuple[int, int | None]) -> torch.Tensor:
    return out if torch.is_tensor(out) else out[idx[0]]


def _estimate(slot: Slot, order: int) -> torch.Tensor:
    return slot.residual[1] if order == 0 else extrapolate(slot.residual, slot.index)


def apply_blocks(model: nn.Module, cfg: Any, handle: Any, clock: Any) -> None:
    blocks = transformer_blocks(model)
    p = cfg.probe
    sched = Schedule(cfg, clock)
    cur: dict[str, Any] = {"slot": None, "h0": None, "hp": None, "fmt": {}}

    def pre_hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        cur["slot"] = sched.start((tuple(x.shape), x.dtype, x.device))

    handle.add_hook(model.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def head(j: int, idx):
        def wrap(orig):
            def forward(*args, **kwargs):
                if j == 0:
                    cur["h0"] = _inputs(args, kwargs)[0]
                out = orig(*args, **kwargs)
                if j == p - 1 and cur["slot"] is not None:
                    cur["hp"] = _hidden(out, idx)
                    sched.decide(cur["slot"], cur["hp"] - cur["h0"])
                return out
            return forward
        return wrap

    def body(j: int, idx, last: bool):
        def wrap(orig):
            def forward(*args, **kwargs):
                slot = cur["slot"]
                if slot is None:
                    return orig(*args, **kwargs)
                if j == 0:  # probe=0 (fixed interval only): the residual of every block is cached
                    cur["hp"] = _inputs(args, kwargs)[0]
                if slot.full or slot.residual is None:
                    out = orig(*args, **kwargs)
                    cur["fmt"][j] = None if torch.is_tensor(out) else len(out)
                    if not last:
                        return out
                    h = _hidden(out, idx)
                    if slot.mask is not None and slot.residual is not None:
                        h = blend(slot.mask, h, cur["hp"] + _estimate(slot, cfg.order))
                    slot.residual = push_history(slot.residual, h - cur["hp"], slot.index, slot.mask)
                    return h if torch.is_tensor(out) else tuple(h if k == idx[0] else o for k, o in enumerate(out))
                h, enc = _inputs(args, kwargs)
                if last:
                    h = cur["hp"] + _estimate(slot, cfg.order)
                return _pack(cur["fmt"][j], h, enc, idx)
            return forward
        return wrap

    for j, blk in enumerate(blocks):
        idx = _indices(blk)
        if j < p:
            handle.wrap_forward(blk, head(j, idx))
        else:
            handle.wrap_forward(blk, body(j, idx, j == len(blocks) - 1))
    handle.state["schedule"] = sched
