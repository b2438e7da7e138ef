"""TokenMerge for diffusers denoisers: UNet2DConditionModel, DiT/PixArt, SD3 and Flux transformers.

Each self-attention layer's processor is wrapped (an instance-level swap recorded on the handle;
the original processor still does the attention):

- ``method="merge"`` (ToMe for SD): the tokens entering self-attention are reduced by bipartite
  matching (:func:`vision_eff.tokens.merge.bipartite_match`) onto one destination per ``sy x sx``
  cell (:func:`vision_eff.tokens.grid.grid_partition`), attention runs on the merged tokens, and
  the output is unmerged back to every position. ``ratio`` of the tokens are merged away.
- ``method="downsample"`` (ToDo): queries keep every token; keys and values come from the token grid
  average-pooled to ``1 - ratio`` of its tokens. (UNets and DiT/PixArt only.)

Matching is per sample with a partition shared by the whole batch, so results do not depend on
what else is in the batch and the cond / uncond halves of a guidance batch are treated alike.
The grid of each layer comes from the model input's height and width, recorded by a forward
pre-hook; layers with fewer than ``min_tokens`` tokens run unchanged. The destinations are re-drawn at every
denoising step from the timestep (tensor ops only), so merging errors do not pile up on the same pixels. For Flux (RoPE) the kept
tokens carry their own rotary positions (:attr:`Match.rep`).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .._patching import UnsupportedModelError, denoiser_of
from .grid import grid_partition, pool_grid, token_grid
from .merge import bipartite_match, merge, split_alternate, unmerge

__all__ = ["supports_diffusers", "apply_diffusers", "model_kind", "self_attentions"]

_KINDS = {
    "UNet2DConditionModel": "unet",
    "DiTTransformer2DModel": "dit",
    "PixArtTransformer2DModel": "dit",
    "Transformer2DModel": "dit",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}


def model_kind(model: Any) -> str | None:
    for cls in type(model).__mro__:
        if cls.__name__ in _KINDS and (cls.__module__ or "").startswith("diffusers."):
            return _KINDS[cls.__name__]
    return None


def self_attentions(model: torch.nn.Module, kind: str) -> list[tuple[str, Any, str]]:
    """``(name, attention module, mode)`` for every self-attention over image tokens.

    mode: "self" (image tokens only), "joint" (image tokens in ``hidden_states``, text in
    ``encoder_hidden_states``), "single" (Flux single-stream: ``[text, image]`` in one sequence).
    """
    out = []
    for name, m in model.named_modules():
        cls = type(m).__name__
        if cls == "BasicTransformerBlock" and kind in ("unet", "dit"):
            if not getattr(m, "only_cross_attention", False) and not m.attn1.is_cross_attention:
                out.append((f"{name}.attn1", m.attn1, "self"))
        elif cls == "JointTransformerBlock":
            out.append((f"{name}.attn", m.attn, "joint"))
            if getattr(m, "attn2", None) is not None:
                out.append((f"{name}.attn2", m.attn2, "self"))
        elif cls == "FluxTransformerBlock":
            out.append((f"{name}.attn", m.attn, "joint"))
        elif cls == "FluxSingleTransformerBlock":
            out.append((f"{name}.attn", m.attn, "single"))
    return out


def supports_diffusers(obj: Any, cfg: Any) -> str | None:
    try:
        model = denoiser_of(obj)
    except UnsupportedModelError as exc:
        return str(exc)
    kind = model_kind(model)
    if kind is None:
        return (f"{type(model).__name__} is not a supported denoiser (supported: "
                f"{', '.join(sorted(_KINDS))})")
    if cfg.method == "downsample" and kind in ("sd3", "flux"):
        return (f"method='downsample' needs image-only self-attention, which {type(model).__name__} does "
                "not have (its attention is joint with text); use method='merge'")
    if not self_attentions(model, kind):
        return f"{type(model).__name__} has no self-attention layer over image tokens"
    if cfg.mlp and kind not in ("unet", "dit"):
        return (f"mlp=True supports UNet and DiT/PixArt transformer blocks, not {type(model).__name__}'s; "
                "use mlp=False")
    return None


def apply_diffusers(obj: Any, cfg: Any, handle: Any) -> None:
    model = denoiser_of(obj)
    kind = model_kind(model)
    ctx: dict[str, Any] = {"hw": None, "txt": 0, "t": None}
    patch = getattr(getattr(model, "config", None), "patch_size", None) or 1

    def record(module, args, kwargs):
        x = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        if x is not None and x.dim() == 4:
            ctx["hw"] = (x.shape[-2], x.shape[-1])
        elif x is not None and x.dim() == 3 and kind == "flux":
            side = math.isqrt(x.shape[1])
            ctx["hw"] = (side, side) if side * side == x.shape[1] else None
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is not None and not torch.is_tensor(t):
            t = torch.tensor([float(t)])
        # the timestep (x1000 for flow-matching sigmas in [0, 1]) re-draws the partition at every step
        ctx["t"] = None if t is None else (t.reshape(-1)[:1].float() * (1000.0 if kind in ("sd3", "flux") else 1.0)).round().long()
        enc = kwargs.get("encoder_hidden_states")
        ctx["txt"] = enc.shape[1] if enc is not None and enc.dim() == 3 else 0

    handle.add_hook(model.register_forward_pre_hook(record, with_kwargs=True))
    for salt, (name, attn, mode) in enumerate(self_attentions(model, kind)):
        proc = ReducedAttention(attn.processor, cfg, ctx, salt, mode, patch)
        handle.set_attr(attn, "processor", proc)
        if cfg.mlp and name.endswith(".attn1"):
            ff = getattr(model.get_submodule(name[:-len(".attn1")]), "ff", None)
            if ff is not None:
                _merge_feed_forward(ff, proc, handle)
    handle.state["context"] = ctx


def _merge_feed_forward(ff: torch.nn.Module, proc: "ReducedAttention", handle: Any) -> None:
    """Run ``ff`` on the tokens merged by the same block's self-attention match (hooks, no module swap):
    the pre-hook merges the input, the forward hook unmerges the output. A call whose token count is
    not the match's (chunked feed-forward) or that follows an unreduced attention runs unchanged."""
    active: dict[str, Any] = {"m": None}

    def pre(module, args):
        m, proc.last = proc.last, None
        active["m"] = m if m is not None and args[0].shape[1] == m.num_in else None
        return None if active["m"] is None else (merge(args[0], m)[0], *args[1:])

    def post(module, args, out):
        m, active["m"] = active["m"], None
        return out if m is None else unmerge(out, m)

    handle.add_hook(ff.register_forward_pre_hook(pre))
    handle.add_hook(ff.register_forward_hook(post))


