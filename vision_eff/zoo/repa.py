"""Representation alignment (REPA) for training the built-in DiT.

Yu et al. 2025, "Representation Alignment for Generation: Training Diffusion Transformers Is Easier
Than You Think": a DiT learns the structure of its images slowly because its early blocks must
discover, from noisy inputs alone, what a pretrained vision encoder already knows. REPA adds a
loss that pulls a projection of one early block's hidden tokens towards the encoder's patch
features of the *clean* image (negative cosine similarity, token by token). The projector is a
training-only MLP: it is neither part of the model nor saved.

Here the encoder is the built-in ``shapes-vit`` (a classifier trained on the same data): its 16x16
patch grid at 64x64 input lines up with the DiT's 16x16 tokens at 32x32 input (patch 2), so the
32x32 training images are upsampled to 64x64 for it. Its last block's patch tokens are never used by
its class-token head, so the features come from an earlier block (``encoder_block``).

    align = RepaAlignment(transformer, block=1, encoder_block=4)
    out = transformer(xt, t, class_labels=y).sample     # the hook records block 1's tokens
    loss = mse(out, target) + 0.5 * align.loss(x0)
    align.remove()                                      # the transformer is as it was
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["RepaAlignment", "encoder_features", "DEFAULT_REPA"]

# what ``vision-eff zoo train shapes-dit --repa`` puts in the recipe: the DiT's second block (REPA
# aligns about a third of the way in) against the fifth of shapes-vit's six, loss weight 0.5 (REPA's)
DEFAULT_REPA = dict(block=1, encoder_block=4, weight=0.5)


@torch.no_grad()
def encoder_features(encoder: nn.Module, images: torch.Tensor, block: int, size: int) -> torch.Tensor:
    """Patch tokens [B, N, C] of the timm ViT ``encoder`` after block ``block`` (0-based), for images
    [B, 3, H, W] in [-1, 1] resized to ``size`` x ``size``."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    (feats,) = encoder.forward_intermediates(images, indices=[block], output_fmt="NLC", intermediates_only=True)
    return feats.float()


class RepaAlignment(nn.Module):
    """The REPA loss for one transformer block of a diffusers DiT (a forward hook reads its output).

    ``transformer``: a ``DiTTransformer2DModel`` (any model with ``transformer_blocks``); ``block``: the
    index of the block whose output is aligned; ``encoder``: a frozen timm ViT (default: the trained
    ``shapes-vit``) whose patch grid matches the transformer's tokens, read after its block
    ``encoder_block`` at its own input size (the images are resized to it). Only the projector
    (``hidden`` wide) has parameters. Call :meth:`loss` after each forward of the transformer.
    """

    def __init__(self, transformer: nn.Module, block: int = 1, encoder: nn.Module | None = None,
                 encoder_block: int = 4, hidden: int = 256):
        super().__init__()
        blocks = getattr(transformer, "transformer_blocks", None)
        if blocks is None:
            raise ValueError(f"REPA needs a diffusers transformer with `transformer_blocks`, got {type(transformer).__name__}")
        if not 0 <= block < len(blocks):
            raise ValueError(f"REPA block={block}, but the transformer has {len(blocks)} blocks (0..{len(blocks) - 1})")
        if encoder is None:
            from ..vit.builtin import load_vit

            encoder = load_vit()
        depth = len(encoder.blocks)
        if not 0 <= encoder_block < depth:
            raise ValueError(f"REPA encoder_block={encoder_block}, but the encoder has {depth} blocks (0..{depth - 1})")
        cfg = transformer.config
        tokens = (cfg.sample_size // cfg.patch_size) ** 2
        enc_tokens = int(encoder.patch_embed.num_patches)
        if tokens != enc_tokens:
            raise ValueError(f"REPA: the transformer has {tokens} tokens but the encoder {enc_tokens} patches; "
                             f"use an encoder whose patch grid matches the transformer's")
        encoder.requires_grad_(False).eval()
        # kept out of the module tree: frozen, never optimised, synced or saved
        object.__setattr__(self, "encoder", encoder)
        self.block, self.encoder_block = block, encoder_block
        self.encoder_size = int(encoder.patch_embed.img_size[0])
        width = cfg.num_attention_heads * cfg.attention_head_dim
        self.proj = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, encoder.embed_dim))
        self._hidden: torch.Tensor | None = None
        self._hook = blocks[block].register_forward_hook(self._record)

    def _record(self, mod, args, out) -> None:
        self._hidden = out[0] if isinstance(out, tuple) else out

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        """Mean negative cosine similarity between projected block tokens and the encoder's tokens of ``x0``."""
        if self._hidden is None:
            raise RuntimeError("RepaAlignment.loss() needs a forward of the transformer first")
        h, self._hidden = self._hidden, None
        if next(self.encoder.parameters()).device != x0.device:  # not a submodule: accelerate does not move it
            self.encoder.to(x0.device)
        target = encoder_features(self.encoder, x0, self.encoder_block, self.encoder_size)
        if target.shape[:2] != h.shape[:2]:
            raise ValueError(f"REPA: the transformer block gives {tuple(h.shape[:2])} tokens but the encoder "
                             f"{tuple(target.shape[:2])}")
        z = self.proj(h.float())
        return -F.cosine_similarity(z, target, dim=-1).mean()

    def remove(self) -> None:
        """Detach the hook from the transformer."""
        self._hook.remove()
