"""The jits of `page_scores` and `update_key_bounds`.

Shapes: B seqs, Hq/Hkv query/kv heads, G = Hq // Hkv, P pages per list, D head_dim,
N pages in the pool, n tokens appended.
`_page_scores_kernel`: one program per (sequence, KV head, BLOCK_P list entries); it gathers
the key min/max rows of its pages once ([BLOCK_P, D]) and loops over the G query heads of the
group, so the summaries are read once per group.
`_update_key_bounds_kernel`: one program per appended token; atomic min/max per channel, so
several tokens of one page in the same launch are fine.
"""

import triton
import triton.language as tl


@triton.jit
def _page_scores_kernel(q_ptr, kmin_ptr, kmax_ptr, table_ptr, lens_ptr, forced_ptr, out_ptr,
                        stride_qb, stride_qh, stride_kmin, stride_kmax, stride_tb, stride_th,
                        sink_pages, recent_pages, P,
                        HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, REDUCE: tl.constexpr,
                        HAS_FORCED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    p_ok = offs_p < P
    page = tl.load(table_ptr + b * stride_tb + h * stride_th + offs_p, mask=p_ok, other=-1).to(tl.int64)
    listed = page >= 0
    ld = listed[:, None] & d_ok[None, :]
    lo = tl.load(kmin_ptr + page[:, None] * stride_kmin + offs_d[None, :], mask=ld, other=0.0).to(tl.float32)
    hi = tl.load(kmax_ptr + page[:, None] * stride_kmax + offs_d[None, :], mask=ld, other=0.0).to(tl.float32)
    if REDUCE == 0:  # max
        agg = tl.full([BLOCK_P], float("-inf"), tl.float32)
    else:
        agg = tl.zeros([BLOCK_P], tl.float32)
    for g in tl.static_range(G):
        qg = tl.load(q_ptr + b * stride_qb + (h * G + g) * stride_qh + offs_d, mask=d_ok, other=0.0)
        qg = qg.to(tl.float32)[None, :]
        bound = tl.sum(tl.maximum(qg * lo, qg * hi), 1)  # [BLOCK_P]
        if REDUCE == 0:
            agg = tl.maximum(agg, bound)
        else:
            agg += bound
    if REDUCE == 2:  # mean
        agg = agg / G
    length = tl.load(lens_ptr + pid_bh)
    forced = (offs_p < sink_pages) | (offs_p >= length - recent_pages)
    agg = tl.where(forced, float("inf"), agg)
    if HAS_FORCED:  # caller's forced scores (e.g. by slot positions) win where non-zero
        f = tl.load(forced_ptr + pid_bh * P + offs_p, mask=p_ok, other=0.0)
        agg = tl.where(f != 0, f, agg)
    agg = tl.where(listed, agg, float("-inf"))
    tl.store(out_ptr + pid_bh * P + offs_p, agg, mask=p_ok)


@triton.jit
def _update_key_bounds_kernel(kmin_ptr, kmax_ptr, pages_ptr, k_ptr, stride_kmin, stride_kmax, stride_k,
                              D: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    page = tl.load(pages_ptr + i).to(tl.int64)
    k = tl.load(k_ptr + i * stride_k + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    tl.atomic_min(kmin_ptr + page * stride_kmin + offs_d, k, mask=d_ok)
    tl.atomic_max(kmax_ptr + page * stride_kmax + offs_d, k, mask=d_ok)
