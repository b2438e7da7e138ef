"""MDT-style masked-token training of the DiT (vision_eff/zoo/masked.py)."""
import pytest
import torch

from vision_eff import zoo
from vision_eff.zoo import weights
from vision_eff.zoo.masked import MaskedTokenTraining, fill_tokens, gather_tokens, keep_indices


def test_keep_indices_are_sorted_distinct_subsets_drawn_from_the_generator():
    idx = keep_indices(4, 10, 6, torch.Generator().manual_seed(0))
    assert idx.shape == (4, 6)
    for row in idx.tolist():
        assert row == sorted(set(row)) and all(0 <= i < 10 for i in row)
    assert len({tuple(r) for r in idx.tolist()}) > 1  # each sample its own subset
    assert torch.equal(idx, keep_indices(4, 10, 6, torch.Generator().manual_seed(0)))


def test_gather_and_fill_against_a_loop():
    h, filler = torch.randn(3, 7, 5), torch.randn(1, 7, 5)
    idx = keep_indices(3, 7, 4, torch.Generator().manual_seed(1))
    kept = gather_tokens(h, idx)
    full = fill_tokens(kept, idx, filler)
    for b in range(3):
        for j, i in enumerate(idx[b].tolist()):
            assert torch.equal(kept[b, j], h[b, i])
        for i in range(7):
            assert torch.equal(full[b, i], h[b, i] if i in idx[b].tolist() else filler[0, i])


def _dit(name: str = "shapes-dit"):
    transformer = zoo.build(name)["transformer"].eval()
    torch.manual_seed(0)
    for p in transformer.parameters():
        p.data.normal_(0, 0.1)
    return transformer


def test_hooks_do_nothing_outside_the_context_and_remove_cleanly():
    transformer = _dit()
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([300, 700]), torch.tensor([1, 4])
    before = transformer(x, t, class_labels=y).sample
    masking = MaskedTokenTraining(transformer, ratio=0.5)
    assert torch.equal(transformer(x, t, class_labels=y).sample, before)
    with masking.masked(torch.Generator().manual_seed(0)):
        assert not torch.equal(transformer(x, t, class_labels=y).sample, before)
    masking.remove()
    assert torch.equal(transformer(x, t, class_labels=y).sample, before)
    assert not any(k.startswith("mask") for k in transformer.state_dict())  # nothing of it is saved


def _patch_mask(idx: torch.Tensor, keep: bool) -> torch.Tensor:
    """[B, 1, 32, 32] pixel mask of the 2x2 patches of token indices idx (or of the other tokens)."""
    m = torch.zeros(idx.shape[0], 256)
    m.scatter_(1, idx, 1.0)
    m = m if keep else 1 - m
    return m.view(-1, 1, 16, 16).repeat_interleave(2, 2).repeat_interleave(2, 3)


@pytest.mark.parametrize("name", ["shapes-dit", "shapes-dit-rope"])
def test_the_masked_output_depends_on_the_kept_patches_only(name):
    transformer = _dit(name)
    masking = MaskedTokenTraining(transformer, ratio=0.75)
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([300, 700]), torch.tensor([1, 4])
    idx = keep_indices(2, 256, 64, torch.Generator().manual_seed(5))  # what the hook draws from that seed

    def masked(inp):
        with masking.masked(torch.Generator().manual_seed(5)):
            return transformer(inp, t, class_labels=y).sample

    base = masked(x)
    dropped_changed = x + 3.0 * torch.randn_like(x) * _patch_mask(idx, keep=False)
    kept_changed = x + 3.0 * torch.randn_like(x) * _patch_mask(idx, keep=True)
    assert torch.allclose(masked(dropped_changed), base, atol=1e-6)  # the dropped patches are never read
    assert (masked(kept_changed) - base).abs().max() > 1e-2
    # the mask token is what the decoder sees at the dropped places: it changes the output and learns
    masking.mask_token.data.normal_()
    out = masked(x)
    assert (out - base).abs().max() > 1e-2
    out.square().mean().backward()
    assert masking.mask_token.grad is not None and masking.mask_token.grad.abs().sum() > 0
    # a RoPE model's attention is told the kept positions only while the encoder blocks run
    assert all(getattr(m.processor, "positions", None) is None for m in transformer.modules() if hasattr(m, "processor"))


def test_bad_settings_are_refused():
    transformer = _dit()
    for ratio in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match=r"mask ratio must be in \(0, 1\)"):
            MaskedTokenTraining(transformer, ratio=ratio)
    with pytest.raises(ValueError, match="encoder_blocks must be in"):
        MaskedTokenTraining(transformer, encoder_blocks=6)
    with pytest.raises(ValueError, match="is for a diffusers DiT"):
        MaskedTokenTraining(zoo.build("shapes-unet")["unet"])


def test_the_objective_adds_the_masked_loss_to_the_plain_one_and_training_saves_the_plain_model(tmp_path):
    from vision_eff.zoo.train import _Objective, sample_timesteps, train

    obj = _Objective("shapes-dit", {"transformer": _dit()}, label_dropout=0.0, shared_label_dropout=True,
                     mask_ratio=0.5)
    obj.eval()  # no label dropout inside the DiT: every forward sees the given labels
    x0, y = torch.randn(4, 3, 32, 32).clamp(-1, 1), torch.tensor([0, 1, 2, 3])
    got = obj(x0, y, torch.Generator().manual_seed(0))
    # oracle: the same draws in the objective's order (timesteps, noise, label dropout, then the mask)
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(4, "uniform", gen)
    noise = torch.randn(x0.shape, generator=gen)
    torch.rand(4, generator=gen)
    a = obj.alphas_cumprod[t].view(4, 1, 1, 1).double()
    xt = (a.sqrt() * x0 + (1 - a).sqrt() * noise).float()
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    tr = obj.parts["transformer"]
    with torch.no_grad():
        plain = tr(xt, t, class_labels=y).sample.double()
        with obj.masking.masked(gen):
            masked = tr(xt, t, class_labels=y).sample.double()
    want = (plain - v).square().mean() + (masked - v).square().mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    assert (masked - plain).abs().max() > 1e-3  # the masked term is a different prediction
    with pytest.raises(ValueError, match="for the DiTs"):
        _Objective("shapes-unet", zoo.build("shapes-unet"), mask_ratio=0.5)
    out = train("shapes-dit", steps=2, batch_size=4, mask_ratio=0.5, out=tmp_path / "m.safetensors", progress=False)
    assert weights.read_metadata(out)["recipe"]["mask_ratio"] == 0.5
    pipe = zoo.load_pipeline("shapes-dit", weights=out)
    img = pipe(class_labels=[2], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
