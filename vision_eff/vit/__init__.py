"""Efficient ViT deployment: the built-in ViT classifier, cheaper token mixers, and the `bench vit` command.

    from vision_eff.vit import MixerSwap, build_vit, load_vit, train_vit
    h = vision_eff.apply(vit, MixerSwap(blocks=(0, 1), weights=path))   # pooling mixer in early blocks

Token merging and pruning for timm ViTs live in :mod:`vision_eff.tokens` (TokenMerge, TokenPrune);
fused attention through our kernels is :class:`vision_eff.kernels.FastAttention`.
"""
from .builtin import NAME, VIT_CONFIG, build_vit, evaluate, load_vit, train_vit
from .mixer import MixerSwap, PoolAttention

__all__ = ["NAME", "VIT_CONFIG", "build_vit", "train_vit", "load_vit", "evaluate", "MixerSwap", "PoolAttention"]
