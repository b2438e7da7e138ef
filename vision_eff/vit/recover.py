"""Short recovery fine-tune of swapped-in blocks by distillation from the original model.

Only the new blocks train (copies; the original model is never modified). The student runs the
model's own frozen blocks between swapped ones, and matches the original model's hidden states at the
output of every swapped block (MSE relative to the size of the original block's update). With ``kd > 0``
it also runs the rest of the frozen model and matches the original's class probabilities (KL divergence
at temperature ``temperature``, weighted by ``kd``): the gradient reaches the new blocks through the
frozen later blocks, so the mixers learn what the classifier needs rather than every detail of the
hidden state they cannot reproduce. Without it, a step costs a forward through the first few blocks only.

    path = recover_mixer(load_vit(), MixerSwap(blocks=(0, 1)), steps=300)
    h = vision_eff.apply(model, MixerSwap(blocks=(0, 1), weights=str(path)))
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..samplers.schedules import model_fingerprint
from ..zoo.weights import save, weights_path
from .builtin import batches
from .mixer import MixerSwap

__all__ = ["block_input", "recover_mixer"]

_DISTILL_START = 5_000_000  # train-split sample index where distillation data starts (after ViT training data)


class _Stop(Exception):
    pass


def _run_capturing(model: nn.Module, x: torch.Tensor, blocks: dict[int, nn.Module]) -> tuple[torch.Tensor, dict]:
    """``model(x)`` with ``model.blocks[j]`` replaced by ``blocks[j]`` for this call only; returns the logits
    and, per replaced index, (block input, block output)."""
    seen, hooks, saved = {}, [], {j: model.blocks[j] for j in blocks}

    def grab(j):
        def hook(mod, args, out):
            seen[j] = (args[0], out)
        return hook

    try:
        for j, blk in blocks.items():
            model.blocks[j] = blk
            hooks.append(blk.register_forward_hook(grab(j)))
        return model(x), seen
    finally:
        for h in hooks:
            h.remove()
        for j, blk in saved.items():
            model.blocks[j] = blk


def _kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss: T^2 KL(softmax(teacher / T) || softmax(student / T)), batch mean."""
    t = temperature
    return nn.functional.kl_div(nn.functional.log_softmax(student / t, -1), nn.functional.log_softmax(teacher / t, -1),
                                reduction="batchmean", log_target=True) * t * t


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
                  out: str | Path | None = None, size: int = 64, seed: int = 0, progress: bool = True,
                  kd: float = 0.0, temperature: float = 2.0) -> Path:
    """Distil the swapped blocks of ``swap`` from ``model``'s original blocks; saves and returns their weights."""
    why = swap.supports(model)
    if why is not None:
        raise TypeError(f"MixerSwap cannot be applied to {type(model).__name__}: {why}")
    if kd < 0 or temperature <= 0:
        raise ValueError(f"kd must be >= 0 and temperature > 0, got kd={kd}, temperature={temperature}")
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
    base_fingerprint = model_fingerprint(model)
    t0, ema = time.time(), None
    for blk in new.values():
        blk.train()
    stream = batches("train", _DISTILL_START, batch_size, size)
    for step in range(steps):
        x, _ = next(stream)
        if kd:  # whole forwards: the original model, then the one with the new blocks in place
            with torch.no_grad():
                logits_t, seen_t = _run_capturing(model, x, {j: model.blocks[j] for j in new})
            logits_s, seen_s = _run_capturing(model, x, new)
            outs = {j: seen_s[j][1] for j in new}
            loss = kd * _kd_loss(logits_s, logits_t, temperature)
        else:  # only as far as the last new block
            with torch.no_grad():
                h, seen_t = block_input(model, x), {}
                for j in range(last + 1):
                    seen_t[j] = (h, model.blocks[j](h))
                    h = seen_t[j][1]
            h, outs = block_input(model, x), {}
            for j in range(last + 1):
                h = (new[j] if j in new else model.blocks[j])(h)
                outs[j] = h
            loss = 0.0
        for j in new:  # hidden state after each new block, relative to the size of the original block's update
            h_in, h_out = seen_t[j]
            loss = loss + ((outs[j] - h_out) ** 2).mean() / ((h_out - h_in) ** 2).mean().clamp_min(1e-8)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if progress and (step % 25 == 0 or step + 1 == steps):
            print(f"[recover] step {step + 1}/{steps} loss {ema:.4f} {time.time() - t0:.0f}s", flush=True)
    out = Path(out) if out is not None else weights_path("shapes-vit-poolmixer")
    meta = dict(model="shapes-vit-poolmixer", swap=dict(blocks=list(swap.blocks), kernel=swap.kernel),
                base_fingerprint=base_fingerprint,  # MixerSwap refuses these blocks on any other model
                recipe=dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, kd=kd, temperature=temperature,
                            loss="hidden-state MSE / original block update"
                                 + (f" + {kd} x KL(original || swapped logits) at T={temperature}" if kd else "")),
                train_seconds=round(time.time() - t0, 1), final_loss=round(ema or float("nan"), 5))
    save({f"blocks.{i}": blk.eval() for i, blk in new.items()}, out, meta)
    return out
