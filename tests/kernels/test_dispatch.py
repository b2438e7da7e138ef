"""The backend registry: which backend "auto" picks and why; explicit backends raise with the reason."""
from __future__ import annotations

import logging

import pytest
import torch

from vision_eff.kernels import BACKENDS, Backend, BackendUnavailableError, attention, choose, make_call
from vision_eff.kernels import api, backends


def _qkv(*shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g).to(dtype) for _ in range(3)]


@pytest.fixture
def fake_backend():
    """A registered backend that records the calls it serves (removed afterwards)."""
    served = []

    def run(c):
        served.append(c)
        return backends._sdpa_run(c)

    be = Backend("recording", lambda: None, lambda c: "it only serves odd head dims" if c.q.shape[-1] % 2 == 0
                 else None, run, lambda c: -1)
    BACKENDS["recording"] = be
    api._LOGGED.clear()
    yield served
    del BACKENDS["recording"]
    api._LOGGED.clear()


def test_auto_prefers_the_best_ranked_backend_that_supports_the_call(fake_backend):
    q, k, v = _qkv(1, 2, 5, 7)
    assert choose(make_call(q, k, v, None, None, None))[0] == "recording"
    attention(q, k, v)
    assert len(fake_backend) == 1


def test_auto_skips_a_backend_that_cannot_serve_and_logs_the_reason_once(fake_backend, caplog):
    q, k, v = _qkv(1, 2, 5, 8)
    name, skipped = choose(make_call(q, k, v, None, None, None))
    assert name != "recording" and skipped["recording"] == "it only serves odd head dims"
    with caplog.at_level(logging.INFO, logger="vision_eff.kernels"):
        attention(q, k, v)
        attention(q, k, v)
    msgs = [r.getMessage() for r in caplog.records if "recording" in r.getMessage()]
    assert len(msgs) == 1 and "only serves odd head dims" in msgs[0]
    assert fake_backend == []


def test_explicit_backend_that_cannot_serve_raises_with_reason(fake_backend):
    q, k, v = _qkv(1, 2, 5, 8)
    with pytest.raises(BackendUnavailableError, match="only serves odd head dims"):
        attention(q, k, v, backend="recording")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's answer")
def test_on_cpu_auto_falls_back_to_sdpa_and_triton_says_why():
    q, k, v = _qkv(1, 2, 5, 40)
    bias = torch.randn(1, 1, 1, 5)
    name, skipped = choose(make_call(q, k, v, bias, None, None))
    assert name == "sdpa"
    assert "CUDA" in skipped["triton"]
    with pytest.raises(BackendUnavailableError, match="triton"):
        attention(q, k, v, bias=bias, backend="triton")


def test_triton_refuses_calls_it_cannot_compute(monkeypatch):
    """Capability checks that hold on any machine (device made acceptable through the interpreter flag)."""
    monkeypatch.setitem(backends._ENV, "interpret", True)
    q, k, v = _qkv(1, 1, 4, 8)
    assert backends._triton_supports(make_call(q, k, v, None, None, None)) is None
    bias = torch.zeros(1, 1, 1, 4, requires_grad=True)
    assert "gradient" in backends._triton_supports(make_call(q, k, v, bias, None, None))
    q64, k64, v64 = _qkv(1, 1, 4, 8, dtype=torch.float64)
    assert "dtype" in backends._triton_supports(make_call(q64, k64, v64, None, None, None))
    big = _qkv(1, 1, 4, 272)
    assert "256" in backends._triton_supports(make_call(*big, None, None, None))


def test_unknown_backend_and_bad_inputs_name_the_fix():
    q, k, v = _qkv(2, 2, 5, 8)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="nope")
    with pytest.raises(ValueError, match=r"per-key bias is \[B, 1, 1, Nk\]"):
        attention(q, k, v, bias=torch.zeros(2, 1, 1, 4))
    with pytest.raises(ValueError, match="transpose"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="kv_lens"):
        attention(q, k, v, kv_lens=[1, 2, 3])
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, k.double(), v)


def test_every_backend_has_a_reason_or_serves_a_plain_call():
    """Contract: available()/supports() answer None or a non-empty reason, never raise."""
    q, k, v = _qkv(1, 1, 3, 8)
    call = make_call(q, k, v, None, None, None)
    for name, be in BACKENDS.items():
        for answer in (be.available(), be.supports(call)):
            assert answer is None or (isinstance(answer, str) and answer), name
