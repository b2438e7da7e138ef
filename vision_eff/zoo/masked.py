"""Masked-token training for a diffusers DiT, after MDT (Gao et al. 2023, "Masked Diffusion Transformer is a
Strong Image Synthesizer").

MDT's diagnosis is the one this zoo's pixel DiT shows: a DiT learns each patch's denoising long before it
learns how the parts of an object relate (its samples are blobs with ragged outlines, `distill/README.md`).
MDT's cure: in training, drop a random share of the patch tokens before the first blocks (the *encoder*),
put a learned mask token, with the position embedding of its place, where they were, and let the last blocks
(the *decoder*) predict every patch, the dropped ones included, from the context the encoder kept. The model
used for sampling is the unchanged DiT: the mask token is a training-only parameter, never saved.

:class:`MaskedTokenTraining` does this on one model instance with two forward hooks (no class is patched,
no forward copied): a pre-hook on block 0 keeps the chosen tokens, a hook on the last encoder block puts the
mask tokens back. It is active only inside ``with masking.masked(gen):``; ``remove()`` takes the hooks off. On a DiT with 2D
RoPE (:mod:`vision_eff.zoo.rope`) the encoder blocks' attention is told the grid positions of the kept tokens.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def keep_indices(batch: int, tokens: int, keep: int, gen: torch.Generator) -> torch.Tensor:
    """``[batch, keep]`` sorted token indices, a uniformly random subset for each sample."""
    return torch.rand(batch, tokens, generator=gen).argsort(dim=1)[:, :keep].sort(dim=1).values


def gather_tokens(hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The tokens ``idx [B, K]`` of ``hidden [B, N, D]``: ``[B, K, D]``."""
    return hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))


def fill_tokens(kept: torch.Tensor, idx: torch.Tensor, filler: torch.Tensor) -> torch.Tensor:
    """``filler [B or 1, N, D]`` with the tokens ``kept [B, K, D]`` written back at ``idx [B, K]``."""
    base = filler.expand(kept.shape[0], -1, -1)
    return base.scatter(1, idx[..., None].expand(-1, -1, kept.shape[-1]), kept)


class MaskedTokenTraining(nn.Module):
    """MDT-style token masking for the training of a diffusers ``DiTTransformer2DModel``.

    ``ratio``: the share of patch tokens dropped (0 < ratio < 1); ``encoder_blocks``: how many of the first
    blocks see only the kept tokens (the rest, at least one, see every position). Holds the mask token.
    """

    def __init__(self, transformer: nn.Module, ratio: float = 0.5, encoder_blocks: int | None = None):
        super().__init__()
        blocks = getattr(transformer, "transformer_blocks", None)
        pos = getattr(getattr(transformer, "pos_embed", None), "pos_embed", None)
        if blocks is None or pos is None:
            raise ValueError(f"masked-token training is for a diffusers DiT with a fixed position embedding, "
                             f"not {type(transformer).__name__}")
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
        encoder_blocks = len(blocks) // 2 if encoder_blocks is None else encoder_blocks
        if not 1 <= encoder_blocks < len(blocks):
            raise ValueError(f"encoder_blocks must be in [1, {len(blocks) - 1}] for {len(blocks)} blocks, got {encoder_blocks}")
        from .rope import RoPE2DAttnProcessor

        # a DiT with 2D RoPE is told where the kept tokens are for the encoder blocks
        self._ropes = list({id(p): p for p in (getattr(m, "processor", None) for m in transformer.modules())
                            if isinstance(p, RoPE2DAttnProcessor)}.values())
        self.ratio, self.encoder_blocks = ratio, encoder_blocks
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pos.shape[-1]))
        object.__setattr__(self, "_transformer", transformer)  # not a submodule: not trained or saved through this
        self._gen: torch.Generator | None = None
        self._idx: torch.Tensor | None = None
        self._hooks = [blocks[0].register_forward_pre_hook(self._drop, with_kwargs=True),
                       blocks[encoder_blocks - 1].register_forward_hook(self._refill)]

    def _drop(self, module, args, kwargs):
        if self._gen is None:
            return None
        hidden = args[0]
        b, n, _ = hidden.shape
        keep = max(1, round(n * (1 - self.ratio)))
        self._idx = keep_indices(b, n, keep, self._gen).to(hidden.device)
        for rope in self._ropes:
            rope.positions = self._idx
        return (gather_tokens(hidden, self._idx), *args[1:]), kwargs

    def _refill(self, module, args, output):
        if self._gen is None:
            return None
        for rope in self._ropes:
            rope.positions = None
        pos = self._transformer.pos_embed.pos_embed.to(output.dtype)
        return fill_tokens(output, self._idx, self.mask_token.to(output.dtype) + pos)

    @contextmanager
    def masked(self, gen: torch.Generator):
        """Within the block, forwards of the transformer drop tokens (drawn from ``gen``) as described."""
        self._gen = gen
        try:
            yield self
        finally:
            self._gen, self._idx = None, None
            for rope in self._ropes:
                rope.positions = None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
