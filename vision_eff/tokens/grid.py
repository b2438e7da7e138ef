"""Token-grid helpers for diffusion models: the ToMe-for-SD partition and the grid of a token sequence.

Pure tensor / integer functions, no knowledge of diffusers.

``grid_partition`` splits an ``h x w`` token grid into sources (set A) and destinations (set B):
one destination per ``sy x sx`` cell, chosen pseudo-randomly from ``(seed, salt, cell)`` with an
integer hash computed by tensor ops. No ``torch.Generator`` is involved, so the partition is the
same on every device, independent of the batch (every sample, cond and uncond alike, shares it),
reproducible under a seed, and traced by ``torch.compile`` without graph breaks (all shapes are
static given ``h``, ``w``, ``sx``, ``sy``). Tokens in incomplete cells at the right/bottom edge are sources.
"""
from __future__ import annotations

import math

import torch

__all__ = ["grid_partition", "token_grid", "pool_grid"]

_M32 = 0xFFFFFFFF


def _mix_int(x: int) -> int:
    """32-bit integer hash (Python side, for the seed/salt offset)."""
    x &= _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return ((x >> 16) ^ x) & _M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """The same 32-bit hash on an int64 tensor (no overflow: products stay below 2^59)."""
    x = x & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return ((x >> 16) ^ x) & _M32


def grid_partition(h: int, w: int, sx: int = 2, sy: int = 2, seed: int = 0, salt: int = 0,
                   device: torch.device | str | None = None,
                   step: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources ``a`` and destinations ``b`` (1-D long tensors of row-major positions) of an ``h x w`` grid.

    ``step`` (optional long tensor with one element, e.g. the timestep) re-draws the destinations per
    denoising step without leaving tensor ops (like tomesd's per-call random draw, but reproducible).
    """
    if h < 1 or w < 1 or sx < 1 or sy < 1:
        raise ValueError(f"grid_partition needs positive sizes, got h={h}, w={w}, sx={sx}, sy={sy}")
    hc, wc, k = h // sy, w // sx, sx * sy
    base = _mix_int(_mix_int(seed) ^ (salt * 0x9E3779B1))
    cy = torch.arange(hc, device=device).view(hc, 1, 1)
    cx = torch.arange(wc, device=device).view(1, wc, 1)
    key = cy * wc + cx + base
    if step is not None:
        key = key + _mix(step.reshape(-1)[:1].to(device=key.device, dtype=torch.long) * 0x9E3779B1 + base)
    choice = _mix(key) % k  # [hc, wc, 1]: the destination's offset inside its cell

    def position(off: torch.Tensor) -> torch.Tensor:
        return (cy * sy + off // sx) * w + cx * sx + off % sx

    b = position(choice).flatten()
    src_off = (choice + 1 + torch.arange(k - 1, device=device)) % k  # the other k-1 offsets of each cell
    a = [position(src_off).flatten()]
    if hc * sy < h:  # bottom rows outside complete cells
        a.append(torch.arange(hc * sy * w, h * w, device=device))
    if wc * sx < w:  # right columns outside complete cells
        rows = torch.arange(hc * sy, device=device).view(-1, 1)
        a.append((rows * w + torch.arange(wc * sx, w, device=device)).flatten())
    return torch.cat(a), b


def token_grid(n: int, height: int, width: int, max_factor: int = 64) -> tuple[int, int] | None:
    """The ``(h, w)`` grid of ``n`` tokens taken from a ``height x width`` input downsampled by some factor.

    Stride-2 convolutions and patch embeddings give ``ceil(height / f) x ceil(width / f)``; the smallest
    ``f`` that matches ``n`` wins. None when no factor fits.
    """
    for f in range(1, max_factor + 1):
        h, w = math.ceil(height / f), math.ceil(width / f)
        if h * w == n:
            return h, w
        if h * w < n:
            return None
    return None


def pool_grid(x: torch.Tensor, h: int, w: int, keep: float) -> torch.Tensor:
    """Average-pool tokens ``x`` [B, h*w, C] on their grid so that about ``keep`` of them remain (ToDo-style)."""
    s = math.sqrt(1.0 / keep)
    ho, wo = max(1, round(h / s)), max(1, round(w / s))
    if (ho, wo) == (h, w):
        return x
    b, n, c = x.shape
    g = x.transpose(1, 2).reshape(b, c, h, w)
    return torch.nn.functional.adaptive_avg_pool2d(g, (ho, wo)).flatten(2).transpose(1, 2)
