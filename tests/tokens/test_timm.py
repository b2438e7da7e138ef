"""Token merging / pruning on timm ViTs: r=0 exactness per family, a float64 oracle, invariants, remove()."""
from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import ResPostBlock
from torch.nn import functional as F

import vision_eff as ve
from vision_eff.tokens.timm import max_constant_r, merge_schedule

from .families import FAMILIES, images, tiny


def _out(model, x):
    with torch.no_grad():
        return model(x), model.forward_features(x)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_r0_exact_remove_bitexact_and_reduction_runs(family):
    model = tiny(family)
    x = images(3)
    ref, ref_feat = _out(model, x)
    h = ve.apply(model, ve.TokenMerge(r=0))
    out, feat = _out(model, x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(feat, ref_feat, rtol=0, atol=1e-6)
    h.remove()
    # merging actually changes the computation, then remove() restores the model bit-exactly
    h = ve.apply(model, ve.TokenMerge(r=10))
    merged, merged_feat = _out(model, x)
    assert merged_feat.shape == ref_feat.shape  # tokens are unmerged after the last block
    assert not torch.allclose(merged_feat, ref_feat, atol=1e-4)
    # results do not depend on the rest of the batch
    alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(alone, merged, rtol=1e-5, atol=1e-6)
    h.remove()
    again, again_feat = _out(model, x)
    assert torch.equal(again, ref) and torch.equal(again_feat, ref_feat)
    assert not model.blocks[0]._forward_hooks and "forward" not in model.blocks[0].__dict__


# --- an independent float64 oracle for plain pre-norm blocks ---------------------------------------
def _oracle_reduce(y, size, metric, r, p, score=None, keep=None, fuse=True):
    """One sample: groups of input positions per output token (ToMe matching or EViT pruning)."""
    n = y.shape[0]
    if score is not None:
        ranked = sorted(range(p, n), key=lambda t: (-float(score[t]), t))
        kept = sorted(list(range(p)) + ranked[:keep])
        groups = [[t] for t in kept]
        if fuse and ranked[keep:]:
            groups.append(ranked[keep:])
        return groups
    a, b = list(range(p, n, 2)), list(range(p + 1, n, 2))
    mn = metric / metric.norm(dim=-1, keepdim=True)
    best = []
    for ai in a:
        sims = (mn[b] @ mn[ai]).tolist()
        j = max(range(len(b)), key=lambda t: (sims[t], -t))
        best.append((sims[j], b[j]))
    src = [a[t] for t in sorted(range(len(a)), key=lambda t: (-best[t][0], t))[:r]]
    groups = {t: [t] for t in range(n) if t not in src}
    for s in src:
        groups[best[a.index(s)][1]].append(s)
    return [groups[t] for t in sorted(groups)]


def _pool(v, size, groups):
    return torch.stack([sum(size[i] * v[i] for i in g) / sum(size[i] for i in g) for g in groups])


def _oracle_features(model, x, plan, prune_keep=None, fuse=True):
    """forward_features recomputed block by block from the modules' weights, in float64, one sample at a time."""
    model = model.double()
    p = model.num_prefix_tokens
    with torch.no_grad():
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x.double()))))
        outs = []
        for s in range(t.shape[0]):
            z, size = t[s], torch.ones(t.shape[1], dtype=torch.float64)
            owner = list(range(t.shape[1]))  # original position -> current token
            for i, blk in enumerate(model.blocks):
                at = blk.attn
                n, c = z.shape
                post = isinstance(blk, ResPostBlock)  # norms after the branches: x + norm(f(x))
                qkv = at.qkv(z if post else blk.norm1(z)).reshape(n, 3, at.num_heads, at.head_dim).permute(1, 2, 0, 3)
                q, k, v = at.q_norm(qkv[0]), at.k_norm(qkv[1]), qkv[2]
                logits = q @ k.transpose(-1, -2) * at.scale + size.log()
                a = F.softmax(logits, -1) @ v
                attn_out = at.proj(at.norm(a.transpose(0, 1).reshape(n, c)))
                y = z + (blk.norm1(attn_out) if post else blk.ls1(attn_out))
                if plan[i]:
                    score = F.softmax(logits[:, 0], -1).mean(0) if prune_keep is not None else None
                    kc = None
                    if score is not None:
                        kc = max(1, min(n - p, round((n - p) * prune_keep)))
                    groups = _oracle_reduce(y, size, k.mean(0), plan[i], p, score, kc, fuse)
                    where = {}
                    for gi, g in enumerate(groups):
                        for m in g:
                            where[m] = gi
                    owner = [where.get(o, -1) for o in owner]
                    y, size = _pool(y, size, groups), torch.stack([size[g].sum() for g in groups])
                z = y + (blk.norm2(blk.mlp(y)) if post else blk.ls2(blk.mlp(blk.norm2(y))))
            if prune_keep is None:
                z = z[owner]
            outs.append(model.norm(z))
    model.float()
    return outs


