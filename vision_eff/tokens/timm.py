"""timm adapter for token merging and pruning: hooks around each block, no copied forward.

Where a reduction happens (as in ToMe / EViT): inside block ``l``, between attention and MLP.
The block's own forward runs unchanged; around it:

- the attention's ``q_norm`` / ``k_norm`` submodules (``nn.Identity`` when a model has no q/k norm)
  get forward hooks that read the queries and keys and compute this block's :class:`Match`
  (bipartite matching on the keys averaged over heads, or class-attention scores for pruning);
- proportional attention: the block is called with ``attn_mask=log(size)`` ([B, 1, 1, N], a float
  additive mask), which timm's attention hands to SDPA (or to our attention op when it is swapped
  in by :mod:`vision_eff.vit.attention`);
- the MLP branch runs on reduced tokens: a pre-hook on ``norm2`` (``mlp`` for post-norm blocks)
  merges its input ``y`` (the residual stream after attention). Every supported block ends in
  ``y + drop_path2(branch)``, whatever the branch holds (LayerScale, EVA's gamma, a post-norm), so a
  hook on ``drop_path2`` keeps the branch (computed on the reduced tokens) and hands timm's add a
  broadcast zero; the wrapped block forward returns ``merge(y) + branch``, exactly ToMe's merged
  residual stream, without unmerging the branch to the block's token count or merging the sum;
- RoPE models (EVA-02): each token keeps one representative position; the block gets the rotary
  embedding gathered at those positions;
- after the last block, merged tokens are unmerged back to the original token count, so
  average pooling is size-weighted and ``forward_features`` keeps its shape (not after pruning).

All state lives in one object per application, reset at the first block of every forward.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .merge import Match, bipartite_match, compose, merge, split_alternate, take
from .prune import cls_attention, prune_by_score, pruned_count

__all__ = ["supports_timm", "apply_timm", "merge_schedule", "max_constant_r"]


def _block_kinds() -> dict[type, str]:
    """Supported block classes -> the submodule whose input is the MLP branch's input."""
    from timm.models.eva import EvaBlock
    from timm.models.vision_transformer import Block, ResPostBlock

    return {Block: "norm2", EvaBlock: "norm2", ResPostBlock: "mlp"}


def _model_types() -> tuple[type, ...]:
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    return (VisionTransformer, Eva)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.blocks)


def supports_timm(model: Any, cfg: Any) -> str | None:
    """None when ``cfg`` (TokenMerge / TokenPrune) can be applied to ``model``, else the reason."""
    name = type(model).__name__
    if not isinstance(model, _model_types()):
        return (f"{name} is not a supported timm ViT; supported are VisionTransformer (vit_*, deit_*, deit3_*, "
                "DINOv2, *_reg*, CLIP) and Eva (eva02_*)")
    kinds = _block_kinds()
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        return f"{name} has no `blocks` sequence"
    for i, blk in enumerate(blocks):
        if type(blk) not in kinds:
            return (f"{name}.blocks[{i}] is a {type(blk).__name__}; token reduction supports "
                    f"{', '.join(k.__name__ for k in kinds)} blocks")
        if not isinstance(getattr(blk, "drop_path2", None), nn.Module):
            return f"{name}.blocks[{i}] has no drop_path2 module (the end of its MLP branch)"
        attn = getattr(blk, "attn", None)
        for sub in ("q_norm", "k_norm"):
            if not isinstance(getattr(attn, sub, None), nn.Module):
                return f"{name}.blocks[{i}].attn ({type(attn).__name__}) has no {sub} module to read keys from"
    hooked = [(i, sub, m) for i, blk in enumerate(blocks)
              for sub, m in (("attn.q_norm", blk.attn.q_norm), ("attn.k_norm", blk.attn.k_norm),
                             (kinds[type(blk)], getattr(blk, kinds[type(blk)])), ("drop_path2", blk.drop_path2))]
    seen: dict[int, str] = {}
    for i, sub, m in hooked:
        where = seen.setdefault(id(m), f"blocks[{i}].{sub}")
        if where != f"blocks[{i}].{sub}":
            return f"{name}.blocks[{i}].{sub} is the same module as {where}; token reduction hooks each block's own"
    other = {"token_merge": "token_prune", "token_prune": "token_merge"}[cfg.key]
    from .._patching import _ACTIVE

    if other in _ACTIVE.get(model, {}):
        return f"{other} is already applied; token merging and pruning do not stack, remove it first"
    if cfg.key == "token_prune":
        if getattr(model, "cls_token", None) is None:
            return f"{name} has no class token; class-attention pruning (criterion='cls_attn') needs one"
        if cfg.blocks is not None and max(cfg.blocks) >= len(blocks):
            return f"TokenPrune blocks={cfg.blocks} but {name} has {len(blocks)} blocks (0..{len(blocks) - 1})"
    else:
        try:
            merge_schedule(cfg, len(blocks), _num_tokens(model), model.num_prefix_tokens, name)
        except ValueError as exc:
            return str(exc)
    return None


