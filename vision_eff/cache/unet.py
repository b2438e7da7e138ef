"""DeepCache-style step caching for ``UNet2DConditionModel``.

The UNet is read as a chain of *units* that produce skip connections on the way down
(``conv_in``, every resnet(+attention) pair, every downsampler) and consume them on the way up
(every resnet(+attention) pair, in reverse order). The shallow branch is ``conv_in`` and the first
``branch`` down units, plus the last ``branch + 1`` up units (exactly those that consume the shallow
skips) and everything after them. Everything else is the deep branch: on a full step each deep module
runs and its output is kept; on a cached step it returns the kept output instead of running, so the
first shallow up unit sees the deep feature of the last full step, as in DeepCache. Only module
forwards are wrapped (whole blocks where a block is entirely deep), never the UNet's own forward.

``order=1`` replays a linear extrapolation of the deep branch's output (the last deep module's, the only
one the shallow branch reads) from the last two full steps instead (per sample:
``f_b + (f_b - f_a) * (i - i_b) / (i_b - i_a)``), the TaylorSeer idea applied to DeepCache; the other
deep modules replay their last output, which nothing on a cached step reads.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .schedule import Schedule, blend, extrapolate, push_history

__all__ = ["plan_unet", "apply_unet"]


def _units(block: nn.Module) -> list[list[nn.Module]]:
    attns = getattr(block, "attentions", None)
    return [[r] + ([attns[j]] if attns is not None and j < len(attns) else []) for j, r in enumerate(block.resnets)]


def plan_unet(model: nn.Module, branch: int) -> list[nn.Module]:
    """The deep-branch modules to replay on cached steps (raises ValueError for an unknown layout)."""
    # down path: (modules, block) per skip-producing unit, in order; conv_in is skip 0
    down: list[tuple[list[nn.Module], nn.Module]] = []
    for blk in model.down_blocks:
        down += [(u, blk) for u in _units(blk)]
        for ds in getattr(blk, "downsamplers", None) or []:
            down.append(([ds], blk))
    up: list[tuple[list[nn.Module], nn.Module, bool]] = []  # (modules, block, consumes a skip)
    for blk in model.up_blocks:
        up += [(u, blk, True) for u in _units(blk)]
        for us in getattr(blk, "upsamplers", None) or []:
            up.append(([us], blk, False))
    n_skips, n_used = len(down) + 1, sum(c for *_, c in up)
    if n_skips != n_used:
        raise ValueError(f"unrecognised UNet layout: {n_skips} skip connections produced, {n_used} consumed")
    if branch > len(down) - 1:
        raise ValueError(f"branch={branch} leaves no deep branch in this UNet; use branch <= {len(down) - 1}")
    deep_down = down[branch:]  # units after conv_in and the first `branch` down units
    consumers = [k for k, (*_, c) in enumerate(up) if c]
    first_shallow_up = consumers[-(branch + 1)]
    deep_up = up[:first_shallow_up]
    deep_set = {id(m) for u, _ in deep_down for m in u} | {id(m) for u, *_ in deep_up for m in u}
    plan: list[nn.Module] = []
    for blk in list(model.down_blocks) + list(model.up_blocks):
        mods = [m for u in _units(blk) for m in u] + list(getattr(blk, "downsamplers", None) or []) \
            + list(getattr(blk, "upsamplers", None) or [])
        inside = [m for m in mods if id(m) in deep_set]
        if inside and len(inside) == len(mods):
            plan.append(blk)
        else:
            plan += inside
        if blk is model.down_blocks[-1] and model.mid_block is not None:
            plan.append(model.mid_block)
    return plan


def apply_unet(model: nn.Module, cfg: Any, handle: Any, clock: Any) -> None:
    plan = plan_unet(model, cfg.branch)
    sched = Schedule(cfg, clock)
    cur: dict[str, Any] = {"slot": None, "probe": None}

    def pre_hook(module, args, kwargs):
        x = kwargs.get("sample", args[0] if args else None)
        cur["slot"] = sched.start((tuple(x.shape), x.dtype, x.device))
        cur["probe"] = None

    handle.add_hook(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
    if cfg.threshold is not None:
        def probe_hook(module, args, out):
            cur["probe"] = out

        handle.add_hook(model.conv_in.register_forward_hook(probe_hook))

    def make(key: int):
        def wrap(orig):
            def forward(*args, **kwargs):
                slot = cur["slot"]
                if slot is None:  # called outside the UNet's forward
                    return orig(*args, **kwargs)
                full = sched.decide(slot, cur["probe"])
                if cfg.order == 0 or key != feed:  # only the output the shallow branch reads is extrapolated
                    if not full and key in slot.store:
                        return slot.store[key]
                    out = blend(slot.mask, orig(*args, **kwargs), slot.store.get(key))
                    slot.store[key] = out
                    return out
                entry = slot.store.get(key)
                if not full and entry is not None:
                    return extrapolate(entry, slot.index)
                out = orig(*args, **kwargs)
                if slot.mask is not None and entry is not None:  # samples not due keep their estimate
                    out = blend(slot.mask, out, extrapolate(entry, slot.index))
                slot.store[key] = push_history(entry, out, slot.index, slot.mask)
                return out
            return forward
        return wrap

    feed = len(plan) - 1  # the last deep module: its output is what the first shallow up unit reads
    for k, m in enumerate(plan):
        handle.wrap_forward(m, make(k))
    handle.state["schedule"] = sched
    handle.state["deep_modules"] = plan
