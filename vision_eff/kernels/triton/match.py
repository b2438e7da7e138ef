"""Fused token matching for token merging, in Triton.

For each row of ``a [B, Na, C]``: the cosine similarity with every row of ``b [B, Nb, C]``, reduced
on the fly to the row max and its argmax; the ``Na x Nb`` matrix never leaves registers and the
inputs are normalised inside the kernel (norms are accumulated while the dot products are).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import dot, interpreting, precision

EPS = 1e-6  # same clamp as reference.match_tokens


@triton.jit
def match_kernel(
    A, Bm, Best, Idx,
    s_ab, s_am, s_ac, s_bb, s_bn, s_bc, s_ob, s_om,
    NA, NB, C, eps,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    row_ok = m < NA
    a_base = A + bid * s_ab + m[:, None] * s_am
    b_base = Bm + bid * s_bb

    a_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + offs_c
        a = tl.load(a_base + c[None, :] * s_ac, mask=row_ok[:, None] & (c < C)[None, :], other=0.0).to(tl.float32)
        a_sq += tl.sum(a * a, 1)
    inv_a = 1.0 / tl.maximum(tl.sqrt(a_sq), eps)

    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
    for n0 in range(0, NB, BLOCK_N):
        n = n0 + offs_n
        col_ok = n < NB
        dots = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        b_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + offs_c
            c_ok = c < C
            a = tl.load(a_base + c[None, :] * s_ac, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            bt = tl.load(b_base + n[None, :] * s_bn + c[:, None] * s_bc,
                         mask=col_ok[None, :] & c_ok[:, None], other=0.0)
            dots += dot(a, bt, PRECISION)
            bf = bt.to(tl.float32)
            b_sq += tl.sum(bf * bf, 0)
        inv_b = 1.0 / tl.maximum(tl.sqrt(b_sq), eps)
        sim = dots * inv_a[:, None] * inv_b[None, :]
        sim = tl.where(col_ok[None, :], sim, float("-inf"))
        blk_best = tl.max(sim, 1)
        blk_idx = tl.argmax(sim, 1).to(tl.int32) + n0
        better = blk_best > best  # strict: ties keep the earlier (lower) index
        best_idx = tl.where(better, blk_idx, best_idx)
        best = tl.where(better, blk_best, best)
    tl.store(Best + bid * s_ob + m * s_om, best, mask=row_ok)
    tl.store(Idx + bid * s_ob + m * s_om, best_idx.to(tl.int64), mask=row_ok)


def launch_config(interpret: bool | None = None) -> dict:
    if interpreting() if interpret is None else interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_C=32)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_C=64, num_warps=4, num_stages=2)


def match_tokens(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    bsz, na, c = a.shape
    nb = b.shape[1]
    best = torch.empty((bsz, na), dtype=torch.float32, device=a.device)
    idx = torch.empty((bsz, na), dtype=torch.int64, device=a.device)
    cfg = launch_config()
    grid = (triton.cdiv(na, cfg["BLOCK_M"]), bsz)
    match_kernel[grid](
        a, b, best, idx, *a.stride(), *b.stride(), *best.stride(), na, nb, c, EPS,
        PRECISION=precision(a.dtype), **cfg,
    )
    return best, idx
