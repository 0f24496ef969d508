"""The jit of `streaming_prefill`: causal flash attention where a KV head is dense or Λ-shaped.

Shapes: B seqs, Hq/Hkv query/kv heads, G = Hq // Hkv, T tokens, D head_dim.
One program per (BLOCK_M queries, sequence, query head). A dense head walks key blocks
[0, end of its query block); a streaming head walks only the sink blocks and the blocks that
meet its window (i - window < j <= i), so the key blocks in between are never loaded
(DuoAttention / LServe block-sparse prefill). Inside a visited block the exact mask applies.
"""

import triton
import triton.language as tl

from ._common import mma, round_to


@triton.jit
def _prefill_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d, d_ok,
                    lo, hi, L, sink, window, is_stream, scale_log2,
                    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, EMU_BF16: tl.constexpr):
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + offs_n
        j_ok = j < L
        ld = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + j[:, None] * stride_kt + offs_d[None, :], mask=ld, other=0.0)
        s = mma(q, tl.trans(k), UPCAST) * scale_log2  # [BLOCK_M, BLOCK_N]
        keep = j_ok[None, :] & (j[None, :] <= offs_m[:, None])
        keep = keep & ((is_stream == 0) | (j[None, :] < sink) | (offs_m[:, None] - j[None, :] < window))
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + j[:, None] * stride_vt + offs_d[None, :], mask=ld, other=0.0)
        acc = acc * alpha[:, None] + mma(round_to(p, v_base.dtype.element_ty, EMU_BF16), v, UPCAST)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _streaming_prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, stream_ptr, lens_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    T, sink, window, scale_log2,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, HAS_LENS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, EMU_BF16: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)  # B * H * T * D may pass 2**31
    hq = pid_bh % HQ
    hk = hq // G
    L = T
    if HAS_LENS:
        L = tl.minimum(tl.load(lens_ptr + b), T)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < L
    q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    is_stream = tl.load(stream_ptr + hk).to(tl.int32)

    hi = tl.minimum(m0 + BLOCK_M, L)                      # keys past the block's last query: masked
    sink_hi = tl.minimum(tl.cdiv(sink, BLOCK_N) * BLOCK_N, hi)
    win_lo = (tl.maximum(m0 - window + 1, 0) // BLOCK_N) * BLOCK_N
    hi1 = tl.where(is_stream != 0, sink_hi, hi)          # dense: everything in the first range
    lo2 = tl.where(is_stream != 0, tl.maximum(win_lo, sink_hi), hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _prefill_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n,
                                    offs_d, d_ok, 0, hi1, L, sink, window, is_stream, scale_log2,
                                    BLOCK_N, UPCAST, EMU_BF16)
    acc, m_i, l_i = _prefill_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n,
                                    offs_d, d_ok, lo2, hi, L, sink, window, is_stream, scale_log2,
                                    BLOCK_N, UPCAST, EMU_BF16)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = round_to(out, o_ptr.dtype.element_ty, EMU_BF16).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + b * stride_ob + hq * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], out,
             mask=m_ok[:, None] & d_ok[None, :])
