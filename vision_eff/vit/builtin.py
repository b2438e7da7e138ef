"""The built-in ViT classifier ``shapes-vit``: a timm VisionTransformer on the built-in 64x64 shapes.

Patch 4 on 64x64 gives 256 patch tokens (+ the class token), enough for token merging to matter.

    model = build_vit()                      # random weights
    train_vit()                              # writes vision_eff/zoo/weights/shapes-vit.safetensors
    model = load_vit()                       # trained, eval mode
    acc = evaluate(model)                    # top-1 on the held-out split (2048 images)
"""
from __future__ import annotations

import math
import platform
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..zoo import data
from ..zoo.train import recipe_with
from ..zoo.weights import load_into, save, weights_path

__all__ = ["NAME", "VIT_CONFIG", "TRAIN_RECIPE", "batches", "build_vit", "train_vit", "load_vit", "evaluate", "predict"]

NAME = "shapes-vit"
IMAGE_SIZE = 64
VIT_CONFIG = dict(img_size=IMAGE_SIZE, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0,
                  num_classes=data.NUM_CLASSES, class_token=True, global_pool="token")
TRAIN_RECIPE = dict(steps=900, batch_size=64, lr=1.5e-3, weight_decay=0.05, warmup=40, seed=0,
                    label_smoothing=0.1, bf16=True, max_minutes=18.0)


def build_vit(**overrides) -> nn.Module:
    """A fresh ``shapes-vit`` (timm VisionTransformer) with random weights."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**{**VIT_CONFIG, **overrides})


def _lr(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay over ``progress`` in [0, 1] (steps or wall-clock, whichever is ahead)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(min(1.0, progress) * math.pi)) * 0.98 + 0.02


def batches(split: str, start: int, batch_size: int, size: int = IMAGE_SIZE):
    """Endless consecutive batches of a data split from sample ``start`` on (each chunk rendered once)."""
    buf_x, buf_y, pos = None, None, start
    while True:
        need, parts_x, parts_y = batch_size, [], []
        while need:
            c, off = divmod(pos, data.CHUNK)
            if buf_x is None or buf_x[0] != c:
                x, y = data.chunk(split, c, size)
                buf_x, buf_y = (c, x), (c, y)
            take = min(need, data.CHUNK - off)
            parts_x.append(buf_x[1][off:off + take])
            parts_y.append(buf_y[1][off:off + take])
            pos += take
            need -= take
        yield torch.cat(parts_x), torch.cat(parts_y)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def train_vit(steps: int | None = None, batch_size: int | None = None, lr: float | None = None,
              seed: int | None = None, out: str | Path | None = None, threads: int | None = None,
              progress: bool = True, bf16: bool | None = None, max_minutes: float | None = None,
              eval_count: int = data.EVAL_SIZE) -> Path:
    """Train ``shapes-vit`` from scratch on the built-in train split and save it (safetensors + recipe).

    Training stops after ``steps`` or ``max_minutes`` of wall-clock, whichever comes first; the
    learning-rate schedule follows whichever is further along, so it always ends annealed.
    """
    recipe = recipe_with(TRAIN_RECIPE, threads=threads, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         bf16=bf16, max_minutes=max_minutes)
    out = Path(out) if out is not None else weights_path(NAME)
    torch.manual_seed(recipe["seed"])
    model = build_vit()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe["lr"])
    gen = torch.Generator().manual_seed(recipe["seed"] + 1)
    bs = recipe["batch_size"]
    t0, ema_loss = time.time(), None
    budget = 60.0 * recipe["max_minutes"] if recipe.get("max_minutes") else float("inf")
    model.train()
    done = 0
    stream = batches("train", 0, bs)
    for step in range(recipe["steps"]):
        frac = max(step / recipe["steps"], (time.time() - t0) / budget)
        if frac >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = recipe["lr"] * _lr(step, frac, recipe["warmup"])
        x, y = next(stream)
        x = _augment(x, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(recipe["bf16"])):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe["label_smoothing"])
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        if progress and (step % 25 == 0 or step + 1 == recipe["steps"]):
            print(f"[{NAME}] step {step + 1}/{recipe['steps']} loss {ema_loss:.4f} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    acc = evaluate(model, count=eval_count)
    meta = dict(model=NAME, kind="vit-classifier", config={k: v for k, v in VIT_CONFIG.items()}, recipe=recipe,
                steps_done=done, final=True, samples_seen=done * bs,
                data=f"vision_eff.zoo.data train split, {IMAGE_SIZE}x{IMAGE_SIZE}, samples 0..steps*batch, h-flip",
                train_seconds=round(time.time() - t0, 1), eval_accuracy=round(acc, 5), eval_images=eval_count,
                machine=f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip(),
                torch=torch.__version__, final_loss=round(ema_loss, 5))
    save({"vit": model}, out, meta)
    if progress:
        print(f"[{NAME}] eval accuracy {acc:.4f}; saved {out}", flush=True)
    return out


def load_vit(path: str | Path | None = None) -> nn.Module:
    """The trained ``shapes-vit`` in eval mode (raises WeightsError naming the fix when not trained)."""
    model = build_vit()
    load_into({"vit": model}, path if path is not None else weights_path(NAME), NAME)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits for images [N, 3, 64, 64], in batches."""
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def evaluate(model: nn.Module, count: int = data.EVAL_SIZE, batch_size: int = 256) -> float:
    """Top-1 accuracy on the held-out evaluation split (64x64)."""
    was = model.training
    model.eval()
    x, y = data.eval_split(IMAGE_SIZE, count)
    acc = (predict(model, x, batch_size).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc
