"""Token merging maths: bipartite soft matching, size-weighted merge and unmerge.

Pure tensor functions with no knowledge of timm or diffusers (the adapters only route tensors).
Written from the ToMe paper (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023);
no code of the reference implementation is used.

A token reduction is described by a :class:`Match`: which input tokens survive (in input order),
which input tokens are folded into which output slot, and, for every input token, the output
slot that now stands for it. Every function works per sample, with gathers and scatters only,
so results never depend on what else is in the batch and ``torch.compile(fullgraph=True)``
traces them without graph breaks (all shapes are static given ``N`` and ``r``).

Typical use (one ViT block)::

    a, b = split_alternate(N, protected=1, device=x.device)  # class token never merged
    m = bipartite_match(keys, a, b, r=16)                       # keys: [B, N, C]
    x, size = merge(x, m, size)                                 # [B, N-16, C], [B, N-16, 1]
    bias = size.log()                                           # proportional attention bias
    y_full = unmerge(y, m)                                      # back to [B, N, C]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Match", "bipartite_match", "split_alternate", "merge", "unmerge", "compose", "reduction", "take"]


@dataclass(frozen=True)
class Match:
    """A token reduction from ``N`` input tokens to ``K + extra`` output tokens (all tensors long, per sample).

    - ``keep``  [B, K]: input positions that survive as output slots ``0..K-1`` (ascending, so
      prefix tokens such as the class token stay in front and in order);
    - ``src``   [B, S]: input positions folded into another slot (merged away, or fused);
    - ``dst``   [B, S]: the output slot each ``src`` token is added into;
    - ``inv``   [B, N]: the output slot that stands for every input position (kept tokens map to
      their own slot, merged tokens to their destination's slot; dropped tokens to slot 0);
    - ``rep``   [B, K + extra]: one representative input position per output slot (its position
      for RoPE-style position tracking);
    - ``extra``: new slots appended after the kept ones (1 when pruned tokens are fused into one).

    Input positions not in ``keep`` nor ``src`` are dropped (pruning without fusion).
    """

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    inv: torch.Tensor
    rep: torch.Tensor
    extra: int = 0

    @property
    def num_out(self) -> int:
        return self.keep.shape[1] + self.extra

    @property
    def num_in(self) -> int:
        return self.inv.shape[1]


def _flat(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample positions [B, K] -> row numbers of the [B * n, ...] flattened tensor."""
    return (idx + torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * n).reshape(-1)


def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of each sample: ``x`` [B, N, C], ``idx`` [B, K] -> [B, K, C] (``x[b, idx[b]]``; a row copy)."""
    b, n, c = x.shape
    return x.reshape(b * n, c).index_select(0, _flat(idx, n)).view(b, idx.shape[1], c)


def split_alternate(n: int, protected: int = 0, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT partition of ``n`` tokens into sets A (sources) and B (destinations).

    The first ``protected`` tokens (class, distillation, register tokens) are in neither set and are
    never merged. The remaining tokens alternate A, B, A, B, ... (A gets the extra one when odd).
    Returns two 1-D long tensors of input positions.
    """
    if protected < 0 or protected > n:
        raise ValueError(f"protected must be in [0, {n}], got {protected}")
    idx = torch.arange(protected, n, device=device)
    return idx[0::2], idx[1::2]


def _expand_idx(idx: torch.Tensor, batch: int) -> torch.Tensor:
    if idx.dim() == 1:
        return idx.unsqueeze(0).expand(batch, -1)
    if idx.dim() == 2 and idx.shape[0] == batch:
        return idx
    raise ValueError(f"partition indices must be [M] or [B={batch}, M], got shape {tuple(idx.shape)}")


def reduction(keep: torch.Tensor, src: torch.Tensor, dst_pos: torch.Tensor | None, n: int,
              extra_rep: torch.Tensor | None = None) -> Match:
    """Build a :class:`Match` from input positions.

    ``keep`` [B, K] surviving positions (any order; sorted here), ``src`` [B, S] positions folded away,
    ``dst_pos`` [B, S] the *input position* each source is folded into (must be a kept position), or
    ``None`` to fuse all sources into one new slot appended after the kept ones (then ``extra_rep``
    [B, 1] gives that slot's representative position; defaults to the first source).
    """
    b = keep.shape[0]
    keep = keep.sort(dim=1).values
    k = keep.shape[1]
    slots = torch.arange(k, device=keep.device).unsqueeze(0).expand(b, -1)
    inv = torch.zeros(b, n, dtype=torch.long, device=keep.device).scatter(1, keep, slots)
    if dst_pos is None:
        extra = 1 if src.shape[1] > 0 else 0
        dst = torch.full_like(src, k)
        rep = keep
        if extra:
            rep = torch.cat([keep, src[:, :1] if extra_rep is None else extra_rep], dim=1)
    else:
        extra = 0
        dst = inv.gather(1, dst_pos)
        rep = keep
    inv = inv.scatter(1, src, dst)
    return Match(keep=keep, src=src, dst=dst, inv=inv, rep=rep, extra=extra)


def bipartite_match(metric: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, r: int) -> Match:
    """Bipartite soft matching: merge the ``r`` A tokens most similar to some B token into it.

    ``metric`` [B, N, C] (e.g. attention keys averaged over heads); ``a_idx``/``b_idx`` input
    positions of sets A and B, shape [M] (shared by the batch) or [B, M]. Similarity is the cosine
    similarity of each A token to every B token; each A token's best B token is its destination, and
    the ``r`` A tokens with the highest best-similarity are merged (ties broken by lower position, so
    the result is deterministic). Tokens in neither set are always kept. Returns a :class:`Match`
    with ``N - r`` output tokens in input order.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, C], got shape {tuple(metric.shape)}")
    bsz, n, _ = metric.shape
    a_idx, b_idx = _expand_idx(a_idx, bsz), _expand_idx(b_idx, bsz)
    na = a_idx.shape[1]
    if not 0 <= r <= na:
        raise ValueError(f"cannot merge r={r} tokens: set A has {na} tokens (N={n}); use r <= {na}")
    if r > 0 and b_idx.shape[1] == 0:
        raise ValueError("set B is empty: there is nothing to merge into")
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = take(m, a_idx), take(m, b_idx)
        scores = a @ b.transpose(1, 2)  # [B, Na, Nb]
        # each A token's best similarity ranks it; only the r merged ones need their best B token
        # (amax + argmax of r rows: several times cheaper than max with indices over all Na rows)
        order = scores.amax(dim=-1).argsort(dim=-1, descending=True, stable=True)
        src_rows = order[:, :r]
        best_j = scores.gather(1, src_rows.unsqueeze(-1).expand(-1, -1, scores.shape[-1])).argmax(dim=-1)
        src = a_idx.gather(1, src_rows)
        dst_pos = b_idx.gather(1, best_j)
        keep = torch.cat([a_idx.gather(1, order[:, r:]), b_idx], dim=1)
        # tokens outside A and B (protected) are kept as they are
        outside = _outside(n, a_idx, b_idx)
        if outside is not None:
            keep = torch.cat([outside.unsqueeze(0).expand(bsz, -1), keep], dim=1)
        return reduction(keep, src, dst_pos, n)


def _outside(n: int, a_idx: torch.Tensor, b_idx: torch.Tensor) -> torch.Tensor | None:
    """Positions in neither set (taken from the first sample; partitions share the protected set)."""
    na, nb = a_idx.shape[1], b_idx.shape[1]
    if na + nb == n:
        return None
    mask = torch.ones(n, dtype=torch.bool, device=a_idx.device)
    mask[a_idx[0]] = False
    mask[b_idx[0]] = False
    # static count (n - na - nb) so the shape stays known under torch.compile
    return torch.sort(torch.where(mask, torch.arange(n, device=a_idx.device), n)).values[: n - na - nb]


def merge(x: torch.Tensor, match: Match, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of ``x`` [B, N, C] by ``match``; returns ``(x_out, size_out)``.

    Each output token is the size-weighted mean of the input tokens it stands for; ``size`` [B, N, 1]
    counts how many original tokens each input token already represents (``None``: all 1). The
    returned sizes [B, K+extra, 1] sum, per sample, to the input sizes of the tokens kept or folded
    (all of them unless tokens were dropped). A token that nothing is folded into comes out unchanged.
    """
    bsz, n, c = x.shape
    if n != match.num_in:
        raise ValueError(f"x has {n} tokens but the match was computed for {match.num_in}")
    if size is None:
        size = x.new_ones(bsz, n, 1)
    size = size.to(x.dtype)
    out = take(x, match.keep)
    s_out = size.gather(1, match.keep.unsqueeze(-1))
    if match.extra:  # new slots start empty: value 0, size 0
        out = torch.cat([out, out.new_zeros(bsz, match.extra, c)], dim=1)
        s_out = torch.cat([s_out, s_out.new_zeros(bsz, match.extra, 1)], dim=1)
    if match.src.shape[1] == 0:
        return out, s_out
    # out_j = x_j + sum_i s_i (x_i - x_j) / S_j: the weighted mean, and exactly x_j where nothing is added
    s_src = size.gather(1, match.src.unsqueeze(-1))
    s_out = s_out.scatter_add(1, match.dst.unsqueeze(-1), s_src)
    weight = s_src / s_out.gather(1, match.dst.unsqueeze(-1))
    delta = weight * (take(x, match.src) - take(out, match.dst))
    return _add_into(out, match.dst, delta), s_out


def _add_into(out: torch.Tensor, dst: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``out[b, dst[b, i]] += delta[b, i]``, in place: ``out`` is always a fresh gather (index_select / cat)
    that nothing else holds, and an out-of-place index_add would copy all of it again (a third of
    merge()'s time on ViT-B)."""
    bsz, k, c = out.shape
    out.view(bsz * k, c).index_add_(0, _flat(dst, k), delta.reshape(-1, c))
    return out


def unmerge(x: torch.Tensor, match: Match) -> torch.Tensor:
    """Inverse of :func:`merge` for broadcasting: every input position gets its output slot's value.

    ``x`` [B, K+extra, C] -> [B, N, C]. ``merge(unmerge(y, m), m, size)[0] == y`` up to rounding
    for every slot (a weighted mean of equal values); dropped positions receive slot 0's value.
    """
    if x.shape[1] != match.num_out:
        raise ValueError(f"x has {x.shape[1]} tokens but the match produces {match.num_out}")
    return take(x, match.inv)


def compose(inv_total: torch.Tensor | None, match: Match) -> torch.Tensor:
    """Map from original positions to current slots after one more reduction ([B, N0] long)."""
    return match.inv if inv_total is None else match.inv.gather(1, inv_total)
