"""The big-model rows say where merging acts from a measurement, not a label."""
from __future__ import annotations

import torch

import vision_eff as ve
from tests.cache.tiny import sd_unet
from vision_eff.cache.bench import _merged_levels


def test_merged_levels_are_measured_per_layer():
    model = sd_unet()
    kw = dict(sample=torch.randn(1, 3, 16, 16), encoder_hidden_states=torch.randn(1, 4, 16))
    # the tiny UNet runs self-attention at 16x16 (3 layers), 8x8 (3) and 4x4 (mid block, 1)
    assert _merged_levels(model, kw, [ve.TokenMerge(ratio=0.5)]) == \
        "merging changes self-attention at 16x16: 3/3, 8x8: 3/3, 4x4: 1/1"
    # layers below min_tokens are not merged, although their inputs change upstream
    assert _merged_levels(model, kw, [ve.TokenMerge(ratio=0.5, min_tokens=200)]) == \
        "merging changes self-attention at 16x16: 3/3, 8x8: 0/3, 4x4: 0/1"
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())
