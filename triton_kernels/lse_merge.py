"""`lse_merge`: reduce the per-split partial results of a split (flash-decoding) attention.

Shapes: R rows, NS splits, D head_dim.
"""

from __future__ import annotations

import torch

from ._common import dot_mode, pow2
from ._lse_merge import _lse_merge_kernel


def lse_merge(o_part: torch.Tensor, lse_part: torch.Tensor, out_dtype: torch.dtype,
              out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge normalised partial outputs by their log-sum-exps.

    o_part: `[R, NS, D]` float32 contiguous; lse_part: `[R, NS]` float32 (-inf: empty split).
    Returns out `[R, D]` in `out_dtype` and lse `[R]` float32 (-inf and out 0 when all empty).
    Reference: `kvkit.kernels.ref.lse_merge_ref`.
    """
    R, NS, D = o_part.shape
    if tuple(lse_part.shape) != (R, NS):
        raise ValueError(f"lse_part must be [R, NS] = [{R}, {NS}], got {list(lse_part.shape)}")
    if o_part.dtype != torch.float32 or lse_part.dtype != torch.float32:
        raise TypeError(f"o_part and lse_part must be float32, got {o_part.dtype} and {lse_part.dtype}")
    o_part, lse_part = o_part.contiguous(), lse_part.contiguous()
    out = torch.empty(R, D, dtype=out_dtype, device=o_part.device) if out is None else out
    lse = torch.empty(R, dtype=torch.float32, device=o_part.device)
    if R:
        _lse_merge_kernel[(R,)](o_part, lse_part, out, lse, out.stride(0), D,
                                NUM_SPLITS=NS, BLOCK_SPLITS=pow2(NS, 2), BLOCK_D=pow2(D),
                                 EMU_BF16=dot_mode(_lse_merge_kernel, out.dtype)["EMU_BF16"])
    return out, lse
