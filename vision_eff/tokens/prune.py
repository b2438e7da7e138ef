"""Token pruning maths: keep the highest-scoring tokens, optionally fuse the rest into one.

Pure tensor functions (no timm knowledge), after EViT (Liang et al., "Not All Patches Are What You
Need", ICLR 2022): the score is the attention the class token pays to each token; inattentive tokens
are dropped, or fused into a single token. The result is a :class:`~vision_eff.tokens.merge.Match`,
so pruning reuses merging's ``merge`` / ``unmerge`` and the same adapters.
"""
from __future__ import annotations

import torch

from .merge import Match, reduction

__all__ = ["cls_attention", "prune_by_score", "pruned_count"]


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention paid by the class token to every token, averaged over heads.

    ``q_cls`` [B, H, 1, D] (the class token's query), ``k`` [B, H, N, D], ``bias`` broadcastable to
    [B, H, 1, N] (e.g. log token sizes). Returns [B, N] (rows sum to 1).
    """
    s = (q_cls.float() * scale) @ k.float().transpose(-1, -2)
    if bias is not None:
        s = s + bias
    return s.softmax(dim=-1).mean(dim=1)[:, 0]


def pruned_count(n: int, protected: int, keep: float) -> int:
    """Non-protected tokens kept out of ``n - protected`` for a keep fraction (at least one)."""
    m = n - protected
    return max(1, min(m, int(round(m * keep)))) if m > 0 else 0


def prune_by_score(score: torch.Tensor, protected: int, keep_count: int, fuse: bool = True) -> Match:
    """Keep the ``keep_count`` highest-scoring non-protected tokens (ties: lower position first).

    ``score`` [B, N]; the first ``protected`` tokens are always kept. With ``fuse`` the dropped
    tokens are folded into one new token appended at the end (its representative position is the
    highest-scoring dropped token); without it they are discarded.
    """
    if score.dim() != 2:
        raise ValueError(f"score must be [B, N], got shape {tuple(score.shape)}")
    bsz, n = score.shape
    m = n - protected
    if not 0 <= keep_count <= m:
        raise ValueError(f"keep_count must be in [0, {m}] for {n} tokens with {protected} protected, got {keep_count}")
    with torch.no_grad():
        order = score[:, protected:].argsort(dim=-1, descending=True, stable=True) + protected
        kept = order[:, :keep_count]
        dropped = order[:, keep_count:]
        if protected:
            prefix = torch.arange(protected, device=score.device).unsqueeze(0).expand(bsz, -1)
            kept = torch.cat([prefix, kept], dim=1)
        if fuse:
            return reduction(kept, dropped, None, n, extra_rep=dropped[:, :1])
        return reduction(kept, dropped[:, :0], None, n)
