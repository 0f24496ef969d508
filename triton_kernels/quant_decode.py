"""`quant_decode`: `sparse_decode` over int8 / packed-int4 pages with group scales (KIVI, GEAR).

Shapes: B seqs, Hq/Hkv query/kv heads, P pages per list, S page_size, D head_dim, N pages,
R low-rank rank. Layout of the pages: `layout.py`. Reference: `ref.quant_decode_ref`.
"""

from __future__ import annotations

import torch

from ._common import check_device, dot_mode, pow2
from ._lse_merge import _lse_merge_kernel
from ._quant_decode import _quant_decode_kernel
from .layout import LowRank, QuantPages, check_quant_pages
from .sparse_decode import FLOAT_DTYPES, as_u8, check_decode_args, split_plan

MAX_RANK = 64


def _check_lowrank(name: str, lr: LowRank | None, N: int, S: int, B: int, Hkv: int, D: int) -> int:
    if lr is None:
        return 0
    R = lr.a.shape[-1]
    if lr.a.dim() != 3 or tuple(lr.a.shape[:2]) != (N, S) or tuple(lr.b.shape) != (B, Hkv, D, R):
        raise ValueError(f"kvkit.kernels.quant_decode: {name}.a must be [N, S, R] = [{N}, {S}, R] and .b "
                         f"[B, Hkv, D, R] = [{B}, {Hkv}, {D}, R], got {list(lr.a.shape)} and {list(lr.b.shape)}")
    if not 1 <= R <= MAX_RANK or lr.a.stride(-1) != 1 or lr.b.stride(-1) != 1:
        raise ValueError(f"kvkit.kernels.quant_decode: {name} rank must be 1..{MAX_RANK} with contiguous "
                         f"last dims, got rank {R}")
    return R


def quant_decode(q: torch.Tensor, k: QuantPages, v: QuantPages, page_table: torch.Tensor,
                 slot_valid: torch.Tensor | None = None, scale: float | None = None,
                 slot_mask: torch.Tensor | None = None, k_lowrank: LowRank | None = None,
                 v_lowrank: LowRank | None = None, num_splits: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over the listed pages of a quantized page pool (Triton).

    q: `[B, Hq, D]` (fp16/bf16/fp32: the compute dtype); k, v: `QuantPages` (bits 8 or 4, each
    with its own grouping); page_table, slot_valid, slot_mask, num_splits: as `sparse_decode`;
    k_lowrank / v_lowrank: optional GEAR residual `LowRank(a [N, S, R], b [B, Hkv, D, R])`.
    Returns out `[B, Hq, D]` (q's dtype), lse `[B, Hq]` float32.

    Example (kvkit's Int8Codec storage `st`):
        >>> quant_decode(q, QuantPages(st.k, st.k_scale), QuantPages(st.v, st.v_scale), pages,
        ...              store.slot_positions(layer) >= 0)

    Raises:
        ValueError/TypeError: shapes, dtypes or devices that do not fit.
        NotImplementedError: bits other than 4/8, head_dim > 256.
    """
    N, S, D, KTG, KCG = check_quant_pages("quant_decode k", k)
    _, _, _, VTG, VCG = check_quant_pages("quant_decode v", v, N, S, D)
    B, Hq, Hkv, G, P, _, _, _ = check_decode_args("quant_decode", q, (N, S), page_table, slot_valid, slot_mask)
    if q.shape[-1] != D:
        raise ValueError(f"kvkit.kernels.quant_decode: q has head_dim {q.shape[-1]}, the pages {D}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"kvkit.kernels.quant_decode: q must be fp16/bf16/fp32, got {q.dtype}")
    KR = _check_lowrank("k_lowrank", k_lowrank, N, S, B, Hkv, D)
    VR = _check_lowrank("v_lowrank", v_lowrank, N, S, B, Hkv, D)
    check_device(_quant_decode_kernel, "quant_decode", q, k.codes, k.scale, v.codes, v.scale, page_table,
                 slot_valid, slot_mask)
    scale = scale if scale is not None else D ** -0.5
    q, page_table, slot_mask, lens, NS, pages_per_split, o_part, lse_part, out, lse = split_plan(
        q, page_table, slot_mask, S, num_splits)
    if B == 0 or Hq == 0:
        return out, lse
    dummy = q.new_empty(1)
    ka, kb = (k_lowrank.a, k_lowrank.b) if KR else (dummy, dummy)
    va, vb = (v_lowrank.a, v_lowrank.b) if VR else (dummy, dummy)
    lr_strides = lambda a, bb, r: (*a.stride()[:2], *bb.stride()[:3]) if r else (0,) * 5  # noqa: E731
    _quant_decode_kernel[(B * Hkv, NS)](
        q, k.codes, k.scale, k.zero if k.zero is not None else dummy,
        v.codes, v.scale, v.zero if v.zero is not None else dummy,
        ka, kb, va, vb,
        page_table, lens, as_u8(slot_valid, q), as_u8(slot_mask, q), o_part, lse_part,
        q.stride(0), q.stride(1),
        k.codes.stride(0), k.codes.stride(1), *k.scale.stride(),
        v.codes.stride(0), v.codes.stride(1), *v.scale.stride(),
        *lr_strides(ka, kb, KR), *lr_strides(va, vb, VR),
        page_table.stride(0), page_table.stride(1),
        *(slot_valid.stride() if slot_valid is not None else (0, 0)),
        *(slot_mask.stride()[:3] if slot_mask is not None else (0, 0, 0)),
        scale * 1.4426950408889634, pages_per_split,
        HKV=Hkv, G=G, S=S, D=D, NUM_SPLITS=NS,
        K_BITS=k.bits, K_TG=KTG, K_CG=KCG, K_ZERO=k.zero is not None,
        V_BITS=v.bits, V_TG=VTG, V_CG=VCG, V_ZERO=v.zero is not None,
        K_RANK=KR, V_RANK=VR, BLOCK_R=pow2(max(KR, VR, 1)),
        BLOCK_G=pow2(G), BLOCK_N=pow2(S, 64), BLOCK_D=pow2(D),
        HAS_VALID=slot_valid is not None, HAS_MASK=slot_mask is not None,
        **dot_mode(_quant_decode_kernel, q.dtype),
    )
    _lse_merge_kernel[(B * Hq,)](o_part, lse_part, out, lse, D, D,
                                 NUM_SPLITS=NS, BLOCK_SPLITS=pow2(NS, 2), BLOCK_D=pow2(D),
                                 EMU_BF16=dot_mode(_lse_merge_kernel, out.dtype)["EMU_BF16"])
    return out, lse
