"""PoolAttention against a loop oracle; MixerSwap reversibility; distillation recovery lowers the feature error."""
from __future__ import annotations

import pytest
import torch

import vision_eff as ve
from vision_eff.vit import MixerSwap, PoolAttention, build_vit
from vision_eff.zoo import data
from vision_eff.vit.recover import block_input, recover_mixer


def test_pool_attention_matches_loop_oracle():
    torch.manual_seed(0)
    h, w, p, c = 4, 5, 2, 6
    mixer = PoolAttention(c, (h, w), p, kernel=3).double()
    x = torch.randn(2, p + h * w, c, dtype=torch.float64)
    v = mixer.v(x)
    expect = torch.empty_like(v)
    for b in range(2):
        expect[b, :p] = v[b].mean(0)
        for i in range(h):
            for j in range(w):
                nb = [p + ii * w + jj for ii in range(i - 1, i + 2) for jj in range(j - 1, j + 2)
                      if 0 <= ii < h and 0 <= jj < w]
                expect[b, p + i * w + j] = v[b, nb].mean(0)
    torch.testing.assert_close(mixer(x), mixer.proj(expect))
    with pytest.raises(ValueError, match="expects 2 prefix"):
        mixer(x[:, 1:])


def test_mixer_swap_reversible_and_initialised_from_attention():
    model = build_vit(depth=3, embed_dim=32, num_heads=2).eval()
    x = torch.randn(2, 3, 64, 64)
    originals = list(model.blocks)
    with torch.no_grad():
        ref = model(x)
        h = ve.apply(model, MixerSwap(blocks=(0, 2)))
        swapped = model(x)
        new = model.blocks[0]
        assert isinstance(new.attn, PoolAttention) and new is not originals[0] and model.blocks[1] is originals[1]
        qkv = originals[0].attn.qkv
        assert torch.equal(new.attn.v.weight, qkv.weight[64:]) and torch.equal(new.attn.proj.weight, originals[0].attn.proj.weight)
        assert torch.equal(new.mlp.fc1.weight, originals[0].mlp.fc1.weight)
        assert not torch.allclose(swapped, ref)
        h.remove()
        assert list(model.blocks) == originals
        assert torch.equal(model(x), ref)
    with pytest.raises(ve.UnsupportedModelError, match="has 3 blocks"):
        ve.apply(model, MixerSwap(blocks=(5,)))
    import timm

    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1)
    with pytest.raises(ve.UnsupportedModelError, match="supports timm VisionTransformer"):
        ve.apply(eva, MixerSwap())


def _feature_error(model, swap, x):
    with torch.no_grad():
        t = s = block_input(model, x)
        new = swap.build_blocks(model)
        for j in range(max(swap.blocks) + 1):
            t = model.blocks[j](t)
            s = (new[j] if j in new else model.blocks[j])(s)
        return ((s - t) ** 2).mean().item() / ((t - block_input(model, x)) ** 2).mean().item()


def test_recover_mixer_reduces_feature_error(tmp_path):
    torch.manual_seed(0)
    model = build_vit(depth=2, embed_dim=32, num_heads=2).eval()
    with torch.no_grad():  # random init leaves the attention branch tiny; make it matter
        model.blocks[0].attn.qkv.weight.mul_(8)
        model.blocks[0].attn.proj.weight.mul_(8)
    x, _ = data.batch("eval", 0, 16, size=64)
    before = _feature_error(model, MixerSwap(blocks=(0,)), x)
    path = recover_mixer(model, MixerSwap(blocks=(0,)), steps=30, batch_size=8, lr=1e-2, out=tmp_path / "m.safetensors",
                         progress=False)
    after = _feature_error(model, MixerSwap(blocks=(0,), weights=str(path)), x)
    assert after < 0.85 * before
    from vision_eff.zoo.weights import read_metadata

    assert read_metadata(path)["swap"]["blocks"] == [0]
    with torch.no_grad():  # another model (here: one weight changed) must not take these blocks
        model.blocks[1].mlp.fc2.bias.add_(1e-3)
    with pytest.raises(ValueError, match="recovered from another model"):
        ve.apply(model, MixerSwap(blocks=(0,), weights=str(path)))


def test_kd_loss_is_the_tempered_kl_in_float64():
    from vision_eff.vit.recover import _kd_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    temp = 2.0
    p, q = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
    expect = (p * (p.log() - q.log())).sum(-1).mean() * temp * temp
    torch.testing.assert_close(_kd_loss(s, t, temp), expect)
    assert _kd_loss(t, t, temp).abs().item() < 1e-12


def test_run_capturing_swaps_blocks_for_one_call_only():
    from vision_eff.vit.recover import _run_capturing

    torch.manual_seed(0)
    model = build_vit(depth=2, embed_dim=32, num_heads=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        same, seen = _run_capturing(model, x, {1: model.blocks[1]})
        assert torch.equal(same, ref)
        h_in, h_out = seen[1]
        assert torch.equal(model.blocks[1](h_in), h_out)
        new = MixerSwap(blocks=(0,)).build_blocks(model)
        originals = list(model.blocks)
        swapped, seen = _run_capturing(model, x, new)
        assert not torch.equal(swapped, ref) and set(seen) == {0}
        assert list(model.blocks) == originals and torch.equal(model(x), ref)


def test_recover_with_distillation_moves_the_logits_towards_the_original(tmp_path):
    """With kd > 0 the new block learns through the frozen later blocks: the swapped model's class
    probabilities get closer to the original's (KL on held-out images)."""
    from vision_eff.vit.recover import _kd_loss

    torch.manual_seed(0)
    model = build_vit(depth=2, embed_dim=32, num_heads=2).eval()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(8)
        model.blocks[0].attn.proj.weight.mul_(8)
        model.head.weight.mul_(20)  # random logits are flat; make the class probabilities differ
    x, _ = data.batch("eval", 0, 16, size=64)

    def kl(path=None):
        with torch.no_grad():
            ref = model(x)
            with ve.patched(model, MixerSwap(blocks=(0,), weights=None if path is None else str(path))):
                return _kd_loss(model(x), ref, 1.0).item()

    before = kl()
    path = recover_mixer(model, MixerSwap(blocks=(0,)), steps=30, batch_size=8, lr=1e-2, kd=5.0, temperature=1.0,
                         out=tmp_path / "kd.safetensors", progress=False)
    assert kl(path) < 0.8 * before
    from vision_eff.zoo.weights import read_metadata

    assert read_metadata(path)["recipe"]["kd"] == 5.0
    with pytest.raises(ValueError, match="kd must be >= 0"):
        recover_mixer(model, MixerSwap(blocks=(0,)), steps=1, kd=-1.0, out=tmp_path / "x.safetensors")
