"""The built-in ViT classifier ``shapes-vit``: a timm VisionTransformer on the built-in 64x64 shapes.

Patch 4 on 64x64 gives 256 patch tokens (+ the class token), enough for token merging to matter.
The patch embedding is a small convolutional stem of stride 4 (Xiao et al. 2021, "Early
convolutions help transformers see better") in place of the single 4x4 convolution: with the plain
patchify stem the model sat at chance for hundreds of steps on two CPU cores. Training runs in two
resolutions (Touvron et al. 2019, FixRes): most steps at 32x32 (64 tokens, ~6x cheaper per step),
then a short fine-tune at 64x64 with the position embedding resampled to the 16x16 grid.

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
from ..zoo.train import recipe_with, training_precision
from ..zoo.weights import load_into, save, weights_path

__all__ = ["NAME", "VIT_CONFIG", "TRAIN_RECIPE", "batches", "build_vit", "train_vit", "load_vit", "evaluate", "predict"]

NAME = "shapes-vit"
IMAGE_SIZE = 64
VIT_CONFIG = dict(img_size=IMAGE_SIZE, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0,
                  num_classes=data.NUM_CLASSES, class_token=True, global_pool="token")
STEM_CHANNELS = (32, 64, 128)  # 3x3 convolutions at strides 1, 2, 2
# ``steps`` is the final 64x64 stage; ``pretrain`` the low-resolution stage before it.
TRAIN_RECIPE = dict(steps=600, batch_size=64, lr=3e-4, weight_decay=0.05, warmup=20, seed=0,
                    label_smoothing=0.1, bf16=True, max_minutes=15.0,
                    pretrain=dict(img_size=32, steps=5000, lr=5e-4, warmup=100, max_minutes=60.0))


def conv_stem(embed_dim: int, channels: tuple[int, ...] = STEM_CHANNELS) -> nn.Sequential:
    """Stride-4 patch embedding: 3x3 convolutions (BatchNorm, GELU), the first at stride 1 and the
    others at stride 2, then a 1x1 to ``embed_dim``. (A stem of two stride-2 convolutions alone stayed
    near chance for 500 steps where this one reached loss 1.5.)"""
    layers: list[nn.Module] = []
    cin = 3
    for i, c in enumerate(channels):
        layers += [nn.Conv2d(cin, c, 3, stride=1 if i == 0 else 2, padding=1, bias=False), nn.BatchNorm2d(c), nn.GELU()]
        cin = c
    layers.append(nn.Conv2d(cin, embed_dim, 1))
    return nn.Sequential(*layers)


def build_vit(**overrides) -> nn.Module:
    """A fresh ``shapes-vit`` (timm VisionTransformer with a stride-4 conv stem) with random weights."""
    from timm.models.vision_transformer import VisionTransformer

    cfg = {**VIT_CONFIG, **overrides}
    model = VisionTransformer(**cfg)
    stride = 2 ** (len(STEM_CHANNELS) - 1)
    if cfg["patch_size"] != stride:
        raise ValueError(f"the conv stem has stride {stride}; patch_size must match, got {cfg['patch_size']}")
    model.patch_embed.proj = conv_stem(cfg["embed_dim"])
    return model


def _resize_to(model: nn.Module, img_size: int) -> nn.Module:
    """The same weights in a model built for ``img_size`` (position embedding resampled bicubically)."""
    from timm.layers import resample_abs_pos_embed

    grid = img_size // VIT_CONFIG["patch_size"]
    state = dict(model.state_dict())
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (grid, grid),
                                                num_prefix_tokens=model.num_prefix_tokens)
    new = build_vit(img_size=img_size)
    new.load_state_dict(state)
    return new


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


def _train_stage(model: nn.Module, recipe: dict, img_size: int, start: int, progress: bool, tag: str,
                 bf16: bool) -> tuple[int, float]:
    """Train ``model`` in place on consecutive train samples from ``start`` (bf16 autocast when ``bf16``);
    returns (steps done, final loss)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe["lr"])
    gen = torch.Generator().manual_seed(recipe["seed"] + 1 + start)
    bs = recipe["batch_size"]
    t0, ema_loss = time.time(), float("nan")
    budget = 60.0 * recipe["max_minutes"] if recipe.get("max_minutes") else float("inf")
    model.train()
    done = 0
    stream = batches("train", start, bs, img_size)
    for step in range(recipe["steps"]):
        frac = max(step / recipe["steps"], (time.time() - t0) / budget)
        if frac >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = recipe["lr"] * _lr(step, frac, recipe["warmup"])
        x, y = next(stream)
        x = _augment(x, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe["label_smoothing"])
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        ema_loss = loss.item() if step == 0 else 0.95 * ema_loss + 0.05 * loss.item()
        if progress and (step % 25 == 0 or step + 1 == recipe["steps"]):
            print(f"[{NAME} {tag}] step {step + 1}/{recipe['steps']} loss {ema_loss:.4f} {time.time() - t0:.0f}s",
                  flush=True)
    model.eval()
    return done, ema_loss


