"""The jit of `quant_decode`: `_sparse_decode_kernel` reading quantized pages.

Shapes: B seqs, Hq/Hkv query/kv heads, G = Hq // Hkv, P pages per list, S page_size,
D head_dim, N pages in the pool, NS splits, R low-rank rank, TG/CG tokens/channels per scale.
Codes (int8, or two uint4 per byte) and their group scales/zero points are loaded per tile and
dequantized in registers (float32, then rounded to q's dtype for the dot products); nothing is
written back. GEAR's low-rank residual stays factored: scores get (q @ b_k) @ a_k^T, outputs
(p @ a_v) @ b_v^T, with the [G, R] products kept in float32 beside the online softmax.
Layout: see `layout.py`.
"""

import triton
import triton.language as tl

from ._common import mma, round_to


@triton.jit
def _dequant_tile(codes_ptr, scale_ptr, zero_ptr, page, slot, offs_d, ok2,
                  stride_cn, stride_cs, stride_sn, stride_ss, stride_sc,
                  BITS: tl.constexpr, TG: tl.constexpr, CG: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Values of a tile of tokens: `[BLOCK_N, BLOCK_D]` float32 (0 where ~ok2)."""
    row = page[:, None] * stride_cn + slot[:, None] * stride_cs
    if BITS == 8:
        c = tl.load(codes_ptr + row + offs_d[None, :], mask=ok2, other=0).to(tl.float32)
    else:
        byte = tl.load(codes_ptr + row + (offs_d // 2)[None, :], mask=ok2, other=0).to(tl.int32)
        c = ((byte >> ((offs_d % 2) * 4)[None, :]) & 0xF).to(tl.float32)
    s_off = page[:, None] * stride_sn + (slot // TG)[:, None] * stride_ss + (offs_d // CG)[None, :] * stride_sc
    x = c * tl.load(scale_ptr + s_off, mask=ok2, other=0.0).to(tl.float32)
    if HAS_ZERO:
        x += tl.load(zero_ptr + s_off, mask=ok2, other=0.0).to(tl.float32)
    return x


@triton.jit
def _quant_decode_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
    ka_ptr, kb_ptr, va_ptr, vb_ptr,
    table_ptr, lens_ptr, valid_ptr, mask_ptr, o_part_ptr, lse_part_ptr,
    stride_qb, stride_qh,
    stride_kcn, stride_kcs, stride_ksn, stride_kss, stride_ksc,
    stride_vcn, stride_vcs, stride_vsn, stride_vss, stride_vsc,
    stride_kan, stride_kas, stride_kbb, stride_kbh, stride_kbd,
    stride_van, stride_vas, stride_vbb, stride_vbh, stride_vbd,
    stride_tb, stride_th,
    stride_valid_n, stride_valid_s,
    stride_mb, stride_mh, stride_mp,
    scale_log2, pages_per_split,
    HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    K_BITS: tl.constexpr, K_TG: tl.constexpr, K_CG: tl.constexpr, K_ZERO: tl.constexpr,
    V_BITS: tl.constexpr, V_TG: tl.constexpr, V_CG: tl.constexpr, V_ZERO: tl.constexpr,
    K_RANK: tl.constexpr, V_RANK: tl.constexpr, BLOCK_R: tl.constexpr,
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
    offs_r = tl.arange(0, BLOCK_R)
    g_ok = offs_g < G
    d_ok = offs_d < D
    cdt = q_ptr.dtype.element_ty  # compute dtype

    q_rows = q_ptr + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_rows, mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if K_RANK > 0:  # q projected on the key basis: [BLOCK_G, BLOCK_R]
        kb = tl.load(kb_ptr + b * stride_kbb + h * stride_kbh + offs_d[:, None] * stride_kbd + offs_r[None, :],
                     mask=d_ok[:, None] & (offs_r < K_RANK)[None, :], other=0.0).to(tl.float32)
        qb = mma(q.to(tl.float32), kb, True)
    if V_RANK > 0:
        acc_r = tl.zeros([BLOCK_G, BLOCK_R], tl.float32)

    n_pages = tl.load(lens_ptr + pid_bh)
    p_begin = split * pages_per_split
    p_end = tl.minimum(p_begin + pages_per_split, n_pages)
    table = table_ptr + b * stride_tb + h * stride_th

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for t0 in range(p_begin * S, p_end * S, BLOCK_N):
        t = t0 + offs_n
        in_range = t < p_end * S
        p_idx = t // S
        slot = t % S
        page = tl.load(table + p_idx, mask=in_range, other=-1).to(tl.int64)
        ok = in_range & (page >= 0)
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + page * stride_valid_n + slot * stride_valid_s, mask=ok, other=0) != 0)
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + b * stride_mb + h * stride_mh + p_idx * stride_mp + slot,
                               mask=ok, other=0) != 0)
        kv_ok = ok[:, None] & d_ok[None, :]
        k = _dequant_tile(kc_ptr, ks_ptr, kz_ptr, page, slot, offs_d, kv_ok,
                          stride_kcn, stride_kcs, stride_ksn, stride_kss, stride_ksc,
                          K_BITS, K_TG, K_CG, K_ZERO)
        k = round_to(k, cdt, EMU_BF16)
        s = mma(q, tl.trans(k), UPCAST)
        if K_RANK > 0:
            ka = tl.load(ka_ptr + page[:, None] * stride_kan + slot[:, None] * stride_kas + offs_r[None, :],
                         mask=ok[:, None] & (offs_r < K_RANK)[None, :], other=0.0).to(tl.float32)
            s += mma(qb, tl.trans(ka), True)
        s = tl.where(ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _dequant_tile(vc_ptr, vs_ptr, vz_ptr, page, slot, offs_d, kv_ok,
                          stride_vcn, stride_vcs, stride_vsn, stride_vss, stride_vsc,
                          V_BITS, V_TG, V_CG, V_ZERO)
        v = round_to(v, cdt, EMU_BF16)
        acc = acc * alpha[:, None] + mma(round_to(p, cdt, EMU_BF16), v, UPCAST)
        if V_RANK > 0:
            va = tl.load(va_ptr + page[:, None] * stride_van + slot[:, None] * stride_vas + offs_r[None, :],
                         mask=ok[:, None] & (offs_r < V_RANK)[None, :], other=0.0).to(tl.float32)
            acc_r = acc_r * alpha[:, None] + mma(p, va, True)
        m_i = m_new

    if V_RANK > 0:  # (p @ a_v) @ b_v^T, once per program
        vb = tl.load(vb_ptr + b * stride_vbb + h * stride_vbh + offs_d[:, None] * stride_vbd + offs_r[None, :],
                     mask=d_ok[:, None] & (offs_r < V_RANK)[None, :], other=0.0).to(tl.float32)
        acc += mma(acc_r, tl.trans(vb), True)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    row = (b * HKV * G + h * G + offs_g) * NUM_SPLITS + split
    tl.store(lse_part_ptr + row, lse, mask=g_ok)
    tl.store(o_part_ptr + row[:, None] * D + offs_d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
