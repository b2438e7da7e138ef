"""ChunkedFeedForward: same outputs as the unpatched model (UNet, DiT, timm ViT), the slicing really happens,
stacking with token merging and step caching, remove() exactness, no graph breaks, bad input."""
from __future__ import annotations

import pytest
import torch

import vision_eff as ve
from tests.cache.tiny import dit, pipelines, sd_unet
from tests.tokens.families import images, tiny
from vision_eff.layers.chunked_feed_forward import chunked_call, feed_forward_modules
from vision_eff.zoo.models import LabelEncoder


def _unet_call(unet, enc, x, labels):
    with torch.no_grad():
        return unet(x, torch.tensor(300), encoder_hidden_states=enc(torch.tensor(labels))).sample


def _count_calls(modules):
    """Pre-hooks counting how often each diffusers FeedForward's input projection runs (once per slice)."""
    calls = []
    hooks = [m.net[0].register_forward_pre_hook(lambda *a: calls.append(1)) for _, m in modules]
    return calls, hooks


def test_chunked_call_matches_float64_and_slices():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 7)
    x = torch.randn(3, 11, 5)
    seen = []

    def fn(t):
        seen.append(t.shape[0])
        return lin(t)

    out = chunked_call(fn, x, 8)
    assert seen == [8, 8, 8, 8, 1]  # 33 rows in slices of at most 8
    ref = lin.double()(x.double())
    assert (out.double() - ref).abs().max() <= 2 * (lin.float()(x).double() - ref).abs().max() + 1e-7
    seen.clear()
    assert torch.equal(chunked_call(fn, x, 33), lin(x)) and seen == [3]  # small inputs go in whole, unflattened


def test_unet_same_output_sliced_and_remove_exact():
    torch.manual_seed(1)
    unet, enc = sd_unet(), LabelEncoder(dim=16).eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = _unet_call(unet, enc, x, [1, 2, 3, 4])
    mods = feed_forward_modules(unet)
    assert len(mods) == 7  # every BasicTransformerBlock's feed-forward: 3 at 16x16, 3 at 8x8, 1 in the mid block
    h = ve.apply(unet, ve.ChunkedFeedForward(rows=100))
    calls, hooks = _count_calls(mods)
    out = _unet_call(unet, enc, x, [1, 2, 3, 4])
    for hk in hooks:
        hk.remove()
    # 16x16: 4 x 256 rows -> 11 slices of <= 100; 8x8: 4 x 64 -> 3; mid block 4 x 16 = 64 rows -> 1 (whole)
    assert len(calls) == 3 * 11 + 3 * 3 + 1
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    h.remove()
    assert all("forward" not in m.__dict__ for _, m in mods)
    assert torch.equal(_unet_call(unet, enc, x, [1, 2, 3, 4]), ref)


def test_dit_and_timm_vit_same_output():
    model = dit()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(timestep=torch.tensor([10, 500]), class_labels=torch.tensor([1, 2]))
    with torch.no_grad():
        ref = model(x, **kw).sample
        with ve.patched(model, ve.ChunkedFeedForward(rows=32)):
            out = model(x, **kw).sample
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    for family in ("vit", "eva02_rope_swiglu"):  # timm Mlp and SwiGLU
        vit = tiny(family)
        imgs = images(3)
        with torch.no_grad():
            ref = vit(imgs)
            with ve.patched(vit, ve.ChunkedFeedForward(rows=10)):
                out = vit(imgs)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_stacks_with_merging_and_caching_in_a_pipeline():
    pipe = pipelines("unet")
    run = dict(class_labels=[1, 5], num_inference_steps=6, guidance_scale=2.0, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    ve_cfg = (ve.StepCache(interval=2), ve.TokenMerge(ratio=0.5))
    with ve.patched(pipe, *ve_cfg):
        ref = pipe(**{**run, "generator": torch.Generator().manual_seed(0)}).images
    with ve.patched(pipe, *ve_cfg, ve.ChunkedFeedForward(rows=64)):
        out = pipe(**run).images
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_no_graph_breaks_under_compile():
    torch.manual_seed(1)
    unet, enc = sd_unet(), LabelEncoder(dim=16).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    e = enc(torch.tensor([1, 2])).detach()
    with torch.no_grad():
        ref = unet(x, torch.tensor(300), encoder_hidden_states=e).sample
        with ve.patched(unet, ve.ChunkedFeedForward(rows=128)):
            torch._dynamo.reset()
            compiled = torch.compile(unet, fullgraph=True, backend="eager")
            out = compiled(x, torch.tensor(300), encoder_hidden_states=e).sample
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rows", [0, -3, 2.5, True, "4096"])
def test_bad_rows(rows):
    with pytest.raises(ValueError, match="rows must be an integer >= 1"):
        ve.ChunkedFeedForward(rows=rows)


def test_model_without_feed_forward():
    with pytest.raises(ve.UnsupportedModelError, match="no token-wise feed-forward"):
        ve.apply(torch.nn.Sequential(torch.nn.Linear(3, 3)), ve.ChunkedFeedForward())
    with pytest.raises(ve.UnsupportedModelError, match="neither a torch module"):
        ve.apply(object(), ve.ChunkedFeedForward())
