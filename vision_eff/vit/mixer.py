"""A structurally cheaper token mixer for the early blocks of a timm ViT, swapped in reversibly.

:class:`PoolAttention` is attention with fixed, local weights: every patch token takes the plain
average of the values in its ``kernel x kernel`` neighbourhood on the patch grid (PoolFormer-style
pooling, but in value space), prefix tokens (class, registers) the average over all tokens. It keeps
the attention's value and output projections, so it starts as a sensible approximation of a block
whose attention is mostly local, and drops the query/key projections and the N x N score matrix:
cost ``2 N C^2 + k^2 N C`` instead of ``4 N C^2 + 2 N^2 C``.

:class:`MixerSwap` (``vision_eff.apply(vit, MixerSwap(blocks=(0, 1)))``) replaces the chosen
blocks by copies whose ``attn`` is a PoolAttention (the block's own forward runs unchanged), and can
load recovered weights (see :mod:`vision_eff.vit.recover`). ``remove()`` puts the original blocks back.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["PoolAttention", "MixerSwap"]


class PoolAttention(nn.Module):
    """Local average attention over a patch grid (see the module docstring)."""

    def __init__(self, dim: int, grid: tuple[int, int], num_prefix: int, kernel: int = 3):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd size >= 1, got {kernel}")
        self.grid, self.num_prefix, self.kernel = tuple(grid), int(num_prefix), int(kernel)
        self.v = nn.Linear(dim, dim)
        self.norm: nn.Module = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    @classmethod
    def from_attention(cls, attn: nn.Module, grid: tuple[int, int], num_prefix: int, kernel: int = 3) -> "PoolAttention":
        """Initialise from a timm ``Attention`` (value slice of ``qkv``, ``norm``, ``proj``)."""
        qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
        if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear) or qkv.out_features != 3 * proj.in_features:
            raise TypeError(f"{type(attn).__name__} has no fused qkv / proj linear layers to start PoolAttention from")
        dim = qkv.in_features
        if proj.in_features != dim or proj.out_features != dim:
            raise TypeError(f"{type(attn).__name__}: PoolAttention needs attention width == embedding width")
        mixer = cls(dim, grid, num_prefix, kernel).to(qkv.weight.dtype)
        with torch.no_grad():
            mixer.v.weight.copy_(qkv.weight[2 * dim:])
            if qkv.bias is not None:
                mixer.v.bias.copy_(qkv.bias[2 * dim:])
            else:
                mixer.v.bias.zero_()
            mixer.proj.load_state_dict(proj.state_dict() if proj.bias is not None else
                                       {"weight": proj.weight, "bias": torch.zeros(dim)})
        norm = getattr(attn, "norm", None)
        if isinstance(norm, nn.Module):
            mixer.norm = copy.deepcopy(norm)
        return mixer.to(qkv.weight.device)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                **kwargs: Any) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("PoolAttention does not take an attention mask (it mixes a fixed local window)")
        b, n, c = x.shape
        p = self.num_prefix
        h, w = self.grid
        if n != p + h * w:
            raise ValueError(f"PoolAttention expects {p} prefix + {h}x{w} patch tokens, got {n} tokens")
        v = self.v(x)
        patches = v[:, p:].transpose(1, 2).reshape(b, c, h, w)
        k = self.kernel
        pooled = F.avg_pool2d(patches, k, stride=1, padding=k // 2, count_include_pad=False)
        out = pooled.flatten(2).transpose(1, 2)
        if p:
            out = torch.cat([v.mean(dim=1, keepdim=True).expand(-1, p, -1), out], dim=1)
        return self.proj(self.norm(out))


def _grid(model: nn.Module) -> tuple[int, int]:
    g = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if g is None:
        raise TypeError(f"{type(model).__name__} has no patch_embed.grid_size")
    return int(g[0]), int(g[1])


@dataclass(frozen=True)
class MixerSwap:
    """Swap PoolAttention into blocks ``blocks`` of a timm VisionTransformer; ``weights``: recovered blocks."""

    blocks: tuple[int, ...] = (0, 1)
    kernel: int = 3
    weights: str | None = None

    key = "vit_mixer"

    def __post_init__(self) -> None:
        if isinstance(self.blocks, int) or not isinstance(self.blocks, Sequence) or not self.blocks:
            raise ValueError(f"blocks must be a non-empty sequence of block indices, got {self.blocks!r}")
        object.__setattr__(self, "blocks", tuple(sorted(set(int(b) for b in self.blocks))))
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd size >= 1, got {self.kernel}")

    def supports(self, obj: Any) -> str | None:
        from timm.models.vision_transformer import Attention, Block, VisionTransformer

        if not isinstance(obj, VisionTransformer):
            return f"MixerSwap supports timm VisionTransformer models, not {type(obj).__name__}"
        if getattr(obj, "dynamic_img_size", False):
            return "the pooling mixer needs a fixed patch grid (dynamic_img_size=False)"
        depth = len(obj.blocks)
        if max(self.blocks) >= depth:
            return f"blocks={self.blocks} but {type(obj).__name__} has {depth} blocks"
        for i in self.blocks:
            blk = obj.blocks[i]
            if type(blk) is not Block or not isinstance(blk.attn, Attention):
                return f"blocks[{i}] is a {type(blk).__name__} with {type(blk.attn).__name__}; needs Block/Attention"
        return None

    def build_blocks(self, model: nn.Module) -> dict[int, nn.Module]:
        """Copies of the chosen blocks with PoolAttention in place of attention (weights loaded if given)."""
        new = {}
        for i in self.blocks:
            blk = copy.deepcopy(model.blocks[i])
            blk.attn = PoolAttention.from_attention(model.blocks[i].attn, _grid(model), model.num_prefix_tokens,
                                                    self.kernel)
            new[i] = blk
        if self.weights is not None:
            from safetensors.torch import load_file

            from ..samplers.schedules import model_fingerprint
            from ..zoo.weights import read_metadata

            # recovered blocks are whole blocks (norms and MLP too) distilled from one model: refuse them on another
            base = read_metadata(self.weights).get("base_fingerprint")
            if base is not None and base != (this := model_fingerprint(model)):
                raise ValueError(f"{self.weights} holds blocks recovered from another model (fingerprint {base}, "
                                 f"this one {this}); recover them for this model with "
                                 "vision_eff.vit.recover.recover_mixer (`vision-eff zoo train shapes-vit-poolmixer` "
                                 "for the built-in ViT)")
            tensors = load_file(self.weights)
            for i, blk in new.items():
                prefix = f"blocks.{i}."
                sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if not sd:
                    raise ValueError(f"{self.weights} holds no weights for block {i} (has {sorted(tensors)[:3]}...)")
                blk.load_state_dict(sd)
        return new

    def apply(self, obj: nn.Module, handle: Any) -> None:
        ref = next(obj.parameters())
        for i, blk in self.build_blocks(obj).items():
            blk.to(device=ref.device, dtype=ref.dtype).train(obj.training)
            handle.set_attr(obj.blocks, str(i), blk)
