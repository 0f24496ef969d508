"""`sparse_decode`: one decode step of attention over the pages each (sequence, KV head) selected.

Shapes: B seqs, Hq/Hkv query/kv heads, G = Hq // Hkv, P pages per list, S page_size,
D head_dim, N pages in the pool, NS splits of each page list.
The reference is `kvkit.attention.ref.sparse_decode_ref` (same arguments, same results).
"""

from __future__ import annotations

import torch

from ._common import check_device, dot_mode, list_lengths, pow2
from ._lse_merge import _lse_merge_kernel
from ._sparse_decode import _sparse_decode_kernel

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
TARGET_PROGRAMS = 264       # ~2 waves of an H100's 132 SMs
MIN_TOKENS_PER_SPLIT = 256  # below this a split costs more in merge than it saves


def choose_num_splits(batch_kv_heads: int, max_pages: int, page_size: int,
                      target_programs: int = TARGET_PROGRAMS) -> int:
    """Flash-decoding split count: enough programs to fill the GPU, none shorter than
    MIN_TOKENS_PER_SPLIT tokens, at most one page per split."""
    if max_pages == 0:
        return 1
    by_occupancy = -(-target_programs // max(batch_kv_heads, 1))
    by_length = max(1, (max_pages * page_size) // MIN_TOKENS_PER_SPLIT)
    return max(1, min(by_occupancy, by_length, max_pages))


def check_decode_args(name: str, q: torch.Tensor, k_shape, page_table: torch.Tensor,
                      slot_valid: torch.Tensor | None, slot_mask: torch.Tensor | None):
    """Shared checks of the decode launchers; returns B, Hq, Hkv, G, P, N, S, D."""
    if q.dim() != 3:
        raise ValueError(f"kvkit.kernels.{name}: q must be [num_seqs, num_qo_heads, head_dim], got {list(q.shape)}")
    B, Hq, D = q.shape
    N, S = k_shape[0], k_shape[1]
    if page_table.dim() != 3 or page_table.shape[0] != B:
        raise ValueError(f"kvkit.kernels.{name}: page_table must be [num_seqs, num_kv_heads, P] = "
                         f"[{B}, Hkv, P], got {list(page_table.shape)}")
    if page_table.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"kvkit.kernels.{name}: page_table must be int32 or int64, got {page_table.dtype}")
    Hkv, P = page_table.shape[1], page_table.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"kvkit.kernels.{name}: num_qo_heads={Hq} must be a multiple of num_kv_heads={Hkv}")
    if D > MAX_HEAD_DIM:
        raise NotImplementedError(f"kvkit.kernels.{name}: head_dim={D} unsupported (<= {MAX_HEAD_DIM}); "
                                  "use backend='ref'")
    if slot_valid is not None and (tuple(slot_valid.shape) != (N, S) or slot_valid.dtype != torch.bool):
        raise ValueError(f"kvkit.kernels.{name}: slot_valid must be bool [N, S] = [{N}, {S}], "
                         f"got {slot_valid.dtype} {list(slot_valid.shape)}")
    if slot_mask is not None and (tuple(slot_mask.shape) != (B, Hkv, P, S) or slot_mask.dtype != torch.bool):
        raise ValueError(f"kvkit.kernels.{name}: slot_mask must be bool [B, Hkv, P, S] = "
                         f"[{B}, {Hkv}, {P}, {S}], got {slot_mask.dtype} {list(slot_mask.shape)}")
    return B, Hq, Hkv, Hq // Hkv, P, N, S, D