def train_vit(steps: int | None = None, batch_size: int | None = None, lr: float | None = None,
              seed: int | None = None, out: str | Path | None = None, threads: int | None = None,
              progress: bool = True, bf16: bool | None = None, max_minutes: float | None = None,
              eval_count: int = data.EVAL_SIZE, pretrain_steps: int | None = None, precision: str = "auto") -> Path:
    """Train ``shapes-vit`` from scratch on the built-in train split and save it (safetensors + recipe).

    First ``pretrain_steps`` at the recipe's low resolution, then ``steps`` at 64x64 on the samples
    after those. Each stage stops after its steps or its ``max_minutes`` of wall-clock, whichever
    comes first; the learning-rate schedule follows whichever is further along, so it always ends
    annealed. ``steps``, ``batch_size``, ``lr`` and ``max_minutes`` set the final stage. The recipe's bf16
    autocast is used only where the CPU has native bf16 unless ``precision`` forces it
    (:func:`vision_eff.zoo.train.training_precision`; the metadata says what ran).
    """
    recipe = recipe_with(TRAIN_RECIPE, threads=threads, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         bf16=bf16, max_minutes=max_minutes)
    pre = {k: v for k, v in recipe.items() if k != "pretrain"}
    pre.update(recipe["pretrain"])
    if pretrain_steps is not None:
        pre["steps"] = pretrain_steps
    pre["batch_size"] = recipe["batch_size"]
    recipe["pretrain"] = pre
    out = Path(out) if out is not None else weights_path(NAME)
    mixed, used = training_precision(recipe, "cpu", precision)
    if used.startswith("fp32: ") and progress:
        print(f"[{NAME}] training in {used}", flush=True)
    torch.manual_seed(recipe["seed"])
    t0 = time.time()
    model = build_vit(img_size=pre["img_size"])
    done_pre = 0
    if pre["steps"] > 0:
        done_pre, _ = _train_stage(model, pre, pre["img_size"], 0, progress, f"{pre['img_size']}px", mixed == "bf16")
    model = _resize_to(model, IMAGE_SIZE)
    bs = recipe["batch_size"]
    done, ema_loss = _train_stage(model, recipe, IMAGE_SIZE, done_pre * bs, progress, f"{IMAGE_SIZE}px", mixed == "bf16")
    acc = evaluate(model, count=eval_count)
    meta = dict(model=NAME, kind="vit-classifier", config={k: v for k, v in VIT_CONFIG.items()},
                stem=list(STEM_CHANNELS), recipe=recipe, steps_done=done, pretrain_steps_done=done_pre, final=True,
                samples_seen=(done + done_pre) * bs,
                data=f"vision_eff.zoo.data train split: samples 0..pretrain_steps*batch at {pre['img_size']}x"
                     f"{pre['img_size']}, then the next steps*batch at {IMAGE_SIZE}x{IMAGE_SIZE}; h-flip",
                train_seconds=round(time.time() - t0, 1), eval_accuracy=round(acc, 5), eval_images=eval_count,
                machine=f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip(),
                precision=used, torch=torch.__version__, final_loss=round(ema_loss, 5))
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
