"""TokenMerge on diffusers denoisers: exactness of remove(), ratio 0, batch / CFG independence, an exact
oracle on piecewise-constant token grids, coverage of every attention level, transformers, compile."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vision_eff as ve
from tests.cache.tiny import ALL, output, sd_unet, sdxl_unet, subset, unet_inputs
from vision_eff.tokens.diffusers import ReducedAttention, self_attentions
from vision_eff.zoo.models import LabelEncoder

METHODS = ["merge", "downsample"]


@pytest.fixture(scope="module")
def shapes():
    torch.manual_seed(1)
    return sd_unet(), LabelEncoder(dim=16).eval()


def run_unet(unet, enc, x, labels):
    with torch.no_grad():
        return unet(x, torch.tensor(400), encoder_hidden_states=enc(torch.tensor(labels))).sample


def _x(batch, seed=0):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_bit_exactly(shapes, method):
    unet, enc = shapes
    x = _x(2)
    ref = run_unet(unet, enc, x, [1, 2])
    procs = {n: a.processor for n, a, _ in self_attentions(unet, "unet")}
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    h = ve.apply(unet, ve.TokenMerge(ratio=0.5, method=method))
    assert not torch.allclose(run_unet(unet, enc, x, [1, 2]), ref, atol=1e-4)  # it is active
    h.remove()
    assert torch.equal(run_unet(unet, enc, x, [1, 2]), ref)
    assert all(a.processor is procs[n] for n, a, _ in self_attentions(unet, "unet"))
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    assert not unet._forward_pre_hooks


@pytest.mark.parametrize("method", METHODS)
def test_ratio_zero_equals_unpatched(shapes, method):
    unet, enc = shapes
    x = _x(2)
    ref = run_unet(unet, enc, x, [3, 4])
    with ve.patched(unet, ve.TokenMerge(ratio=0.0, method=method)):
        assert torch.equal(run_unet(unet, enc, x, [3, 4]), ref)


@pytest.mark.parametrize("method", METHODS)
def test_batch_size_independent_and_cfg_consistent(shapes, method):
    """A guidance batch [uncond x2, cond x2] gives every row what that row gets alone."""
    unet, enc = shapes
    x = _x(2, seed=1)
    null = 8
    with ve.patched(unet, ve.TokenMerge(ratio=0.6, method=method)):
        big = run_unet(unet, enc, torch.cat([x, x]), [null, null, 5, 6])
        alone = [run_unet(unet, enc, x[i:i + 1], [lab]) for i, lab in [(0, null), (1, null), (0, 5), (1, 6)]]
        halves = [run_unet(unet, enc, x, [null, null]), run_unet(unet, enc, x, [5, 6])]
    torch.testing.assert_close(big, torch.cat(alone), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(big, torch.cat(halves), atol=1e-5, rtol=1e-5)


def test_deterministic_under_seed(shapes):
    unet, enc = shapes
    x = _x(2, seed=2)
    outs = []
    for seed in (0, 0, 1):
        with ve.patched(unet, ve.TokenMerge(ratio=0.5, seed=seed)):
            outs.append(run_unet(unet, enc, x, [0, 7]))
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2], atol=1e-5)


@pytest.mark.parametrize("method,cell", [("merge", 2), ("downsample", 2), ("merge", 4)])
def test_exact_on_piecewise_constant_grid(method, cell):
    """Tokens constant on cell x cell blocks: merging all but one token per cell (or pooling K/V 2x)
    changes nothing (exact oracle: attention over duplicated keys equals attention over one copy of each,
    when every key is duplicated equally often)."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    coarse = torch.randn(3, 16, 16 // cell, 16 // cell)
    x = nn.functional.interpolate(coarse, scale_factor=cell, mode="nearest").flatten(2).transpose(1, 2)  # [3, 256, 16]
    with torch.no_grad():
        ref = attn(x)
        cfg = ve.TokenMerge(ratio=1 - 1 / cell**2, method=method, seed=3, sx=cell, sy=cell)
        attn.processor = ReducedAttention(attn.processor, cfg, {"hw": (16, 16), "txt": 0}, salt=0, mode="self")
        seen = []
        inner = attn.processor.inner
        attn.processor.inner = lambda a, hs, **kw: (seen.append((hs.shape[1], kw.get("encoder_hidden_states"))),
                                                     inner(a, hs, **kw))[1]
        out = attn(x)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    n_q, kv = seen[0]
    assert (n_q, None if kv is None else kv.shape[1]) == ((256 // cell**2, None) if method == "merge" else (256, 64))


def test_mlp_merge_exact_on_piecewise_constant_grid():
    """mlp=True: a transformer block whose input is constant on 4x4 cells runs attention and feed-forward on
    one token per cell and still gives the unmerged block's output (exact oracle: identical queries give
    identical attention outputs, so the feed-forward's input stays constant on the cells too)."""
    from diffusers.models.attention import BasicTransformerBlock

    from vision_eff._patching import PatchHandle
    from vision_eff.tokens.diffusers import _merge_feed_forward

    torch.manual_seed(0)
    block = BasicTransformerBlock(dim=16, num_attention_heads=2, attention_head_dim=8).eval()
    x = nn.functional.interpolate(torch.randn(3, 16, 4, 4), scale_factor=4, mode="nearest").flatten(2).transpose(1, 2)
    ff_tokens = []
    block.ff.net[0].register_forward_pre_hook(lambda m, a: ff_tokens.append(a[0].shape[1]))  # inside the ff
    with torch.no_grad():
        ref = block(x)
        handle = PatchHandle(block)
        cfg = ve.TokenMerge(ratio=15 / 16, seed=3, sx=4, sy=4, mlp=True)
        proc = ReducedAttention(block.attn1.processor, cfg, {"hw": (16, 16), "txt": 0}, salt=0, mode="self")
        handle.set_attr(block.attn1, "processor", proc)
        _merge_feed_forward(block.ff, proc, handle)
        out = block(x)
        handle.remove()
        again = block(x)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    assert ff_tokens == [256, 16, 256]  # merged only while patched
    assert torch.equal(again, ref) and proc.last is None


def test_mlp_merge_on_unet(shapes):
    """mlp=True on a UNet: active beyond attention-only merging, batch / CFG independent, remove() exact."""
    unet, enc = shapes
    x = _x(2, seed=4)
    ref = run_unet(unet, enc, x, [1, 2])
    with ve.patched(unet, ve.TokenMerge(ratio=0.5)):
        attn_only = run_unet(unet, enc, x, [1, 2])
    h = ve.apply(unet, ve.TokenMerge(ratio=0.5, mlp=True))
    both = run_unet(unet, enc, x, [1, 2])
    assert not torch.allclose(both, attn_only, atol=1e-4)  # the feed-forward really runs merged
    alone = torch.cat([run_unet(unet, enc, x[i:i + 1], [lab]) for i, lab in [(0, 1), (1, 2)]])
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-5)
    h.remove()
    assert torch.equal(run_unet(unet, enc, x, [1, 2]), ref)
    ffs = [m for m in unet.modules() if type(m).__name__ == "FeedForward"]
    assert ffs and not any(m._forward_pre_hooks or m._forward_hooks for m in ffs)


def test_mlp_merge_skips_chunked_feed_forward(shapes):
    """A chunked feed-forward (token count unlike the match's) runs unmerged instead of failing."""
    unet, enc = shapes
    x = _x(2, seed=5)
    with ve.patched(unet, ve.TokenMerge(ratio=0.5)):
        attn_only = run_unet(unet, enc, x, [1, 2])
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for b in blocks:
        b.set_chunk_feed_forward(4, dim=1)
    try:
        with ve.patched(unet, ve.TokenMerge(ratio=0.5, mlp=True)):
            chunked = run_unet(unet, enc, x, [1, 2])
    finally:
        for b in blocks:
            b.set_chunk_feed_forward(None, dim=0)
    torch.testing.assert_close(chunked, attn_only, atol=1e-5, rtol=1e-5)


def _spy(model, kind):
    """Record the token count each self-attention processor really runs on."""
    seen: dict[str, list[int]] = {}
    for name, attn, _ in self_attentions(model, kind):
        proc = attn.processor
        inner = proc.inner

        def spy(a, hs, _inner=inner, _name=name, **kw):
            seen.setdefault(_name, []).append(hs.shape[1])
            return _inner(a, hs, **kw)

        proc.inner = spy
    return seen


def test_sdxl_layout_merges_at_both_attention_levels():
    unet = sdxl_unet()
    k = unet_inputs(batch=2, size=32)
    with ve.patched(unet, ve.TokenMerge(ratio=0.5)):
        seen = _spy(unet, "unet")
        output(unet, k)
    levels = {}
    for name, counts in seen.items():
        levels.setdefault(name.split(".")[0] + name.split(".")[1], []).extend(counts)
    full = {16 * 16: 0, 8 * 8: 0}
    for name, counts in seen.items():
        for c in counts:
            n = 256 if c > 64 else 64
            assert c == n // 2, f"{name} ran on {c} tokens, expected {n // 2}"
            full[n] += 1
    assert full[256] >= 3 and full[64] >= 3  # second level (16x16) and third level (8x8), down and up
    # min_tokens keeps the small level untouched
    with ve.patched(unet, ve.TokenMerge(ratio=0.5, min_tokens=100)):
        seen = _spy(unet, "unet")
        output(unet, k)
    assert {c for counts in seen.values() for c in counts} == {128, 64}


@pytest.mark.parametrize("name", ["pixart", "sd3", "flux"])
def test_transformers(name):
    make, inputs = ALL[name]
    model = make()
    k = inputs(batch=2)
    ref = output(model, k)
    h = ve.apply(model, ve.TokenMerge(ratio=0.5))
    y = output(model, k)
    y1 = output(model, subset(k, slice(1, 2)))
    h.remove()
    assert not torch.allclose(y, ref, atol=1e-4)
    torch.testing.assert_close(y[1:2], y1, atol=1e-5, rtol=1e-5)
    assert torch.equal(output(model, k), ref)


@pytest.mark.parametrize("mlp", [False, True])
def test_unet_path_has_no_graph_breaks(shapes, mlp):
    unet, enc = shapes
    x, ctx = _x(2), enc(torch.tensor([1, 2])).detach()
    torch._dynamo.reset()
    with ve.patched(unet, ve.TokenMerge(ratio=0.5, mlp=mlp)):
        eager = unet(x, torch.tensor(400), encoder_hidden_states=ctx).sample
        compiled = torch.compile(unet, backend="eager", fullgraph=True)  # fullgraph: any break raises
        with torch.no_grad():
            out = compiled(x, torch.tensor(400), encoder_hidden_states=ctx).sample
    torch._dynamo.reset()
    torch.testing.assert_close(out, eager.detach(), atol=1e-5, rtol=1e-5)


def test_bad_configuration_errors():
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            ve.TokenMerge(ratio=ratio)
    with pytest.raises(ve.UnsupportedModelError):
        ve.apply(nn.Linear(2, 2), ve.TokenMerge(ratio=0.5))
    from diffusers import UNet2DModel

    with pytest.raises(ve.UnsupportedModelError, match="supported"):
        ve.apply(UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                             down_block_types=("DownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "UpBlock2D")), ve.TokenMerge(ratio=0.5))
    with pytest.raises(ve.UnsupportedModelError, match="method='merge'"):
        ve.apply(ALL["sd3"][0](), ve.TokenMerge(ratio=0.5, method="downsample"))
    with pytest.raises(ValueError, match="method='merge'"):
        ve.TokenMerge(ratio=0.5, method="downsample", mlp=True)
    with pytest.raises(ValueError, match="mlp"):
        ve.TokenMerge(ratio=0.5, mlp=1)
    with pytest.raises(ve.UnsupportedModelError, match="mlp=False"):
        ve.apply(ALL["sd3"][0](), ve.TokenMerge(ratio=0.5, mlp=True))
