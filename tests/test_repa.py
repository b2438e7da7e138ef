"""REPA alignment for training the DiT, and the DiT's shared label dropout."""
import pytest
import torch
from torch.nn import functional as F

from vision_eff import zoo
from vision_eff.vit.builtin import build_vit
from vision_eff.zoo import train as train_mod
from vision_eff.zoo.models import NUM_CLASSES
from vision_eff.zoo.repa import RepaAlignment


def _encoder():
    torch.manual_seed(3)
    return build_vit().eval()


def _reference_features(vit, x0, block):
    """The encoder's patch tokens after ``block``, by running its parts by hand (not forward_intermediates)."""
    x = F.interpolate(x0, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for blk in vit.blocks[: block + 1]:
            h = blk(h)
    return h[:, vit.num_prefix_tokens:]


def test_repa_loss_is_the_negative_cosine_of_projected_block_tokens_and_encoder_tokens():
    torch.manual_seed(0)
    dit = zoo.build("shapes-dit")["transformer"].eval()
    vit = _encoder()
    align = RepaAlignment(dit, block=2, encoder=vit, encoder_block=3)
    seen = {}
    dit.transformer_blocks[2].register_forward_hook(lambda m, a, out: seen.update(h=out))
    x0 = torch.rand(3, 3, 32, 32) * 2 - 1
    dit(x0, torch.tensor([5, 10, 20]), class_labels=torch.tensor([0, 1, 2]))
    loss = align.loss(x0)
    target = _reference_features(vit, x0, 3)
    z = align.proj(seen["h"])
    ref = -(F.normalize(z, dim=-1) * F.normalize(target, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    # the gradient reaches the projector and the blocks up to the aligned one, not the blocks after it
    loss.backward()
    assert align.proj[0].weight.grad.abs().sum() > 0
    assert dit.transformer_blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert dit.transformer_blocks[3].attn1.to_q.weight.grad is None
    assert not any(p.requires_grad for p in vit.parameters())
    with pytest.raises(RuntimeError, match="forward of the transformer first"):
        align.loss(x0)  # each loss consumes the tokens of one forward


def test_repa_remove_leaves_the_transformer_as_it_was():
    torch.manual_seed(0)
    dit = zoo.build("shapes-dit")["transformer"].eval()
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 700]), torch.tensor([4, 7])
    with torch.no_grad():
        before = dit(x, t, class_labels=y).sample
    names = [n for n, _ in dit.named_parameters()]
    align = RepaAlignment(dit, block=1, encoder=_encoder())
    assert dit.transformer_blocks[1]._forward_hooks
    align.remove()
    assert all(not b._forward_hooks for b in dit.transformer_blocks)
    assert [n for n, _ in dit.named_parameters()] == names  # the projector is REPA's, not the model's
    with torch.no_grad():
        assert torch.equal(dit(x, t, class_labels=y).sample, before)


def test_repa_rejects_bad_settings_naming_them():
    dit = zoo.build("shapes-dit")["transformer"]
    with pytest.raises(ValueError, match=r"block=6, but the transformer has 6 blocks"):
        RepaAlignment(dit, block=6, encoder=_encoder())
    with pytest.raises(ValueError, match=r"encoder_block=9, but the encoder has 6 blocks"):
        RepaAlignment(dit, block=1, encoder=_encoder(), encoder_block=9)
    with pytest.raises(ValueError, match="the transformer has 256 tokens but the encoder 64 patches"):
        RepaAlignment(dit, block=1, encoder=build_vit(img_size=32))  # an 8x8 grid against 16x16
    with pytest.raises(ValueError, match="REPA alignment is for the pixel-space DiT"):
        train_mod._Objective("shapes-unet", zoo.build("shapes-unet"), repa=dict(block=1))


def test_objective_with_repa_adds_the_weighted_alignment_and_trains_only_the_projector_beyond_the_model(monkeypatch):
    import vision_eff.vit.builtin as builtin

    monkeypatch.setattr(builtin, "load_vit", _encoder)  # the default encoder, without trained weights
    torch.manual_seed(0)
    modules = zoo.build("shapes-dit")
    obj = train_mod._Objective("shapes-dit", modules, 0.0, None, "mse", shared_label_dropout=True,
                               repa=dict(block=1, weight=0.25)).train()
    plain = train_mod._Objective("shapes-dit", modules, 0.0, None, "mse", shared_label_dropout=True).train()
    x0, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.arange(4)
    total = obj(x0, y, torch.Generator().manual_seed(5))
    denoise = plain(x0, y, torch.Generator().manual_seed(5))  # the same noise and timesteps
    torch.testing.assert_close(total, denoise + 0.25 * obj.last_repa, rtol=1e-6, atol=1e-7)
    names = {n for n, _ in obj.named_parameters()}
    assert {n for n in names if not n.startswith("parts.")} == {n for n in names if n.startswith("repa.proj.")} != set()
    obj.repa.remove()


def test_shared_label_dropout_drops_the_label_of_every_dit_block_at_once():
    """With dropout 1 every sample is trained as the unconditional one guidance asks for: all blocks get the
    null label (diffusers' DiT would drop each block's label on its own, so almost never all of them)."""
    torch.manual_seed(0)
    modules = zoo.build("shapes-dit")
    obj = train_mod._Objective("shapes-dit", modules, 1.0, "v_prediction", "mse", shared_label_dropout=True).train()
    seen = {}
    modules["transformer"].register_forward_hook(lambda m, a, k, out: seen.update(a=a, k=k, out=out.sample),
                                                 with_kwargs=True)
    obj(torch.rand(4, 3, 32, 32) * 2 - 1, torch.arange(4), torch.Generator().manual_seed(1))
    assert torch.equal(seen["k"]["class_labels"], torch.full((4,), NUM_CLASSES))
    modules["transformer"].eval()
    with torch.no_grad():  # the null label through every block, no dropout of its own
        ref = modules["transformer"](*seen["a"], class_labels=torch.full((4,), NUM_CLASSES)).sample
    torch.testing.assert_close(seen["out"], ref, rtol=0, atol=0)
