"""Tiny random-weight configs of every timm ViT family token reduction supports (shared by tests)."""
from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import ResPostBlock

# name -> (timm model name, overrides); all 32x32 input, patch 4 -> 64 patch tokens
FAMILIES = {
    "vit": ("vit_base_patch16_224", {}),
    "deit_distilled": ("deit_base_distilled_patch16_224", {}),
    "deit3_layerscale": ("deit3_base_patch16_224", {}),
    "eva02_rope_swiglu": ("eva02_tiny_patch14_224", {"ref_feat_shape": (8, 8)}),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", {}),
    "qk_norm": ("vit_base_patch16_224", {"qk_norm": True}),
    "clip_prenorm": ("vit_base_patch32_clip_224", {}),
    "avgpool_no_cls": ("vit_base_patch16_224", {"class_token": False, "global_pool": "avg", "fc_norm": True}),
    "res_post": ("vit_base_patch16_224", {"block_fn": ResPostBlock}),  # post-norm blocks (norm after attn / mlp)
}


def tiny(family: str, depth: int = 3, dim: int = 48, heads: int = 3, seed: int = 0, num_classes: int = 10):
    name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    kw = dict(pretrained=False, img_size=32, patch_size=4, embed_dim=dim, depth=depth, num_heads=heads,
              num_classes=num_classes, **extra)
    model = timm.create_model(name, **kw).eval()
    with torch.no_grad():  # make LayerScale / gammas / biases matter (timm inits them tiny or zero)
        for n, p in model.named_parameters():
            if any(t in n for t in ("ls1", "ls2", "gamma")):
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias") or "token" in n or "pos_embed" in n:
                p.normal_(0, 0.3)
    return model


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