class ReducedAttention:
    """Wraps an attention processor: reduce the image tokens, run the processor, restore every position."""

    def __init__(self, inner: Any, cfg: Any, ctx: dict, salt: int, mode: str, patch: int = 1):
        self.inner, self.cfg, self.ctx, self.salt, self.mode, self.patch = inner, cfg, ctx, salt, mode, patch
        self.last = None  # the match of the latest call (mlp=True: the block's feed-forward reuses it)

    def __getattr__(self, name: str):
        # transparent for attributes diffusers or other adapters read on a processor (e.g. _attention_backend)
        if name.startswith("__") or name in ("inner", "cfg", "ctx", "salt", "mode", "patch", "last"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"ReducedAttention({self.inner.__class__.__name__}, ratio={self.cfg.ratio}, method={self.cfg.method})"

    # positional order covers both diffusers' Attention (keywords) and FluxAttention (positional rope)
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, temb=None, **kwargs):
        extra = dict(kwargs)
        if image_rotary_emb is not None:
            extra["image_rotary_emb"] = image_rotary_emb
        if temb is not None:
            extra["temb"] = temb

        def run(hs, ehs=encoder_hidden_states, ex=extra):
            return self.inner(attn, hs, encoder_hidden_states=ehs, attention_mask=attention_mask, **ex)

        self.last = None
        txt = self.ctx["txt"] if self.mode == "single" else 0
        n = hidden_states.shape[1] - txt if hidden_states.dim() == 3 else 0
        grid = self._grid(n)
        if (n == 0 or n < max(self.cfg.min_tokens, 2) or self.cfg.ratio <= 0 or attention_mask is not None
                or (grid is None and self.cfg.method == "downsample")):
            return run(hidden_states)
        if self.cfg.method == "downsample":
            kv = pool_grid(hidden_states, grid[0], grid[1], 1.0 - self.cfg.ratio)
            return run(hidden_states, kv) if kv.shape[1] < n else run(hidden_states)
        return self._merge(hidden_states, encoder_hidden_states, txt, grid, image_rotary_emb, run, extra)

    def _grid(self, n: int) -> tuple[int, int] | None:
        hw = self.ctx["hw"]
        if hw is None or n == 0:
            return None
        if self.mode == "joint" or self.mode == "single" or self.patch > 1:
            # transformers: tokens are the patch grid of the input
            h, w = math.ceil(hw[0] / self.patch), math.ceil(hw[1] / self.patch)
            return (h, w) if h * w == n else token_grid(n, hw[0], hw[1])
        return token_grid(n, hw[0], hw[1])

    def _merge(self, hidden_states, ehs, txt, grid, rope, run, extra):
        cfg = self.cfg
        img = hidden_states[:, txt:]
        n = img.shape[1]
        if grid is not None:
            a, b = grid_partition(grid[0], grid[1], cfg.sx, cfg.sy, cfg.seed, self.salt, device=img.device,
                                  step=self.ctx.get("t"))
        else:
            a, b = split_alternate(n, 0, device=img.device)
        r = min(int(n * cfg.ratio), a.shape[0])
        if r == 0 or b.shape[0] == 0:
            return run(hidden_states)
        m = bipartite_match(img, a, b, r)
        merged, _ = merge(img, m)
        if txt:
            merged = torch.cat([hidden_states[:, :txt], merged], dim=1)
        if rope is None:
            if self.cfg.mlp and not txt:
                self.last = m
            return self._restore(run(merged), m, txt)
        # RoPE (Flux): every sample's kept tokens carry their own positions -> one call per sample
        outs = []
        for i in range(merged.shape[0]):
            pos = torch.cat([torch.arange(rope[0].shape[0] - n, device=img.device), m.rep[i] + (rope[0].shape[0] - n)])
            ex = dict(extra, image_rotary_emb=tuple(p[pos] for p in rope))
            outs.append(run(merged[i:i + 1], ehs[i:i + 1] if ehs is not None else None, ex))
        if isinstance(outs[0], tuple):
            out = tuple(torch.cat([o[j] for o in outs]) if outs[0][j] is not None else None
                        for j in range(len(outs[0])))
        else:
            out = torch.cat(outs)
        return self._restore(out, m, txt)

    @staticmethod
    def _restore(out, m, txt):
        if isinstance(out, tuple):  # (image, text, ...) from joint processors
            return (unmerge(out[0], m), *out[1:])
        if txt:
            return torch.cat([out[:, :txt], unmerge(out[:, txt:], m)], dim=1)
        return unmerge(out, m)
