"""The Triton kernels compile ahead of time for Hopper (sm_90) without a GPU, with the exact tile
configs the launchers use, and fit the H100's shared memory. This catches what the interpreter
cannot: GPU-only type/shape errors in tl.dot, constexpr branches, register/shared-memory blow-ups."""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vision_eff.kernels.triton import flash, match  # noqa: E402
from vision_eff.kernels.triton.flash_bwd import flash_bwd_dkdv_kernel, flash_bwd_dq_kernel  # noqa: E402
from vision_eff.kernels.triton.flash_fwd import flash_fwd_kernel  # noqa: E402
from vision_eff.kernels.triton.match import match_kernel  # noqa: E402

H100_SHARED = 227 * 1024
PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
PRECISION = {"float16": "tf32", "bfloat16": "tf32", "float32": "ieee"}


def _compile(kernel, ptrs: dict[str, str], floats: tuple[str, ...], constexprs: dict):
    constexprs = dict(constexprs)
    options = {k: constexprs.pop(k) for k in ("num_warps", "num_stages") if k in constexprs}
    sig = {}
    for name in kernel.arg_names:
        sig[name] = ("constexpr" if name in constexprs else ptrs[name] if name in ptrs
                     else "fp32" if name in floats else "i32")
    src = ASTSource(kernel, sig, constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


# (dtype, head dim, bias, key padding): odd dims, both extremes of the tile table
FWD = [("float16", 72, True, True), ("bfloat16", 160, True, False)]
BWD = [("float16", 80, True, True), ("bfloat16", 160, True, False), ("bfloat16", 256, False, False)]


@pytest.mark.parametrize("dtype,d,bias,lens", FWD)
def test_forward_compiles_for_sm90(dtype, d, bias, lens):
    p = PTR[dtype]
    ptrs = dict(Q=p, K=p, V=p, Bias="*fp32", Lens="*i32", Out=p, Lse="*fp32")
    cfg = dict(flash.launch_config(d, d, interpret=False), HAS_BIAS=bias, HAS_LENS=lens, PRECISION=PRECISION[dtype])
    k = _compile(flash_fwd_kernel, ptrs, ("qk_scale",), cfg)
    assert k.asm["cubin"] and k.metadata.shared <= H100_SHARED


@pytest.mark.parametrize("dtype,d,bias,lens", BWD)
def test_backward_compiles_for_sm90(dtype, d, bias, lens):
    p = PTR[dtype]
    cfg = dict(flash.launch_config(d, d, backward=True, interpret=False), HAS_BIAS=bias, HAS_LENS=lens,
               PRECISION=PRECISION[dtype])
    common = dict(Q=p, K=p, V=p, Bias="*fp32", Lens="*i32", DO=p, Lse="*fp32", Delta="*fp32")
    for kernel, outs in ((flash_bwd_dkdv_kernel, dict(DK=p, DV_=p)), (flash_bwd_dq_kernel, dict(DQ=p))):
        k = _compile(kernel, {**common, **outs}, ("qk_scale", "scale"), cfg)
        assert k.asm["cubin"] and k.metadata.shared <= H100_SHARED, kernel.__name__


def test_matching_kernel_compiles_for_sm90():
    cfg = dict(match.launch_config(interpret=False), PRECISION="tf32")
    k = _compile(match_kernel, dict(A="*fp16", Bm="*fp16", Best="*fp32", Idx="*i64"), ("eps",), cfg)
    assert k.asm["cubin"] and k.metadata.shared <= H100_SHARED
