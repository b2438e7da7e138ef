"""The custom ops: torch.library's own checks (fake impls, autograd registration) and
torch.compile(fullgraph=True) tracing through them on CPU."""
from __future__ import annotations

import pytest
import torch

from vision_eff.kernels import attention, match_tokens, ops

torch.set_num_threads(1)


def _inputs(requires_grad=True):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 7, 5, generator=g).requires_grad_(requires_grad) for _ in range(3))
    bias = torch.randn(2, 1, 1, 7, generator=g).requires_grad_(requires_grad)
    return q, k, v, bias


def test_opcheck_attention_forward():
    q, k, v, bias = _inputs()
    lens = torch.tensor([7, 4], dtype=torch.int32)
    torch.library.opcheck(ops.attention_fwd, (q, k, v, bias, lens, 0.4, "reference"))
    torch.library.opcheck(ops.attention_fwd, (q, k, v, None, None, 0.4, "reference"))


def test_opcheck_match_tokens():
    a, b = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    torch.library.opcheck(ops.match_tokens, (a, b, "reference"), test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_through_the_custom_op_forward_and_backward():
    torch._dynamo.reset()
    q, k, v, bias = _inputs()

    def f(q, k, v, bias):
        return attention(q, k, v, bias=bias, kv_lens=torch.tensor([7, 5]), backend="reference")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_c = compiled(q, k, v, bias)
    grads_c = torch.autograd.grad(out_c.square().sum(), (q, k, v, bias))
    out_e = f(q, k, v, bias)
    grads_e = torch.autograd.grad(out_e.square().sum(), (q, k, v, bias))
    assert torch.allclose(out_c, out_e, atol=1e-6)
    for gc, ge in zip(grads_c, grads_e):
        assert torch.allclose(gc, ge, atol=1e-5)


def test_compile_fullgraph_with_auto_dispatch():
    torch._dynamo.reset()
    q, k, v, bias = _inputs(requires_grad=False)
    compiled = torch.compile(lambda q, k, v, b: attention(q, k, v, bias=b), fullgraph=True, backend="eager")
    assert torch.allclose(compiled(q, k, v, bias), attention(q, k, v, bias=bias, backend="reference"), atol=1e-6)


def test_reference_match_tokens_against_brute_force():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 9, 16, generator=g), torch.randn(3, 11, 16, generator=g)
    best, idx = match_tokens(a, b, backend="reference")
    sim = torch.nn.functional.cosine_similarity(a.double()[:, :, None], b.double()[:, None], dim=-1)
    assert torch.allclose(best.double(), sim.max(-1).values, atol=1e-6)
    assert torch.equal(idx, sim.argmax(-1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's answer")
def test_match_tokens_explicit_gpu_backends_refuse_on_cpu():
    from vision_eff.kernels import BackendUnavailableError

    a = torch.randn(1, 4, 8)
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        match_tokens(a, a, backend="cuda")
