"""Short recovery fine-tune of swapped-in blocks by distillation from the original model.

Only the new blocks train (copies; the original model is never modified). The student runs the
model's own frozen blocks between swapped ones, and matches the original model's hidden states at the
output of every swapped block (MSE relative to the size of the original block's update), so each step costs a forward through the first few
blocks only.

    path = recover_mixer(load_vit(), MixerSwap(blocks=(0, 1)), steps=300)
    h = vision_eff.apply(model, MixerSwap(blocks=(0, 1), weights=str(path)))
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..zoo.weights import save, weights_path
from .builtin import batches
from .mixer import MixerSwap

__all__ = ["block_input", "recover_mixer"]

_DISTILL_START = 5_000_000  # train-split sample index where distillation data starts (after ViT training data)


class _Stop(Exception):
    pass


@torch.no_grad()
def block_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The token sequence entering ``model.blocks[0]`` (captured with a pre-hook; no forward copied)."""
    box = {}

    def grab(mod, args):
        box["x"] = args[0]
        raise _Stop

    h = model.blocks[0].register_forward_pre_hook(grab)
    try:
        model.forward_features(x)
    except _Stop:
        pass
    finally:
        h.remove()
    return box["x"]


def recover_mixer(model: nn.Module, swap: MixerSwap, steps: int = 300, batch_size: int = 64, lr: float = 1e-3,
                  out: str | Path | None = None, size: int = 64, seed: int = 0, progress: bool = True) -> Path:
    """Distil the swapped blocks of ``swap`` from ``model``'s original blocks; saves and returns their weights."""
    why = swap.supports(model)
    if why is not None:
        raise TypeError(f"MixerSwap cannot be applied to {type(model).__name__}: {why}")
    torch.manual_seed(seed)
    model.eval().requires_grad_(False)
    new = swap.build_blocks(model)
    params = [p for blk in new.values() for p in blk.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, min(20, steps // 5))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / steps))
    last = max(swap.blocks)
    t0, ema = time.time(), None
    for blk in new.values():
        blk.train()
    stream = batches("train", _DISTILL_START, batch_size, size)
    for step in range(steps):
        x, _ = next(stream)
        with torch.no_grad():
            h_t = block_input(model, x)
            targets = {}
            for j in range(last + 1):
                prev, h_t = h_t, model.blocks[j](h_t)
                if j in new:  # target, and the size of the original block's own update (the loss's scale)
                    targets[j] = (h_t, ((h_t - prev) ** 2).mean().clamp_min(1e-8))
        h_s = block_input(model, x)
        loss = 0.0
        for j in range(last + 1):
            h_s = (new[j] if j in new else model.blocks[j])(h_s)
            if j in new:
                t, scale = targets[j]
                loss = loss + ((h_s - t) ** 2).mean() / scale
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if progress and (step % 25 == 0 or step + 1 == steps):
            print(f"[recover] step {step + 1}/{steps} feature loss {ema:.4f} {time.time() - t0:.0f}s", flush=True)
    out = Path(out) if out is not None else weights_path("shapes-vit-poolmixer")
    meta = dict(model="shapes-vit-poolmixer", swap=dict(blocks=list(swap.blocks), kernel=swap.kernel),
                recipe=dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, loss="hidden-state MSE / original block update"),
                train_seconds=round(time.time() - t0, 1), final_loss=round(ema or float("nan"), 5))
    save({f"blocks.{i}": blk.eval() for i, blk in new.items()}, out, meta)
    return out
