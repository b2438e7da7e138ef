"""The token techniques' configs: :class:`TokenMerge` and :class:`TokenPrune`.

Each is a frozen dataclass that validates itself, says whether it supports a model, and applies
itself through a :class:`~vision_eff._patching.PatchHandle`. The work is routed to an adapter:

- timm ViTs (``VisionTransformer`` and subclasses such as DeiT-distilled, ``Eva``):
  :mod:`vision_eff.tokens.timm`;
- diffusers models and pipelines (TokenMerge only): ``vision_eff.tokens.diffusers``
  (``supports_diffusers(obj, cfg)`` / ``apply_diffusers(obj, cfg, handle)``), imported lazily.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Sequence

from .._validate import check_int as _check_int

__all__ = ["TokenMerge", "TokenPrune"]

_SCHEDULES = ("constant", "decreasing")
_METHODS = ("merge", "downsample")
_CRITERIA = ("cls_attn",)


def family(obj: Any) -> str | None:
    """"timm" for a timm model, "diffusers" for a diffusers model or pipeline, else None."""
    mod = type(obj).__module__ or ""
    if mod.startswith("timm."):
        return "timm"
    if mod.startswith("diffusers."):
        return "diffusers"
    for name in ("unet", "transformer"):  # a pipeline defined outside diffusers (e.g. the zoo's)
        part = getattr(obj, name, None)
        if part is not None and (type(part).__module__ or "").startswith("diffusers."):
            return "diffusers"
    return None


def _diffusers_adapter():
    try:
        return importlib.import_module("vision_eff.tokens.diffusers")
    except ModuleNotFoundError as exc:
        if exc.name != "vision_eff.tokens.diffusers":
            raise
        return None


@dataclass(frozen=True)
class TokenMerge:
    """Token merging (ToMe-style bipartite soft matching, size-weighted, proportional attention).

    timm ViTs use ``r`` / ``keep`` / ``schedule`` / ``prop_attn``:
        r: tokens merged in every block (int), or one value per block (sequence of ints);
        keep: alternatively, the fraction of patch tokens left after the last block (0 < keep <= 1);
        schedule: "constant" (same r in every block) or "decreasing" (linearly from 2r down to 0,
            the same total), used with an int ``r`` or with ``keep``;
        prop_attn: add log(token size) to the attention scores (proportional attention).
    diffusers models use ``ratio`` / ``method`` / ``min_tokens`` / ``sx`` / ``sy`` / ``seed``:
        ratio: fraction of the self-attention tokens merged, in [0, 1);
        method: "merge" (bipartite matching) or "downsample";
        min_tokens: only attention layers with at least this many tokens are reduced;
        sx, sy: partition stride (one destination token per sy x sx cell of the token grid); the matching
            compares every source with every destination, so 4x4 cells make it 4x cheaper than ToMe-SD's
            2x2 (what lets merging pay on narrow attention levels, e.g. the built-in UNet's 32-channel 32x32);
        seed: seed of the random destination choice;
        mlp: also run each transformer block's feed-forward on the merged tokens (ToMe-SD's merge_mlp:
            the self-attention's match is reused, so no second matching), for UNet and DiT/PixArt blocks
            with method="merge". Fewer FLOPs than attention-only merging, at some extra error; on the
            built-in UNet on a CPU it bought no wall-clock time (notes/results/diffusion-mlp.md).
    """

    r: int | tuple[int, ...] | None = None
    keep: float | None = None
    schedule: str = "constant"
    prop_attn: bool = True
    ratio: float = 0.5
    method: str = "merge"
    min_tokens: int = 0
    sx: int = 2
    sy: int = 2
    seed: int = 0
    mlp: bool = False

    key = "token_merge"

    def __post_init__(self) -> None:
        r = self.r
        if r is not None and not isinstance(r, int):
            if isinstance(r, (str, bytes)) or not isinstance(r, Sequence):
                raise ValueError(f"r must be an int or a sequence of ints (one per block), got {r!r}")
            r = tuple(r)
            for i, v in enumerate(r):
                _check_int(f"r[{i}]", v, 0)
            object.__setattr__(self, "r", r)
        elif r is not None:
            _check_int("r", r, 0)
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
                raise ValueError(f"keep must be a fraction in (0, 1], got {self.keep!r}")
            if r is not None:
                raise ValueError("give either r (tokens merged per block) or keep (fraction of tokens kept), not both")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if isinstance(r, tuple) and self.schedule != "constant":
            raise ValueError("a per-block r sequence is already a schedule; leave schedule='constant'")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1) (fraction of tokens merged), got {self.ratio!r}")
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}")
        _check_int("min_tokens", self.min_tokens, 0)
        _check_int("sx", self.sx, 1)
        _check_int("sy", self.sy, 1)
        _check_int("seed", self.seed, 0)
        if not isinstance(self.mlp, bool):
            raise ValueError(f"mlp must be True or False, got {self.mlp!r}")
        if self.mlp and self.method != "merge":
            raise ValueError("mlp=True merges the feed-forward's tokens with the attention's match, which only "
                             "method='merge' computes; use method='merge' or mlp=False")

    def supports(self, obj: Any) -> str | None:
        fam = family(obj)
        if fam == "timm":
            if self.r is None and self.keep is None:
                return "token merging on a timm ViT needs r= (tokens merged per block) or keep= (fraction kept)"
            from .timm import supports_timm

            return supports_timm(obj, self)
        if fam == "diffusers":
            adapter = _diffusers_adapter()
            if adapter is None:
                return "diffusers token merging is not available in this version (vision_eff.tokens.diffusers)"
            return adapter.supports_diffusers(obj, self)
        return (f"{type(obj).__name__} is neither a timm ViT (VisionTransformer, Eva) nor a diffusers "
                "model or pipeline")

    def apply(self, obj: Any, handle: Any) -> None:
        if family(obj) == "timm":
            from .timm import apply_timm

            apply_timm(obj, self, handle)
        else:
            adapter = _diffusers_adapter()
            if adapter is None:
                raise TypeError("diffusers token merging is not available in this version")
            adapter.apply_diffusers(obj, self, handle)


@dataclass(frozen=True)
class TokenPrune:
    """Training-free token pruning for timm ViTs (EViT-style class-attention token dropping).

    At each block in ``blocks`` (default: after 1/4, 2/4 and 3/4 of the depth, as in EViT), between
    attention and MLP, only the ``keep`` fraction of non-prefix tokens that the class token attends
    to most survive; with ``fuse`` the dropped ones are folded into one extra token (their
    size-weighted mean). Class, distillation and register tokens are never dropped.
    """

    keep: float = 0.7
    blocks: tuple[int, ...] | None = None
    criterion: str = "cls_attn"
    fuse: bool = True
    prop_attn: bool = True

    key = "token_prune"

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ValueError(f"keep must be a fraction in (0, 1], got {self.keep!r}")
        if self.blocks is not None:
            if isinstance(self.blocks, int) or not isinstance(self.blocks, Sequence):
                raise ValueError(f"blocks must be a sequence of block indices, got {self.blocks!r}")
            blocks = tuple(self.blocks)
            for i, v in enumerate(blocks):
                _check_int(f"blocks[{i}]", v, 0)
            if len(set(blocks)) != len(blocks):
                raise ValueError(f"blocks has duplicates: {blocks}")
            object.__setattr__(self, "blocks", tuple(sorted(blocks)))
        if self.criterion not in _CRITERIA:
            raise ValueError(f"criterion must be one of {_CRITERIA}, got {self.criterion!r}")

    def supports(self, obj: Any) -> str | None:
        if family(obj) != "timm":
            return f"token pruning supports timm ViTs (VisionTransformer, Eva), not {type(obj).__name__}"
        from .timm import supports_timm

        return supports_timm(obj, self)

    def apply(self, obj: Any, handle: Any) -> None:
        from .timm import apply_timm

        apply_timm(obj, self, handle)
