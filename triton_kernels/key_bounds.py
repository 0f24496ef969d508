"""`update_key_bounds`: fold appended keys into the per-page key min/max (Quest summaries).

Shapes: N pages in the pool, D head_dim, n tokens. Reference: `ref.update_key_bounds_ref`
(what `PagedKVStore.append` does with `index_reduce_`).
"""

from __future__ import annotations

import torch

from ._common import check_device, pow2
from ._page_scores import _update_key_bounds_kernel


def update_key_bounds(key_min: torch.Tensor, key_max: torch.Tensor, pages: torch.Tensor,
                      k: torch.Tensor) -> None:
    """In place: key_min[pages[i]] = min(key_min[pages[i]], k[i]) per channel, max likewise.

    key_min, key_max: `[N, D]` float32; pages: `[n]` int page ids (repeats allowed); k: `[n, D]`.

    Raises:
        ValueError/TypeError: shapes, dtypes or devices that do not fit.
    """
    if key_min.dtype != torch.float32 or key_max.dtype != torch.float32:
        raise TypeError(f"kvkit.kernels.update_key_bounds: key bounds must be float32, "
                        f"got {key_min.dtype}, {key_max.dtype}")
    if key_min.shape != key_max.shape or key_min.dim() != 2 or k.dim() != 2 or k.shape[1] != key_min.shape[1]:
        raise ValueError(f"kvkit.kernels.update_key_bounds: key_min/key_max must be [N, D] and k [n, D], got "
                         f"{list(key_min.shape)}, {list(key_max.shape)}, {list(k.shape)}")
    if pages.dim() != 1 or pages.shape[0] != k.shape[0]:
        raise ValueError(f"kvkit.kernels.update_key_bounds: pages must be [n={k.shape[0]}], got {list(pages.shape)}")
    if key_min.stride(-1) != 1 or key_max.stride(-1) != 1:
        raise ValueError("kvkit.kernels.update_key_bounds: key bounds need a contiguous last dim")
    check_device(_update_key_bounds_kernel, "update_key_bounds", key_min, key_max, pages, k)
    if k.shape[0] == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    D = k.shape[1]
    _update_key_bounds_kernel[(k.shape[0],)](key_min, key_max, pages.contiguous(), k,
                                             key_min.stride(0), key_max.stride(0), k.stride(0),
                                             D=D, BLOCK_D=pow2(D))
