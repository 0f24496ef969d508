"""The jit of `sparse_decode`: one program per (sequence, KV head, split of its page list).

Shapes: B seqs, Hq/Hkv query/kv heads, G = Hq // Hkv, P pages per list, S page_size,
D head_dim, N pages in the pool, NS splits.
A program loads the G query heads of its KV head once ([BLOCK_G, D], G padded to 16 for tl.dot),
then walks its share of the page list BLOCK_N tokens at a time (a tile may span several pages:
token t of the list sits in page list[t // S], slot t % S), so each K/V page is read once for
the whole GQA group. Online softmax in base 2; the partial result of each split (normalised
output and log-sum-exp) goes to float32 buffers that `_lse_merge_kernel` reduces.
"""

import triton
import triton.language as tl

from ._common import mma, round_to


@triton.jit
def _sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, valid_ptr, mask_ptr, o_part_ptr, lse_part_ptr,
    stride_qb, stride_qh,
    stride_kn, stride_ks, stride_vn, stride_vs,
    stride_tb, stride_th,
    stride_valid_n, stride_valid_s,
    stride_mb, stride_mh, stride_mp,
    scale_log2, pages_per_split,
    HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, EMU_BF16: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < D

    q_rows = q_ptr + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_rows, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)  # [BLOCK_G, BLOCK_D]

    n_pages = tl.load(lens_ptr + pid_bh)  # one past the last valid list entry
    p_begin = split * pages_per_split
    p_end = tl.minimum(p_begin + pages_per_split, n_pages)
    table = table_ptr + b * stride_tb + h * stride_th

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for t0 in range(p_begin * S, p_end * S, BLOCK_N):
        t = t0 + offs_n                      # token index in the list  [BLOCK_N]
        in_range = t < p_end * S
        p_idx = t // S
        slot = t % S
        page = tl.load(table + p_idx, mask=in_range, other=-1).to(tl.int64)
        ok = in_range & (page >= 0)
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + page * stride_valid_n + slot * stride_valid_s, mask=ok, other=0) != 0)
        if HAS_MASK:
            m_ptrs = mask_ptr + b * stride_mb + h * stride_mh + p_idx * stride_mp + slot
            ok = ok & (tl.load(m_ptrs, mask=ok, other=0) != 0)
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + page[:, None] * stride_kn + slot[:, None] * stride_ks + offs_d[None, :],
                    mask=kv_ok, other=0.0)    # [BLOCK_N, BLOCK_D]
        s = mma(q, tl.trans(k), UPCAST) * scale_log2  # [BLOCK_G, BLOCK_N], log2 units
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp() at 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + page[:, None] * stride_vn + slot[:, None] * stride_vs + offs_d[None, :],
                    mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + mma(round_to(p, v_ptr.dtype.element_ty, EMU_BF16), v, UPCAST)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    row = (b * HKV * G + h * G + offs_g) * NUM_SPLITS + split  # [B, Hq, NS] flattened
    tl.store(lse_part_ptr + row, lse, mask=g_ok)
    tl.store(o_part_ptr + row[:, None] * D + offs_d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
