"""Flash attention backward in Triton (FlashAttention-2 scheme, no atomics).

Probabilities are recomputed from the forward's ``lse``; ``delta = rowsum(dO * O)`` is computed
by the launcher. One kernel walks query blocks for a key block and accumulates ``dK, dV``; a
second walks key blocks for a query block and accumulates ``dQ``. Same bias / key padding
handling as the forward, and the same head-dim split into two power-of-two pieces
(``BLOCK_D0 + BLOCK_D1``, ``BLOCK_DV0 + BLOCK_DV1``; a second piece of 0 means none). The bias
itself gets no gradient here (the dispatcher sends calls whose bias requires one elsewhere).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import dot


@triton.jit
def _probs(s, bias_ptr, lse2, row_ok, col_ok, qk_scale, HAS_BIAS: tl.constexpr):
    """Probabilities from raw scores ``q k^T`` (log2 domain, like the forward)."""
    s = s * qk_scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    s = tl.where(col_ok[None, :], s, float("-inf"))
    # rows with no visible key have lse = -inf: make their probabilities 0, not NaN
    lse_safe = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    return tl.exp2(s - lse_safe[:, None])


@triton.jit
def flash_bwd_dkdv_kernel(
    Q, K, V, Bias, Lens, DO, Lse, Delta, DK, DV_,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_bb, s_bh, s_bm, s_bn,
    s_lb, s_lh,
    H, NQ, NK, D, DV, qk_scale, scale,
    HAS_BIAS: tl.constexpr, HAS_LENS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_DV0: tl.constexpr, BLOCK_DV1: tl.constexpr,
):
    """dK, dV share k's / v's strides (the launcher allocates them like k and v); dO shares out's."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: B*H*N*D may exceed 2**31
    h = bh % H
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_dv0 = tl.arange(0, BLOCK_DV0)
    kv_len = NK
    if HAS_LENS:
        kv_len = tl.minimum(tl.load(Lens + b).to(tl.int32), NK)
    col_ok = n < kv_len
    in_range = n < NK
    k_ptr = K + b * s_kb + h * s_kh + n[None, :] * s_kn
    v_ptr = V + b * s_vb + h * s_vh + n[None, :] * s_vn
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_ob + h * s_oh

    kt0 = tl.load(k_ptr + offs_d0[:, None] * s_kd, mask=col_ok[None, :] & (offs_d0 < D)[:, None], other=0.0)
    vt0 = tl.load(v_ptr + offs_dv0[:, None] * s_vd, mask=col_ok[None, :] & (offs_dv0 < DV)[:, None], other=0.0)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_DV0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        kt1 = tl.load(k_ptr + offs_d1[:, None] * s_kd, mask=col_ok[None, :] & (offs_d1 < D)[:, None], other=0.0)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    if BLOCK_DV1 > 0:
        offs_dv1 = BLOCK_DV0 + tl.arange(0, BLOCK_DV1)
        vt1 = tl.load(v_ptr + offs_dv1[:, None] * s_vd, mask=col_ok[None, :] & (offs_dv1 < DV)[:, None], other=0.0)
        dv1 = tl.zeros([BLOCK_N, BLOCK_DV1], dtype=tl.float32)
    if pid_n * BLOCK_N < kv_len:
        for start_m in range(0, NQ, BLOCK_M):
            m = start_m + offs_m
            row_ok = m < NQ
            q0 = tl.load(q_base + m[:, None] * s_qm + offs_d0[None, :] * s_qd,
                         mask=row_ok[:, None] & (offs_d0 < D)[None, :], other=0.0)
            do0 = tl.load(do_base + m[:, None] * s_om + offs_dv0[None, :] * s_od,
                          mask=row_ok[:, None] & (offs_dv0 < DV)[None, :], other=0.0)
            s = dot(q0, kt0, PRECISION)
            if BLOCK_D1 > 0:
                q1 = tl.load(q_base + m[:, None] * s_qm + offs_d1[None, :] * s_qd,
                             mask=row_ok[:, None] & (offs_d1 < D)[None, :], other=0.0)
                s += dot(q1, kt1, PRECISION)
            lse2 = tl.load(Lse + b * s_lb + h * s_lh + m, mask=row_ok, other=float("-inf")) * 1.4426950408889634
            delta = tl.load(Delta + b * s_lb + h * s_lh + m, mask=row_ok, other=0.0)
            bias_ptr = Bias + b * s_bb + h * s_bh + m[:, None] * s_bm + n[None, :] * s_bn
            p = _probs(s, bias_ptr, lse2, row_ok, col_ok, qk_scale, HAS_BIAS)
            pt = tl.trans(p).to(do0.dtype)
            dv0 += dot(pt, do0, PRECISION)
            dp = dot(do0, vt0, PRECISION)
            if BLOCK_DV1 > 0:
                do1 = tl.load(do_base + m[:, None] * s_om + offs_dv1[None, :] * s_od,
                              mask=row_ok[:, None] & (offs_dv1 < DV)[None, :], other=0.0)
                dv1 += dot(pt, do1, PRECISION)
                dp += dot(do1, vt1, PRECISION)
            dst = tl.trans(p * (dp - delta[:, None])).to(q0.dtype)
            dk0 += dot(dst, q0, PRECISION)
            if BLOCK_D1 > 0:
                dk1 += dot(dst, q1, PRECISION)
    dk_ptr = DK + b * s_kb + h * s_kh + n[:, None] * s_kn
    dv_ptr = DV_ + b * s_vb + h * s_vh + n[:, None] * s_vn
    tl.store(dk_ptr + offs_d0[None, :] * s_kd, (dk0 * scale).to(DK.dtype.element_ty),
             mask=in_range[:, None] & (offs_d0 < D)[None, :])
    tl.store(dv_ptr + offs_dv0[None, :] * s_vd, dv0.to(DV_.dtype.element_ty),
             mask=in_range[:, None] & (offs_dv0 < DV)[None, :])
    if BLOCK_D1 > 0:
        tl.store(dk_ptr + offs_d1[None, :] * s_kd, (dk1 * scale).to(DK.dtype.element_ty),
                 mask=in_range[:, None] & (offs_d1 < D)[None, :])
    if BLOCK_DV1 > 0:
        tl.store(dv_ptr + offs_dv1[None, :] * s_vd, dv1.to(DV_.dtype.element_ty),
                 mask=in_range[:, None] & (offs_dv1 < DV)[None, :])


