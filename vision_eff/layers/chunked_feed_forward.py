"""``ChunkedFeedForward(rows=4096)``: run every token-wise feed-forward on blocks of rows that fit the CPU cache.

A transformer feed-forward (diffusers ``FeedForward`` with GEGLU / GELU / SwiGLU, timm ``Mlp`` /
``GluMlp`` / ``SwiGLU``) treats every token on its own, so running it on slices of the flattened
``[batch * tokens, C]`` input and concatenating the results computes the same function. On a CPU it
bounds the size of the hidden activations: the built-in UNet's 32x32 level at batch 64 makes a 64 MB
GEGLU intermediate, which glibc serves by mmap and faults in again page by page after every free, while
4096-row slices are reused from the heap. Most of what it saves is those page faults: with freed memory
kept in the process (``vision-eff bench`` does so by default) it is about level on its own and faster
only beside step caching and merging (README: "The feed-forward in cache-sized slices"). On a GPU it
only adds launches: leave it off there.

The wrapper calls the module's own forward on each slice (nothing of it is copied), so any
activation, norm or dropout inside keeps working; inputs with at most ``rows`` rows take the original
path unchanged. diffusers' ``BasicTransformerBlock.set_chunk_feed_forward`` is the upstream relative:
it splits one dimension into equal parts (it must divide it) and is per block; this one bounds the
rows, works on any size and on every supported module of a pipeline or timm model at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._patching import PatchHandle, denoiser_of
from .._validate import check_int

__all__ = ["ChunkedFeedForward", "feed_forward_modules"]


def _feed_forward_types() -> tuple[type, ...]:
    types: list[type] = []
    try:
        from diffusers.models.attention import FeedForward
        types.append(FeedForward)
    except ImportError:  # diffusers is a dependency, but a timm-only environment still works
        pass
    try:
        from timm.layers import GluMlp, Mlp, SwiGLU
        types += [Mlp, GluMlp, SwiGLU]
    except ImportError:
        pass
    return tuple(types)


def feed_forward_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The token-wise feed-forward modules of ``root`` (outermost only)."""
    types = _feed_forward_types()
    found: list[tuple[str, nn.Module]] = []
    for name, m in root.named_modules():
        if isinstance(m, types) and not any(name.startswith(f"{n}.") for n, _ in found):
            found.append((name, m))
    return found


def chunked_call(fn, x: torch.Tensor, rows: int, *args, **kwargs) -> torch.Tensor:
    """``fn(x)`` for a token-wise ``fn``, computed on slices of at most ``rows`` rows of ``x`` [..., C]."""
    if x.dim() < 2:
        return fn(x, *args, **kwargs)
    c = x.shape[-1]
    total = x.numel() // c if c else 0
    if total <= rows:
        return fn(x, *args, **kwargs)
    flat = x.reshape(total, c)
    out = torch.cat([fn(flat[i:i + rows], *args, **kwargs) for i in range(0, total, rows)], dim=0)
    return out.view(*x.shape[:-1], out.shape[-1])


@dataclass(frozen=True)
class ChunkedFeedForward:
    """Run the feed-forward of every transformer block on slices of at most ``rows`` token rows.

    Exact up to float rounding of the smaller matrix products (the tests compare with the unpatched
    model); a CPU optimisation (see the module docstring). Applies to diffusers pipelines and models
    (UNets, DiT / PixArt, SD3, Flux: every ``FeedForward``) and to timm models (``Mlp``, ``GluMlp``,
    ``SwiGLU``). Stacks with token merging (the merged tokens are chunked) and step caching.
    """

    rows: int = 4096

    def __post_init__(self):
        check_int("ChunkedFeedForward rows", self.rows, 1)

    @property
    def key(self) -> str:
        return "chunked_feed_forward"

    def supports(self, obj: Any) -> str | None:
        try:
            root = denoiser_of(obj)
        except TypeError as exc:
            return str(exc)
        if not feed_forward_modules(root):
            return ("it has no token-wise feed-forward modules (diffusers FeedForward, timm Mlp / GluMlp / SwiGLU) "
                    "to chunk")
        return None

    def apply(self, obj: Any, handle: PatchHandle) -> None:
        rows = self.rows

        def make(orig):
            def forward(x, *args, **kwargs):
                return chunked_call(orig, x, rows, *args, **kwargs)
            return forward

        names = []
        for name, m in feed_forward_modules(denoiser_of(obj)):
            handle.wrap_forward(m, make)
            names.append(name)
        handle.state["modules"] = names
