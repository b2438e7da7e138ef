"""Every attention backend usable in this process, against an independent float64 oracle.

The oracle is the textbook formula written here (softmax of masked scores), not the library's
reference module. Pass rule: error <= 2x PyTorch SDPA's error in the same dtype (+1 ulp of scale).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vision_eff.kernels import BACKENDS, attention
from vision_eff.kernels.api import make_call

torch.set_num_threads(1)


def oracle(q, k, v, bias=None, kv_lens=None, scale=None):
    q, k, v = q.double(), k.double(), v.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if bias is not None:
        s = s + bias.double()
    if kv_lens is not None:
        keep = torch.arange(k.shape[2])[None, :] < torch.as_tensor(kv_lens)[:, None]
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, dim=-1), v)


def usable_backends():
    names = []
    for name, be in BACKENDS.items():
        probe = make_call(*(torch.zeros(1, 1, 2, 8) for _ in range(3)), None, None, None)
        if be.available() is None and be.supports(probe) is None:
            names.append(name)
    return names


CASES = [  # (B, H, Nq, Nk, D, Dv, bias shape or None, kv_lens)
    (2, 3, 17, 17, 40, 40, "key", None),
    (1, 2, 9, 21, 5, 7, "full", None),
    (2, 2, 13, 13, 72, 72, None, [13, 6]),
    (2, 1, 11, 15, 16, 16, "key", [15, 4]),
]


def _bias(kind, b, h, nq, nk, gen):
    if kind is None:
        return None
    shape = (b, 1, 1, nk) if kind == "key" else (b, h, nq, nk)
    return torch.randn(shape, generator=gen)


@pytest.mark.parametrize("backend", usable_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_backend_forward_and_backward_within_twice_sdpa_error(backend, dtype, case):
    b, h, nq, nk, d, dv, kind, lens = case
    gen = torch.Generator().manual_seed(nq * 31 + d)
    q = torch.randn(b, h, nq, d, generator=gen).to(dtype)
    k = torch.randn(b, h, nk, d, generator=gen).to(dtype)
    v = torch.randn(b, h, nk, dv, generator=gen).to(dtype)
    bias = _bias(kind, b, h, nq, nk, gen)
    dout = torch.randn(b, h, nq, dv, generator=gen)

    def run(fn, inputs, dout_):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, dout_.to(out.dtype)))

    want = run(lambda *t: oracle(*t, bias=bias, kv_lens=lens), [q.double(), k.double(), v.double()], dout.double())
    ours = run(lambda *t: attention(*t, bias=bias, kv_lens=lens, backend=backend), [q, k, v], dout)
    mask = None if bias is None else bias.to(dtype)
    if lens is not None:
        pad = torch.arange(nk)[None, None, None, :] >= torch.tensor(lens)[:, None, None, None]
        neg = torch.zeros(pad.shape, dtype=dtype).masked_fill(pad, float("-inf"))
        mask = neg if mask is None else mask + neg
    sdpa = run(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask), [q, k, v], dout)
    eps = torch.finfo(dtype).eps
    for label, o, s, w in zip(["out", "dq", "dk", "dv"], ours, sdpa, want):
        err_o = (o.double() - w).abs().max().item()
        err_s = (s.double() - w).abs().max().item()
        assert err_o <= 2 * err_s + eps * w.abs().max().item(), f"{backend} {label}: {err_o:.3g} vs SDPA {err_s:.3g}"


@pytest.mark.parametrize("backend", usable_backends())
def test_bias_gradient_matches_oracle_where_supported(backend):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=gen) for _ in range(3))
    bias = torch.randn(2, 1, 1, 7, generator=gen, requires_grad=True)
    if BACKENDS[backend].supports(make_call(q, k, v, bias, None, None)) is not None:
        pytest.skip(f"{backend} does not take bias gradients (the dispatcher routes those elsewhere)")
    (g,) = torch.autograd.grad(attention(q, k, v, bias=bias, backend=backend).sum(), [bias])
    b64 = bias.detach().double().requires_grad_(True)
    (w,) = torch.autograd.grad(oracle(q, k, v, bias=b64).sum(), [b64])
    assert g.shape == bias.shape
    assert torch.allclose(g.double(), w, atol=1e-5)


def test_key_padding_equals_truncation():
    """kv_lens must give exactly the result of dropping the padded keys (the mask is not approximate)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    out = attention(q, k, v, kv_lens=[6, 3], backend="reference")
    short = attention(q[1:], k[1:, :, :3], v[1:, :, :3], backend="reference")
    assert torch.allclose(out[1:], short, atol=1e-12)


def test_bool_mask_means_attend_where_true():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 1, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    keep = torch.tensor([True, False, True, True])
    out = attention(q, k, v, bias=keep, backend="reference")
    assert torch.allclose(out, oracle(q, k[..., keep, :], v[..., keep, :]), atol=1e-12)


@pytest.mark.parametrize("backend", usable_backends())
def test_rows_without_keys_give_zeros_and_zero_finite_gradients(backend):
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 1, 4, 8, generator=gen).requires_grad_(True) for _ in range(3))
    out = attention(q, k, v, kv_lens=[0, 4], backend=backend)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.allclose(out[1].double(), oracle(q[1:], k[1:], v[1:])[0], atol=1e-5)
    for g in grads:
        assert torch.isfinite(g).all() and g[0].abs().max() == 0
