"""Token reduction: merging (ToMe-style) and pruning (EViT-style), for timm ViTs and diffusers models.

    import vision_eff as ve
    h = ve.apply(vit, ve.TokenMerge(r=16))        # timm ViT: r tokens merged per block
    h = ve.apply(pipe, ve.TokenMerge(ratio=0.5))  # diffusers: half the self-attention tokens
    h = ve.apply(vit, ve.TokenPrune(keep=0.7))    # timm ViT: class-attention token dropping

The maths lives in :mod:`.merge` and :mod:`.prune` (pure tensor functions); the adapters only route tensors.
"""
from .merge import Match, bipartite_match, merge, split_alternate, unmerge
from .technique import TokenMerge, TokenPrune

__all__ = ["TokenMerge", "TokenPrune", "Match", "bipartite_match", "merge", "unmerge", "split_alternate"]
