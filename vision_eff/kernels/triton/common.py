"""Helpers shared by the Triton kernels."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """``tl.dot`` with ``input_precision=PRECISION``; ``"upcast"`` multiplies in float32 instead (the
    Triton interpreter's bfloat16 dot is wrong, so interpreter runs use it; operands keep their
    bfloat16 rounding, so the test still sees bfloat16 arithmetic)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def precision(dtype: torch.dtype) -> str:
    """float32 inputs multiply in full precision (no TF32), like PyTorch's default."""
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"
