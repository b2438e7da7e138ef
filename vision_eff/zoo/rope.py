"""2D rotary position embedding (RoPE) for the self-attention of a diffusers DiT.

Diffusers' ``DiTTransformer2DModel`` knows where a token is only through the absolute sine-cosine
embedding added once to the patch tokens. 2D RoPE (as in FLUX, Lumina-Next and LightningDiT) rotates
each head's queries and keys by angles proportional to the token's row and column, so an attention score
depends on the offset between two tokens: the translation-equivariant bias that a convolution has, given
to attention. It has no parameters; :class:`RoPE2DAttnProcessor` installs it through diffusers' attention
processor API (``Attention.set_processor``), on one model, leaving the class untouched.

The maths is plain functions: :func:`rope_2d_angles` (the angle of every token and frequency) and
:func:`apply_rope` / :func:`rotate` (the rotation, from the angles or from their cached cosines and sines).
"""
from __future__ import annotations

import torch
from torch import nn

ROPE_THETA = 100.0  # wavelengths of 6 to 350 tokens: the range a 16x16 grid uses (10000 wastes most of them)


def rope_2d_angles(grid: int, head_dim: int, theta: float = ROPE_THETA, dtype=torch.float32) -> torch.Tensor:
    """Angles ``[grid * grid, head_dim // 2]`` of a row-major ``grid x grid`` token grid: the first half of a
    token's angles is its row times ``head_dim // 4`` frequencies ``theta ** (-k / (head_dim // 4))``, the
    second half its column times the same frequencies."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE splits each head into row and column pairs: head_dim must be a multiple of 4, "
                         f"got {head_dim}")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = pos.repeat_interleave(grid), pos.repeat(grid)
    return torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1).to(dtype)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., tokens, head_dim]``: channel ``i`` and ``i + head_dim // 2`` form a pair turned by
    ``angles[..., token, i]`` (the rotate-half convention; ``angles`` broadcasts over the leading dims)."""
    half = x.shape[-1] // 2
    if angles.shape[-2:] != (x.shape[-2], half):
        raise ValueError(f"angles of shape {tuple(angles.shape)} do not fit {x.shape[-2]} tokens of head_dim "
                         f"{x.shape[-1]}")
    return rotate(x, angles.cos(), angles.sin())


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` from the cosines and sines of the angles (what a layer caches)."""
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RoPE2DAttnProcessor:
    """Self-attention with 2D RoPE on the queries and keys, for the attention layers of a diffusers
    transformer whose tokens form a full ``grid x grid`` row-major grid (a DiT's patch tokens).

    A sequence of any other length (fewer tokens after merging or pruning, a cross-attention input) is
    refused with an error rather than embedded at wrong positions, unless ``positions`` (``[batch, tokens]``
    grid indices, set by masked-token training for the blocks that see a subset) says where its tokens are.
    """

    def __init__(self, grid: int, theta: float = ROPE_THETA):
        self.grid, self.theta = grid, theta
        self.positions: torch.Tensor | None = None
        self._tables: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The cosines and sines of :func:`rope_2d_angles`, computed once per head size and device."""
        key = (head_dim, device)
        if key not in self._tables:
            angles = rope_2d_angles(self.grid, head_dim, self.theta).to(device)
            self._tables[key] = (angles.cos(), angles.sin())
        return self._tables[key]

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("RoPE2DAttnProcessor is for unmasked self-attention over image tokens; this call "
                             "has encoder_hidden_states or an attention mask")
        if self.positions is not None and self.positions.shape != (b, n):
            raise ValueError(f"positions of shape {tuple(self.positions.shape)} do not fit {b} x {n} tokens")
        if self.positions is None and n != self.grid * self.grid:
            raise ValueError(f"this model's attention embeds positions of a full {self.grid}x{self.grid} token "
                             f"grid ({self.grid * self.grid} tokens) with 2D RoPE, and got {n} tokens: token "
                             "merging or pruning cannot run on it")
        if getattr(attn, "spatial_norm", None) is not None or getattr(attn, "group_norm", None) is not None \
                or attn.residual_connection or attn.rescale_output_factor != 1.0:
            raise ValueError("RoPE2DAttnProcessor supports plain attention layers (no spatial or group norm, "
                             "residual connection or output rescaling)")
        heads = attn.heads
        q, k, v = (lin(hidden_states) for lin in (attn.to_q, attn.to_k, attn.to_v))
        head_dim = q.shape[-1] // heads
        q, k, v = (t.view(b, n, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        cos, sin = self.tables(head_dim, q.device)
        if self.positions is not None:  # [b, 1 (heads), n, head_dim // 2]
            pos = self.positions.to(q.device)
            cos, sin = cos[pos][:, None], sin[pos][:, None]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, n, heads * head_dim).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def install_rope(transformer: nn.Module, grid: int, theta: float = ROPE_THETA) -> nn.Module:
    """Give every attention layer of ``transformer`` (one instance) 2D RoPE; returns it."""
    from diffusers.models.attention_processor import Attention

    layers = [m for m in transformer.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"{type(transformer).__name__} has no diffusers attention layers to give 2D RoPE")
    processor = RoPE2DAttnProcessor(grid, theta)
    for layer in layers:
        layer.set_processor(processor)
    return transformer
