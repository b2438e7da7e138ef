"""merge.py / prune.py against brute-force per-sample oracles written with Python loops."""
from __future__ import annotations

import pytest
import torch

from vision_eff.tokens.merge import bipartite_match, merge, split_alternate, unmerge
from vision_eff.tokens.prune import cls_attention, prune_by_score, pruned_count


def _brute_match(metric: torch.Tensor, a: list[int], b: list[int], r: int):
    """One sample: (src positions, dst positions) by explicit loops in float64."""
    m = metric.double()
    best = []
    for ai in a:
        sims = [float(m[ai] @ m[bj] / (m[ai].norm() * m[bj].norm())) for bj in b]
        j = max(range(len(b)), key=lambda t: (sims[t], -t))  # first maximum
        best.append((sims[j], b[j]))
    order = sorted(range(len(a)), key=lambda t: (-best[t][0], t))[:r]
    return [a[t] for t in order], [best[t][1] for t in order]


def _brute_merge(x: torch.Tensor, size: torch.Tensor, src: list[int], dst: list[int], n: int):
    groups = {p: [p] for p in range(n) if p not in src}
    for s, d in zip(src, dst):
        groups[d].append(s)
    keep = sorted(groups)
    out = torch.stack([sum(size[i] * x[i] for i in groups[p]) / sum(size[i] for i in groups[p]) for p in keep])
    sz = torch.stack([sum(size[i] for i in groups[p]) for p in keep])
    return out, sz


@pytest.mark.parametrize("n,protected,r", [(17, 1, 5), (16, 0, 8), (21, 5, 3), (10, 2, 0)])
def test_bipartite_merge_matches_brute_force(n, protected, r):
    g = torch.Generator().manual_seed(n * 31 + r)
    bsz, c = 3, 6
    metric = torch.randn(bsz, n, c, generator=g, dtype=torch.float64)
    x = torch.randn(bsz, n, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (bsz, n, 1), generator=g).double()
    a, b = split_alternate(n, protected)
    assert a.tolist() == list(range(protected, n, 2)) and b.tolist() == list(range(protected + 1, n, 2))
    m = bipartite_match(metric, a, b, r)
    y, s = merge(x, m, size)
    assert y.shape == (bsz, n - r, 4) and s.shape == (bsz, n - r, 1)
    for i in range(bsz):
        src, dst = _brute_match(metric[i], a.tolist(), b.tolist(), r)
        assert sorted(m.src[i].tolist()) == sorted(src)
        ey, es = _brute_merge(x[i], size[i, :, 0], src, dst, n)
        torch.testing.assert_close(y[i], ey, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s[i, :, 0], es)
        # sizes sum to the input total; protected tokens untouched and in front
        assert s[i].sum() == size[i].sum()
        assert torch.equal(y[i, :protected], x[i, :protected])


def test_unmerge_inverts_merge_and_batch_independence():
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(5, 33, 8, generator=g)
    x = torch.randn(5, 33, 7, generator=g)
    a, b = split_alternate(33, 1)
    m = bipartite_match(metric, a, b, 12)
    y, s = merge(x, m)
    torch.testing.assert_close(merge(unmerge(y, m), m)[0], y)
    # each output slot's value appears at every input position it stands for
    full = unmerge(y, m)
    for i in range(5):
        for p in range(33):
            assert torch.equal(full[i, p], y[i, m.inv[i, p]])
    # one sample alone gives the same match and merge as inside the batch
    for i in range(5):
        mi = bipartite_match(metric[i:i + 1], a, b, 12)
        assert torch.equal(mi.keep, m.keep[i:i + 1]) and torch.equal(mi.inv, m.inv[i:i + 1])
        torch.testing.assert_close(merge(x[i:i + 1], mi)[0], y[i:i + 1], rtol=0, atol=1e-6)


def test_bipartite_rejects_too_large_r():
    a, b = split_alternate(9, 1)
    with pytest.raises(ValueError, match="r <= 4"):
        bipartite_match(torch.randn(1, 9, 3), a, b, 5)


@pytest.mark.parametrize("fuse", [True, False])
def test_prune_by_score(fuse):
    g = torch.Generator().manual_seed(3)
    score = torch.rand(4, 20, generator=g)
    x = torch.randn(4, 20, 5, generator=g, dtype=torch.float64)
    keep = pruned_count(20, 2, 0.6)
    assert keep == 11
    m = prune_by_score(score, 2, keep, fuse)
    y, s = merge(x, m)
    assert y.shape[1] == 2 + keep + int(fuse)
    for i in range(4):
        ranked = sorted(range(2, 20), key=lambda p: (-float(score[i, p]), p))
        kept, dropped = sorted([0, 1] + ranked[:keep]), ranked[keep:]
        torch.testing.assert_close(y[i, : len(kept)], x[i, kept])
        if fuse:
            torch.testing.assert_close(y[i, -1], x[i, dropped].mean(0))
            assert s[i].sum() == 20 and int(m.rep[i, -1]) == dropped[0]
        else:
            assert s[i].sum() == 2 + keep


def test_cls_attention_against_softmax():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 3, 9, 4, generator=g), torch.randn(2, 3, 9, 4, generator=g)
    bias = torch.randn(2, 1, 1, 9, generator=g)
    ref = ((q.double() @ k.double().transpose(-1, -2)) * 0.5 + bias.double()).softmax(-1)[:, :, 0].mean(1)
    torch.testing.assert_close(cls_attention(q[:, :, :1], k, 0.5, bias).double(), ref, rtol=1e-5, atol=1e-6)


def test_merge_gradients_match_finite_differences():
    """merge() adds into its gather in place; autograd must still see the weighted mean (float64 gradcheck)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, 3, dtype=torch.float64, generator=g, requires_grad=True)
    size = torch.rand(2, 11, 1, dtype=torch.float64, generator=g) + 1
    m = bipartite_match(torch.randn(2, 11, 4, dtype=torch.float64, generator=g), *split_alternate(11, 1), 3)
    assert torch.autograd.gradcheck(lambda t: merge(t, m, size)[0], (x,))

    def block(t):  # the timm adapter's pattern: the merged residual plus a branch computed on it
        mt = merge(t, m, size)[0]
        return mt + mt.tanh()

    assert torch.autograd.gradcheck(block, (x,))
