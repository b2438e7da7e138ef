"""Flash attention forward in Triton: online softmax over key blocks, with an additive bias
(any broadcast of ``[B, H, Nq, Nk]``, read through strides so a per-key bias is never expanded),
key padding (``kv_lens``) and any head dim up to 256 (covered by one or two power-of-two tiles,
whichever pads less; padding lives in registers only). Scores are kept in the log2 domain
(``exp2``); ``lse`` is returned in nats.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import dot

LOG2E = 1.4426950408889634


@triton.jit
def flash_fwd_kernel(
    Q, K, V, Bias, Lens, Out, Lse,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_bb, s_bh, s_bm, s_bn,
    s_lb, s_lh,
    H, NQ, NK, D, DV, qk_scale,
    HAS_BIAS: tl.constexpr, HAS_LENS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_DV0: tl.constexpr, BLOCK_DV1: tl.constexpr,
):
    """The head dim is covered by two power-of-two pieces (``BLOCK_D0 + BLOCK_D1``, the second may be 0):
    D=72 runs as 64+16 and D=160 as 128+32 instead of being padded to 128 and 256."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: B*H*N*D may exceed 2**31
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_dv0 = tl.arange(0, BLOCK_DV0)
    row_ok = offs_m < NQ
    q_base = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    o_base = Out + b * s_ob + h * s_oh + offs_m[:, None] * s_om
    bias_base = Bias + b * s_bb + h * s_bh + offs_m[:, None] * s_bm

    q0 = tl.load(q_base + offs_d0[None, :] * s_qd, mask=row_ok[:, None] & (offs_d0 < D)[None, :], other=0.0)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = tl.load(q_base + offs_d1[None, :] * s_qd, mask=row_ok[:, None] & (offs_d1 < D)[None, :], other=0.0)
    if BLOCK_DV1 > 0:
        offs_dv1 = BLOCK_DV0 + tl.arange(0, BLOCK_DV1)
        acc1 = tl.zeros([BLOCK_M, BLOCK_DV1], dtype=tl.float32)
    kv_len = NK
    if HAS_LENS:
        kv_len = tl.minimum(tl.load(Lens + b).to(tl.int32), NK)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_DV0], dtype=tl.float32)
    for start_n in range(0, kv_len, BLOCK_N):
        n = start_n + offs_n
        col_ok = n < kv_len
        k0t = tl.load(k_base + n[None, :] * s_kn + offs_d0[:, None] * s_kd,
                      mask=col_ok[None, :] & (offs_d0 < D)[:, None], other=0.0)
        s = dot(q0, k0t, PRECISION)
        if BLOCK_D1 > 0:
            k1t = tl.load(k_base + n[None, :] * s_kn + offs_d1[:, None] * s_kd,
                          mask=col_ok[None, :] & (offs_d1 < D)[:, None], other=0.0)
            s += dot(q1, k1t, PRECISION)
        s = s * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_base + n[None, :] * s_bn, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = tl.load(v_base + n[:, None] * s_vn + offs_dv0[None, :] * s_vd,
                     mask=col_ok[:, None] & (offs_dv0 < DV)[None, :], other=0.0)
        acc0 = acc0 * alpha[:, None] + dot(p.to(v0.dtype), v0, PRECISION)
        if BLOCK_DV1 > 0:
            v1 = tl.load(v_base + n[:, None] * s_vn + offs_dv1[None, :] * s_vd,
                         mask=col_ok[:, None] & (offs_dv1 < DV)[None, :], other=0.0)
            acc1 = acc1 * alpha[:, None] + dot(p.to(v1.dtype), v1, PRECISION)
        m_i = m_new

    seen = l_i > 0
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(o_base + offs_dv0[None, :] * s_od, (acc0 * inv_l[:, None]).to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv0 < DV)[None, :])
    if BLOCK_DV1 > 0:
        tl.store(o_base + offs_dv1[None, :] * s_od, (acc1 * inv_l[:, None]).to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dv1 < DV)[None, :])
    tl.store(Lse + b * s_lb + h * s_lh + offs_m, lse, mask=row_ok)


def split_dim(d: int) -> tuple[int, int]:
    """Two power-of-two tile widths (each >= 16 for tl.dot, the second possibly 0) covering ``d``,
    used when they waste less than padding ``d`` to one power of two."""
    whole = max(16, triton.next_power_of_2(d))
    if d <= 16:
        return whole, 0
    first = 1 << (d.bit_length() - 1)
    rest = d - first
    if rest == 0:
        return first, 0
    second = max(16, triton.next_power_of_2(rest))
    return (first, second) if first + second < whole else (whole, 0)