@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, Bias, Lens, DO, Lse, Delta, DQ,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_bb, s_bh, s_bm, s_bn,
    s_lb, s_lh,
    H, NQ, NK, D, DV, qk_scale, scale,
    HAS_BIAS: tl.constexpr, HAS_LENS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_DV0: tl.constexpr, BLOCK_DV1: tl.constexpr,
):
    """dQ shares q's strides (the launcher allocates it like q)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: B*H*N*D may exceed 2**31
    h = bh % H
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_dv0 = tl.arange(0, BLOCK_DV0)
    row_ok = m < NQ
    kv_len = NK
    if HAS_LENS:
        kv_len = tl.minimum(tl.load(Lens + b).to(tl.int32), NK)
    q_ptr = Q + b * s_qb + h * s_qh + m[:, None] * s_qm
    do_ptr = DO + b * s_ob + h * s_oh + m[:, None] * s_om
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh

    q0 = tl.load(q_ptr + offs_d0[None, :] * s_qd, mask=row_ok[:, None] & (offs_d0 < D)[None, :], other=0.0)
    do0 = tl.load(do_ptr + offs_dv0[None, :] * s_od, mask=row_ok[:, None] & (offs_dv0 < DV)[None, :], other=0.0)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = tl.load(q_ptr + offs_d1[None, :] * s_qd, mask=row_ok[:, None] & (offs_d1 < D)[None, :], other=0.0)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    if BLOCK_DV1 > 0:
        offs_dv1 = BLOCK_DV0 + tl.arange(0, BLOCK_DV1)
        do1 = tl.load(do_ptr + offs_dv1[None, :] * s_od, mask=row_ok[:, None] & (offs_dv1 < DV)[None, :], other=0.0)
    lse2 = tl.load(Lse + b * s_lb + h * s_lh + m, mask=row_ok, other=float("-inf")) * 1.4426950408889634
    delta = tl.load(Delta + b * s_lb + h * s_lh + m, mask=row_ok, other=0.0)
    for start_n in range(0, kv_len, BLOCK_N):
        n = start_n + offs_n
        col_ok = n < kv_len
        kt0 = tl.load(k_base + n[None, :] * s_kn + offs_d0[:, None] * s_kd,
                      mask=col_ok[None, :] & (offs_d0 < D)[:, None], other=0.0)
        s = dot(q0, kt0, PRECISION)
        if BLOCK_D1 > 0:
            kt1 = tl.load(k_base + n[None, :] * s_kn + offs_d1[:, None] * s_kd,
                          mask=col_ok[None, :] & (offs_d1 < D)[:, None], other=0.0)
            s += dot(q1, kt1, PRECISION)
        bias_ptr = Bias + b * s_bb + h * s_bh + m[:, None] * s_bm + n[None, :] * s_bn
        p = _probs(s, bias_ptr, lse2, row_ok, col_ok, qk_scale, HAS_BIAS)
        vt0 = tl.load(v_base + n[None, :] * s_vn + offs_dv0[:, None] * s_vd,
                      mask=col_ok[None, :] & (offs_dv0 < DV)[:, None], other=0.0)
        dp = dot(do0, vt0, PRECISION)
        if BLOCK_DV1 > 0:
            vt1 = tl.load(v_base + n[None, :] * s_vn + offs_dv1[:, None] * s_vd,
                          mask=col_ok[None, :] & (offs_dv1 < DV)[:, None], other=0.0)
            dp += dot(do1, vt1, PRECISION)
        ds = (p * (dp - delta[:, None])).to(kt0.dtype)
        dq0 += dot(ds, tl.trans(kt0), PRECISION)
        if BLOCK_D1 > 0:
            dq1 += dot(ds, tl.trans(kt1), PRECISION)
    dq_ptr = DQ + b * s_qb + h * s_qh + m[:, None] * s_qm
    tl.store(dq_ptr + offs_d0[None, :] * s_qd, (dq0 * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d0 < D)[None, :])
    if BLOCK_D1 > 0:
        tl.store(dq_ptr + offs_d1[None, :] * s_qd, (dq1 * scale).to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d1 < D)[None, :])