@pytest.mark.parametrize("family", ["vit", "deit3_layerscale", "dinov2_registers", "qk_norm", "res_post"])
@pytest.mark.parametrize("cfg", [dict(r=9), dict(keep=0.4, schedule="decreasing"), dict(r=(12, 0, 7))])
def test_merge_matches_float64_oracle(family, cfg):
    model = tiny(family)
    x = images(2, seed=5)
    tm = ve.TokenMerge(**cfg)
    plan = merge_schedule(tm, len(model.blocks), 64 + model.num_prefix_tokens, model.num_prefix_tokens)
    expect = _oracle_features(model, x, plan)
    with ve.patched(model.double(), tm), torch.no_grad():
        got = model.forward_features(x.double())
    model.float()
    for s in range(2):
        torch.testing.assert_close(got[s], expect[s], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fuse", [True, False])
def test_prune_matches_float64_oracle(fuse):
    model = tiny("deit3_layerscale")
    x = images(2, seed=6)
    expect = _oracle_features(model, x, [0, 1, 1], prune_keep=0.5, fuse=fuse)
    with ve.patched(model.double(), ve.TokenPrune(keep=0.5, blocks=(1, 2), fuse=fuse)), torch.no_grad():
        got = model.forward_features(x.double())
    model.float()
    assert got.shape[1] == expect[0].shape[0]
    for s in range(2):
        torch.testing.assert_close(got[s], expect[s], rtol=1e-9, atol=1e-9)


def test_prune_keep_one_is_exact_and_counts():
    model = tiny("dinov2_registers")
    x = images(2)
    ref, ref_feat = _out(model, x)
    with ve.patched(model, ve.TokenPrune(keep=1.0, blocks=(0, 2))):
        out, _ = _out(model, x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    with ve.patched(model, ve.TokenPrune(keep=0.5, blocks=(0, 2), fuse=True)):
        _, feat = _out(model, x)
    # 5 protected (cls + 4 registers); 64 -> 32 kept + 1 fused -> 16 kept + 1 fused
    assert feat.shape[1] == 5 + 16 + 1
    assert model(x).shape == ref.shape


def test_apply_twice_replaces_and_schedules():
    model = tiny("vit")
    x = images(2)
    ve.apply(model, ve.TokenMerge(r=4))
    h = ve.apply(model, ve.TokenMerge(r=8))
    with torch.no_grad():
        twice = model(x)
    h.remove()
    with ve.patched(model, ve.TokenMerge(r=8)), torch.no_grad():
        once = model(x)
    assert torch.equal(twice, once)
    assert merge_schedule(ve.TokenMerge(r=5, schedule="decreasing"), 3, 65, 1) == [8, 5, 2]
    assert sum(merge_schedule(ve.TokenMerge(keep=0.25), 3, 65, 1)) == 48
    # 64 patch tokens, 3 blocks: r=16 merges 16 of 32, 16 of 24, 16 of 16; r=17 finds only 15 in block 3
    assert max_constant_r(3, 65, 1) == 16
    # an int r is clamped where a late block has fewer tokens (64 -> 44 -> 24: set A has 12)
    assert merge_schedule(ve.TokenMerge(r=20), 3, 65, 1) == [20, 20, 12]
    with pytest.raises(ValueError, match="use a smaller r"):
        merge_schedule(ve.TokenMerge(r=(20, 20, 20)), 3, 65, 1)


def test_bad_input_errors_name_the_model():
    model = tiny("deit3_layerscale")
    with pytest.raises(ve.UnsupportedModelError, match=r"VisionTransformer.*r=40 is too large.*use r <= 32"):
        ve.apply(model, ve.TokenMerge(r=40))
    with pytest.raises(ve.UnsupportedModelError, match=r"keep=0.01 cannot be reached on VisionTransformer"):
        ve.apply(model, ve.TokenMerge(keep=0.01))
    with pytest.raises(ve.UnsupportedModelError, match="has 3 blocks"):
        ve.apply(model, ve.TokenMerge(r=(1, 2)))
    with pytest.raises(ve.UnsupportedModelError, match="Linear is neither a timm ViT"):
        ve.apply(torch.nn.Linear(2, 2), ve.TokenMerge(r=2))
    import timm

    conv = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    with pytest.raises(ve.UnsupportedModelError, match="ResNet is not a supported timm ViT"):
        ve.apply(conv, ve.TokenMerge(r=2))
    with pytest.raises(ve.UnsupportedModelError, match="needs r="):
        ve.apply(model, ve.TokenMerge())
    shared = tiny("vit")
    shared.blocks[2].drop_path2 = shared.blocks[1].drop_path2  # one module, hooked twice, would mix two blocks
    with pytest.raises(ve.UnsupportedModelError, match=r"blocks\[2\].drop_path2 is the same module as blocks\[1\]"):
        ve.apply(shared, ve.TokenMerge(r=2))
    nocls = tiny("avgpool_no_cls")
    with pytest.raises(ve.UnsupportedModelError, match="no class token"):
        ve.apply(nocls, ve.TokenPrune())
    ve.apply(model, ve.TokenMerge(r=2))
    with pytest.raises(ve.UnsupportedModelError, match="do not stack"):
        ve.apply(model, ve.TokenPrune())
    ve.remove(model)


def test_proportional_bias_reaches_our_attention_op(monkeypatch):
    """Stacked with FastAttention, the log-size bias goes through vision_eff.kernels.attention."""
    kernels = pytest.importorskip("vision_eff.kernels")
    from vision_eff.kernels import adapters

    seen = []
    original = adapters.attention

    def spy(q, k, v, bias=None, **kw):
        seen.append(None if bias is None else tuple(bias.shape))
        return original(q, k, v, bias=bias, **kw)

    monkeypatch.setattr(adapters, "attention", spy)
    model = tiny("deit3_layerscale")
    x = images(2)
    with ve.patched(model, ve.TokenMerge(r=8)), torch.no_grad():
        alone = model(x)
    with ve.patched(model, ve.TokenMerge(r=8), kernels.FastAttention(backend="reference")), torch.no_grad():
        stacked = model(x)
    torch.testing.assert_close(stacked, alone, rtol=1e-5, atol=1e-5)
    # block 0 has no bias yet (all sizes 1); blocks 1 and 2 get [B, 1, 1, N] with N = 65 - 8, 65 - 16
    assert seen == [None, (2, 1, 1, 57), (2, 1, 1, 49)]
