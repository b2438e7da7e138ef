"""Runs the Triton kernels under TRITON_INTERPRET=1 (set before triton is imported) at tiny shapes and
prints, as JSON, each case's max error against a float64 reference next to PyTorch SDPA's error in the
same dtype. Spawned by test_triton_interpreter.py so the rest of the suite never sees the env var."""
from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":  # only the subprocess runs in interpreter mode (the test imports the case lists)
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from vision_eff.kernels import attention, match_tokens, reference  # noqa: E402
from vision_eff.kernels.api import make_call  # noqa: E402
from vision_eff.kernels.backends import _sdpa_run  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# (name, B, H, Nq, Nk, D, Dv, bias kind, kv_lens, dtype)
ATTENTION_CASES = [
    ("plain_oddN_D40_f32", 2, 2, 19, 19, 40, 40, None, None, "float32"),
    ("perkey_bias_cross_f32", 2, 2, 17, 23, 24, 24, "key", None, "float32"),
    ("full_bias_oddD5_f32", 1, 3, 13, 21, 5, 7, "full", None, "float32"),
    ("head_bias_D72_f16", 1, 2, 21, 18, 72, 72, "head", None, "float16"),
    ("perkey_bias_varlen_f16", 3, 2, 20, 20, 16, 16, "key", [20, 11, 3], "float16"),
    ("full_bias_D80_bf16", 2, 1, 17, 33, 80, 80, "full", None, "bfloat16"),
    ("varlen_D160_bf16", 2, 1, 9, 14, 160, 160, None, [14, 6], "bfloat16"),
    ("rowbias_f32", 2, 2, 18, 18, 8, 8, "row", None, "float32"),
]


def _bias(kind, b, h, nq, nk, gen):
    shape = {"key": (b, 1, 1, nk), "full": (b, h, nq, nk), "head": (1, h, 1, nk), "row": (1, 1, nq, nk)}.get(kind)
    return None if shape is None else torch.randn(shape, generator=gen) * 2.0


def _grads(fn, inputs, dout):
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), grads


def _err(x, ref):
    return (x.double() - ref).abs().max().item()


def attention_case(name, b, h, nq, nk, d, dv, kind, lens, dtype_name):
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    q = torch.randn(b, h, nq, d, generator=gen).to(dtype)
    k = torch.randn(b, h, nk, d, generator=gen).to(dtype)
    v = torch.randn(b, h, nk, dv, generator=gen).to(dtype)
    bias = _bias(kind, b, h, nq, nk, gen)
    kv = None if lens is None else torch.tensor(lens)
    dout = torch.randn(b, h, nq, dv, generator=gen)

    ref_out, ref_grads = _grads(
        lambda q_, k_, v_: reference.attention(q_, k_, v_, None if bias is None else bias.double(), kv),
        [t.double() for t in (q, k, v)], dout.double())
    ours_out, ours_grads = _grads(lambda q_, k_, v_: attention(q_, k_, v_, bias=bias, kv_lens=kv, backend="triton"),
                                  [q, k, v], dout)

    def sdpa(q_, k_, v_):
        return _sdpa_run(make_call(q_, k_, v_, bias, None, kv))

    sdpa_out, sdpa_grads = _grads(sdpa, [q, k, v], dout)
    return {
        "ours": [_err(ours_out, ref_out)] + [_err(g, r) for g, r in zip(ours_grads, ref_grads)],
        "sdpa": [_err(sdpa_out, ref_out)] + [_err(g, r) for g, r in zip(sdpa_grads, ref_grads)],
        "ref_scale": [ref_out.abs().max().item()] + [r.abs().max().item() for r in ref_grads],
        "dtype": dtype_name,
    }


def empty_rows_case():
    """kv_lens = 0 for one batch row: zeros out, zero gradients, no NaN."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 1, 5, 8, generator=gen) for _ in range(3))
    out, grads = _grads(lambda q_, k_, v_: attention(q_, k_, v_, kv_lens=[0, 5], backend="triton"), [q, k, v],
                        torch.ones(2, 1, 5, 8))
    ref = reference.attention(q.double(), k.double(), v.double(), None, torch.tensor([0, 5]))
    return {"out_err": _err(out, ref), "row0_max": out[0].abs().max().item(),
            "grad_row0_max": max(g[0].abs().max().item() for g in grads),
            "finite": bool(all(torch.isfinite(g).all() for g in grads))}


def match_case(name, b, na, nb, c, dtype_name):
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    a = torch.randn(b, na, c, generator=gen).to(dtype)
    bb = torch.randn(b, nb, c, generator=gen).to(dtype)
    best, idx = match_tokens(a, bb, backend="triton")
    an = a.double() / a.double().norm(dim=-1, keepdim=True)
    bn = bb.double() / bb.double().norm(dim=-1, keepdim=True)
    sim = an @ bn.transpose(1, 2)
    ref_best = sim.max(-1).values
    chosen = sim.gather(-1, idx[..., None])[..., 0]
    return {"best_err": _err(best, ref_best), "chosen_gap": (ref_best - chosen).max().item(),
            "idx_in_range": bool(((idx >= 0) & (idx < nb)).all()), "dtype": dtype_name}


MATCH_CASES = [("match_f32", 2, 19, 23, 40, "float32"), ("match_f16", 1, 33, 17, 70, "float16"),
               ("match_bf16", 2, 7, 40, 16, "bfloat16")]

if __name__ == "__main__":
    torch.set_num_threads(1)
    results = {c[0]: attention_case(*c) for c in ATTENTION_CASES}
    results["empty_rows"] = empty_rows_case()
    results.update({c[0]: match_case(*c) for c in MATCH_CASES})
    json.dump(results, sys.stdout)
