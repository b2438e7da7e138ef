"""The built-in ViT: 257 tokens, a short training run writes loadable safetensors with its recipe."""
from __future__ import annotations

import torch

from vision_eff.vit.builtin import VIT_CONFIG, build_vit, load_vit, train_vit
from vision_eff.zoo.weights import read_metadata


def test_build_train_save_load(tmp_path):
    model = build_vit()
    assert model.patch_embed.num_patches + model.num_prefix_tokens == 257
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 8)
    out = train_vit(steps=2, batch_size=4, out=tmp_path / "vit.safetensors", progress=False, eval_count=16)
    meta = read_metadata(out)
    assert meta["model"] == "shapes-vit" and meta["steps_done"] == 2 and meta["config"]["embed_dim"] == VIT_CONFIG["embed_dim"]
    loaded = load_vit(out)
    assert 0.0 <= meta["eval_accuracy"] <= 1.0 and meta["eval_images"] == 16
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_vit(out)(x), loaded(x))
