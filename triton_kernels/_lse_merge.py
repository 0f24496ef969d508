"""The jit of `lse_merge`: combine the partial results of the splits of one (sequence, head).

Shapes: R rows (B * Hq), NS splits, D head_dim. out = sum_i w_i o_i / sum_i w_i with
w_i = exp(lse_i - max lse); lse = max + log(sum w). Rows whose splits are all empty (lse -inf)
give out 0 and lse -inf.
"""

import triton
import triton.language as tl

from ._common import round_to


@triton.jit
def _lse_merge_kernel(o_part_ptr, lse_part_ptr, out_ptr, lse_ptr, stride_or, D,
                      NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
                      EMU_BF16: tl.constexpr):
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    d_ok = offs_d < D
    lse = tl.load(lse_part_ptr + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)                                   # [BLOCK_SPLITS]
    total = tl.sum(w, 0)
    o = tl.load(o_part_ptr + (row * NUM_SPLITS + offs_s)[:, None] * D + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_SPLITS, BLOCK_D]
    out = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    out = round_to(out, out_ptr.dtype.element_ty, EMU_BF16).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_or + offs_d, out, mask=d_ok)
    tl.store(lse_ptr + row, tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)),
                                     float("-inf")))
