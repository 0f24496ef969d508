"""`page_scores`: Quest's per-page bound from per-page key min/max, on the GPU.

Shapes: B seqs, Hq/Hkv query/kv heads, G = Hq // Hkv, P pages per list, D head_dim, N pages in
the pool. The definition is `kvkit.scoring.quest_scores` (this package imports only torch and
triton, so the tests hold the two side by side); the top-k over the scores is
`kvkit.scoring.top_pages`, a device op, so the choice equals the definition's whenever the
scores do.
"""

from __future__ import annotations

import torch

from ._common import check_device, list_lengths, pow2
from ._page_scores import _page_scores_kernel

BLOCK_P = 32


REDUCES = {"max": 0, "sum": 1, "mean": 2}


def page_scores(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, page_table: torch.Tensor,
                reduce: str = "max", sink_pages: int = 0, recent_pages: int = 0,
                forced: torch.Tensor | None = None) -> torch.Tensor:
    """Quest's upper bound of q·k for every listed page, per KV head (Triton).

    q: `[B, Hq, D]`; key_min, key_max: `[N, D]` (`store.key_bounds(layer)`); page_table:
    `[B, Hkv, P]` -1 padded; reduce: "max", "sum" or "mean" over the G query heads of a KV
    head; the first `sink_pages` and last `recent_pages` list entries score +inf; forced:
    optional `[B, Hkv, P]` float32 whose non-zero entries replace the score (e.g. the
    position-based sink/window scores of `kvkit.scoring.forced_from_positions`);
    padding scores -inf.
    Returns `[B, Hkv, P]` float32. Definition: `kvkit.scoring.quest_scores`.

    Raises:
        ValueError/TypeError: shapes, dtypes, devices or arguments that do not fit.
        NotImplementedError: reduce='softmax'.
    """
    if q.dim() != 3 or page_table.dim() != 3 or page_table.shape[0] != q.shape[0]:
        raise ValueError(f"kvkit.kernels.page_scores: q must be [B, Hq, D] and page_table [B, Hkv, P], "
                         f"got {list(q.shape)} and {list(page_table.shape)}")
    B, Hq, D = q.shape
    Hkv, P = page_table.shape[1:]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"kvkit.kernels.page_scores: num_qo_heads={Hq} must be a multiple of num_kv_heads={Hkv}")
    if key_min.shape != key_max.shape or key_min.dim() != 2 or key_min.shape[1] != D:
        raise ValueError(f"kvkit.kernels.page_scores: key_min and key_max must be [N, D={D}], "
                         f"got {list(key_min.shape)} and {list(key_max.shape)}")
    if reduce == "softmax":
        raise NotImplementedError("kvkit.kernels.page_scores: reduce='softmax' (a softmax over each row's pages) "
                                  "is not a kernel; score with reduce='max'/'sum'/'mean' or use the selector's "
                                  "torch path")
    if reduce not in REDUCES:
        raise ValueError(f"kvkit.kernels.page_scores: reduce must be one of {sorted(REDUCES)}, got {reduce!r}")
    if forced is not None and (forced.shape != page_table.shape or forced.dtype != torch.float32):
        raise ValueError(f"kvkit.kernels.page_scores: forced must be float32 {list(page_table.shape)}, "
                         f"got {forced.dtype} {list(forced.shape)}")
    if sink_pages < 0 or recent_pages < 0:
        raise ValueError(f"kvkit.kernels.page_scores: sink_pages and recent_pages must be >= 0, "
                         f"got {sink_pages}, {recent_pages}")
    if page_table.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"kvkit.kernels.page_scores: page_table must be int32/int64, got {page_table.dtype}")
    check_device(_page_scores_kernel, "page_scores", q, key_min, key_max, page_table)
    q = q if q.stride(-1) == 1 else q.contiguous()
    key_min = key_min if key_min.stride(-1) == 1 else key_min.contiguous()
    key_max = key_max if key_max.stride(-1) == 1 else key_max.contiguous()
    page_table = page_table.contiguous()
    out = torch.empty(B, Hkv, P, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    lens = list_lengths(page_table).reshape(-1)
    forced = forced.contiguous() if forced is not None else out
    _page_scores_kernel[(B * Hkv, -(-P // BLOCK_P))](
        q, key_min, key_max, page_table, lens, forced, out,
        q.stride(0), q.stride(1), key_min.stride(0), key_max.stride(0),
        page_table.stride(0), page_table.stride(1), sink_pages, recent_pages, P,
        HKV=Hkv, G=Hq // Hkv, D=D, REDUCE=REDUCES[reduce], HAS_FORCED=forced is not out,
        BLOCK_P=BLOCK_P, BLOCK_D=pow2(D),
    )
    return out