def _num_tokens(model: nn.Module) -> int:
    return int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)


def _distribute(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder)."""
    s = sum(weights)
    raw = [total * w / s for w in weights]
    out = [math.floor(v) for v in raw]
    rest = sorted(range(len(raw)), key=lambda i: (-(raw[i] - out[i]), i))
    for i in rest[: total - sum(out)]:
        out[i] += 1
    return out


def merge_schedule(cfg: Any, depth: int, n: int, protected: int, name: str = "model") -> list[int]:
    """Tokens merged in each block for a TokenMerge config, checked against the sequence length.

    A block can merge at most the size of set A (half its mergeable tokens, rounded up). An int ``r``
    is clamped to that in late blocks (as in ToMe: ``r=16`` on ViT-B/16 merges 16 per block while it
    can), but must fit the first block; an explicit per-block sequence and ``keep`` must fit exactly.
    """
    m = n - protected
    if m < 2:
        raise ValueError(f"{name} has {m} mergeable tokens (N={n}, {protected} protected): nothing to merge")
    if isinstance(cfg.r, tuple):
        if len(cfg.r) != depth:
            raise ValueError(f"TokenMerge r has {len(cfg.r)} values but {name} has {depth} blocks")
        rs, strict = list(cfg.r), True
    elif cfg.keep is None and cfg.schedule == "constant":
        rs, strict = [cfg.r] * depth, False
    else:
        total = cfg.r * depth if cfg.keep is None else int(math.floor((1 - cfg.keep) * m + 1e-9))
        weights = [1.0] * depth if cfg.schedule == "constant" else [float(depth - i) for i in range(depth)]
        rs, strict = _distribute(total, weights), cfg.keep is not None
    out = []
    for i, r in enumerate(rs):
        room = (m + 1) // 2  # size of set A
        if r > room and (strict or i == 0):
            what = f"keep={cfg.keep} cannot be reached on" if cfg.keep is not None else f"r={cfg.r} is too large for"
            raise ValueError(
                f"TokenMerge {what} {name}: block {i} has {m} mergeable tokens "
                f"(N={m + protected}, {protected} protected), so at most {room} can merge there"
                + (f"; use r <= {(n - protected + 1) // 2}" if i == 0 and not strict else
                   "; use a smaller r / a larger keep"))
        r = min(r, room)
        out.append(r)
        m -= r
    return out


def max_constant_r(depth: int, n: int, protected: int) -> int:
    """The largest constant r that every one of ``depth`` blocks merges in full (no clamping)."""
    best = 0
    for r in range(1, n):
        m, ok = n - protected, True
        for _ in range(depth):
            if r > (m + 1) // 2:
                ok = False
                break
            m -= r
        if not ok:
            break
        best = r
    return best


def _gather_rope(rope: torch.Tensor, patch_idx: torch.Tensor) -> torch.Tensor:
    """Rotary embedding [N, D] or [H, N, D] at per-sample patch positions [B, M] -> [B, 1|H, M, D]."""
    if rope.dim() == 2:
        return rope[patch_idx].unsqueeze(1)
    if rope.dim() == 3:
        return rope[:, patch_idx].transpose(0, 1)
    raise ValueError(f"token reduction supports rotary embeddings of shape [N, D] or [H, N, D], got {tuple(rope.shape)}")


class _State:
    """Per-application runtime state (one forward at a time)."""

    def __init__(self, model: nn.Module, cfg: Any):
        self.cfg = cfg
        self.name = type(model).__name__
        self.depth = len(model.blocks)
        self.protected = int(model.num_prefix_tokens)
        self.is_merge = cfg.key == "token_merge"
        self.plans: dict[int, list] = {}
        self.last_inv: torch.Tensor | None = None
        self.parts: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset(0)

    def reset(self, n: int) -> None:
        self.n0 = n
        self.size: torch.Tensor | None = None
        self.inv_total: torch.Tensor | None = None
        self.origin: torch.Tensor | None = None
        self.match: Match | None = None
        self.q_cls: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.mlp_x: torch.Tensor | None = None  # this block's reduced MLP input, its sizes, and the MLP branch
        self.mlp_size: torch.Tensor | None = None
        self.branch: torch.Tensor | None = None

    def plan(self, n: int) -> list:
        if n not in self.plans:
            if self.is_merge:
                self.plans[n] = merge_schedule(self.cfg, self.depth, n, self.protected, self.name)
            else:
                blocks = self.cfg.blocks
                if blocks is None:
                    blocks = sorted({self.depth // 4, self.depth // 2, (3 * self.depth) // 4} - {0} or {0})
                self.plans[n] = [self.cfg.keep if i in blocks else None for i in range(self.depth)]
        return self.plans[n]

    def partition(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (n, str(device))
        if key not in self.parts:
            self.parts[key] = split_alternate(n, self.protected, device=device)
        return self.parts[key]


def apply_timm(model: nn.Module, cfg: Any, handle: Any) -> None:
    """Install token merging (TokenMerge) or pruning (TokenPrune) on a timm ViT through ``handle``."""
    why = supports_timm(model, cfg)
    if why is not None:
        from .._patching import UnsupportedModelError

        raise UnsupportedModelError(f"{type(cfg).__name__} cannot be applied to {type(model).__name__}: {why}")
    st = _State(model, cfg)
    handle.state["tokens"] = st
    kinds = _block_kinds()
    blocks = _blocks(model)
    last = len(blocks) - 1
    for i, blk in enumerate(blocks):
        _install_block(i, last, blk, kinds[type(blk)], st, handle)


def _install_block(i: int, last: int, blk: nn.Module, mlp_in: str, st: _State, handle: Any) -> None:
    attn = blk.attn
    scale = float(getattr(attn, "scale", attn.head_dim ** -0.5))

    def q_hook(mod, args, q):  # pruning only: the class token's query
        if st.plan(st.n0)[i] is not None:
            st.q_cls = q[:, :, :1]

    def k_hook(mod, args, k):
        step = st.plan(st.n0)[i]
        if not step:
            return None
        n = k.shape[-2]
        if st.is_merge:
            a, b = st.partition(n, k.device)
            st.match = bipartite_match(k.mean(dim=1), a, b, step)
        else:
            score = cls_attention(st.q_cls, k, scale, st.bias)
            st.match = prune_by_score(score, st.protected, pruned_count(n, st.protected, step), st.cfg.fuse)
            st.q_cls = None
        return None

    def mlp_in_hook(mod, args):
        if st.match is None:
            return None
        st.mlp_x, st.mlp_size = merge(args[0], st.match, st.size)
        return (st.mlp_x, *args[1:])

    def branch_hook(mod, args, out):
        # the MLP branch's last step, on the reduced tokens: keep it for the block's output, and hand
        # the block's residual add a broadcast zero, whose sum (the unreduced residual) is discarded
        if st.match is None:
            return None
        st.branch = out
        return out.new_zeros((1,) * out.dim())

    if not st.is_merge:
        handle.add_hook(attn.q_norm.register_forward_hook(q_hook))
    handle.add_hook(attn.k_norm.register_forward_hook(k_hook))
    handle.add_hook(getattr(blk, mlp_in).register_forward_pre_hook(mlp_in_hook))
    handle.add_hook(blk.drop_path2.register_forward_hook(branch_hook))

    def make(orig):
        def forward(x, *args, **kwargs):
            if i == 0:
                st.reset(x.shape[1])
                st.plan(st.n0)
            st.match = None
            st.bias = None
            st.mlp_x = st.mlp_size = st.branch = None
            if st.size is not None and st.cfg.prop_attn:
                st.bias = st.size.transpose(1, 2).log().unsqueeze(1)  # [B, 1, 1, N]
                if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
                    raise ValueError("token reduction cannot be combined with an attention mask or causal attention")
                kwargs["attn_mask"] = st.bias
            rope = kwargs.get("rope")
            if rope is not None and st.origin is not None:
                kwargs["rope"] = _gather_rope(rope, st.origin[:, st.protected:] - st.protected)
            out = orig(x, *args, **kwargs)
            m = st.match
            if m is not None:
                if st.branch is None:
                    raise RuntimeError(f"{st.name}.blocks[{i}] ran without its MLP branch ({mlp_in} -> drop_path2); "
                                       "token reduction needs the residual block layout of timm's blocks")
                # timm's output is the branch's input plus a broadcast zero (branch_hook): the reduced output
                # is the reduced input plus the branch computed on it
                out, st.size = st.mlp_x + st.branch, st.mlp_size
                st.origin = m.rep if st.origin is None else st.origin.gather(1, m.rep)
                if st.is_merge:
                    st.inv_total = compose(st.inv_total, m)
                st.match = None
            if i == last:
                st.last_inv = st.inv_total  # original position -> final token (for visualisation)
                if st.is_merge and st.inv_total is not None:
                    out = take(out, st.inv_total)
                st.reset(0)
            return out

        return forward

    handle.wrap_forward(blk, make)