def split_plan(q: torch.Tensor, page_table: torch.Tensor, slot_mask: torch.Tensor | None, page_size: int,
               num_splits: int | None):
    """What both split-K decode launchers set up: contiguous inputs, list lengths `[B*Hkv]`,
    the number of splits and pages per split, the per-split partial outputs and the outputs.
    Returns (q, page_table, slot_mask, lens, NS, pages_per_split, o_part, lse_part, out, lse)."""
    B, Hq, D = q.shape
    Hkv, P = page_table.shape[1], page_table.shape[2]
    q = q if q.stride(-1) == 1 else q.contiguous()
    page_table = page_table.contiguous()
    slot_mask = slot_mask.contiguous() if slot_mask is not None else None
    lens = list_lengths(page_table).reshape(-1)  # [B*Hkv]
    NS = num_splits or choose_num_splits(B * Hkv, P, page_size)
    o_part = torch.empty(B, Hq, NS, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, Hq, NS, dtype=torch.float32, device=q.device)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    return q, page_table, slot_mask, lens, NS, max(1, -(-P // NS)), o_part, lse_part, out, lse


def as_u8(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A bool tensor viewed as uint8 (no copy), or a dummy pointer when absent."""
    if mask is None:
        return like.new_empty(1, dtype=torch.uint8)
    return mask.view(torch.uint8)


def sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  page_table: torch.Tensor, slot_valid: torch.Tensor | None = None,
                  scale: float | None = None, slot_mask: torch.Tensor | None = None,
                  num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention reading only the listed pages of a page pool (Triton).

    q: `[B, Hq, D]`; k_cache, v_cache: `[N, S, D]` (last dim contiguous; other strides free),
    same dtype as q (fp16, bf16 or fp32); page_table: `[B, Hkv, P]` int32/int64 page ids, -1
    where a list is shorter (lists may differ per head and may be empty); slot_valid: optional
    `[N, S]` bool (slot holds a token; e.g. `store.slot_positions(layer) >= 0`); slot_mask:
    optional `[B, Hkv, P, S]` bool; num_splits: programs per (sequence, KV head) (default:
    `choose_num_splits`).
    Returns out `[B, Hq, D]` in q's dtype and lse `[B, Hq]` float32 (natural log; -inf and
    out 0 where nothing is selected), like `kvkit.attention.ref.sparse_decode_ref`.

    Raises:
        ValueError/TypeError: shapes, dtypes or devices that do not fit.
        NotImplementedError: head_dim > 256.
    """
    B, Hq, Hkv, G, P, N, S, D = check_decode_args("sparse_decode", q, k_cache.shape, page_table,
                                                  slot_valid, slot_mask)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 3 or tuple(c.shape[1:]) != (S, D) or c.shape[0] != N or c.stride(-1) != 1:
            raise ValueError(f"kvkit.kernels.sparse_decode: {name} must be [N, S, D] = [{N}, {S}, {D}] "
                             f"with a contiguous last dim, got {list(c.shape)} strides {c.stride()}")
    if q.dtype not in FLOAT_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"kvkit.kernels.sparse_decode: q, k_cache, v_cache must share one of fp16/bf16/fp32, "
                        f"got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    check_device(_sparse_decode_kernel, "sparse_decode", q, k_cache, v_cache, page_table, slot_valid, slot_mask)
    scale = scale if scale is not None else D ** -0.5
    q, page_table, slot_mask, lens, NS, pages_per_split, o_part, lse_part, out, lse = split_plan(
        q, page_table, slot_mask, S, num_splits)
    if B == 0 or Hq == 0:
        return out, lse
    valid_u8, mask_u8 = as_u8(slot_valid, q), as_u8(slot_mask, q)
    _sparse_decode_kernel[(B * Hkv, NS)](
        q, k_cache, v_cache, page_table, lens, valid_u8, mask_u8, o_part, lse_part,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        page_table.stride(0), page_table.stride(1),
        *(slot_valid.stride() if slot_valid is not None else (0, 0)),
        *(slot_mask.stride()[:3] if slot_mask is not None else (0, 0, 0)),
        scale * 1.4426950408889634, pages_per_split,
        HKV=Hkv, G=G, S=S, D=D, NUM_SPLITS=NS,
        BLOCK_G=pow2(G), BLOCK_N=pow2(S, 64),
        BLOCK_D=pow2(D), HAS_VALID=slot_valid is not None, HAS_MASK=slot_mask is not None,
        **dot_mode(_sparse_decode_kernel, q.dtype),
    )
    _lse_merge_kernel[(B * Hq,)](o_part, lse_part, out, lse, D, D,
                                 NUM_SPLITS=NS, BLOCK_SPLITS=pow2(NS, 2), BLOCK_D=pow2(D),
                                 EMU_BF16=dot_mode(_lse_merge_kernel, out.dtype)["EMU_BF16"])
    return out, lse
