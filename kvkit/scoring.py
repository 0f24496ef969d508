"""Page scoring: the one definition of every rule that ranks pages for a decode query.

Quest's bound (arXiv:2406.10774), LServe's two levels and reuse (arXiv:2502.14866), the pages
always read (sinks, recent window), the GQA reduce and the top-k. The selectors of
`kvkit.policies`, the decode engine of `kvkit.attention`, the vLLM backend and the tests of the
Triton scoring kernels all call these functions; nothing else computes a bound.

A page's keys are summarised by a *signed box* `[max | -min]` per channel (`2D` values). Both
halves are maxima, so the box of a union of pages is one `amax`, an empty box is all `-inf`,
and with the *signed query* `[relu(q) | relu(-q)]` Quest's upper bound of q·k over the page,
`sum_c max(q_c * min_c, q_c * max_c)`, is one matmul (`box_bound`).

Shapes: B sequences, Hq/Hkv query/KV heads (H: the KV heads scored), G = Hq // H, P list
entries (pages), S page_size, D head_dim, R = B * H rows, L = ceil(P / group) logical pages,
K pages kept. Scores are float32; `+inf` marks recent-window pages, `SINK_SCORE` sink pages
(forced in, ranked after the window), `-inf` padding.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "SINK_SCORE", "REDUCES", "signed_query", "signed_boxes", "box_bound", "reduce_group", "quest_scores",
    "lserve_scores", "reuse_scores", "forced_from_positions", "forced_from_lengths", "forced_pages",
    "top_pages", "top_pages_per_row", "is_listed",
]

SINK_SCORE = torch.finfo(torch.float32).max  # forced in, ranked after the recent window (+inf)
REDUCES = ("max", "sum", "mean", "softmax")


# ---- Quest's bound ---------------------------------------------------------------------------
def signed_query(q: torch.Tensor, rows: int) -> torch.Tensor:
    """`[B, Hq, D]` -> float32 `[rows, G, 2D]` `[relu(q) | relu(-q)]`, rows = B * H."""
    qf = q.reshape(rows, -1, q.shape[-1]).float()
    return torch.cat([qf.clamp(min=0), qf.clamp(max=0).neg_()], -1)


def signed_boxes(key_min: torch.Tensor, key_max: torch.Tensor, pages: torch.Tensor,
                 run: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The listed pages' signed boxes `[*pages.shape, 2D]` float32 from per-page key bounds
    `[N, D]`; entries of `pages` below 0 (padding) get empty boxes (`-inf`).

    run: `Selection.run` of `pages` (`[B, H, P]`); when it covers all P pages, the bounds are
    read as strided views, without a gather. Else one `index_select` per bound (advanced
    indexing is several times slower). float32 because bf16 matmuls this small cost more than
    the widening (exact) and a float32 matmul together.
    """
    if run is not None and run[2] == pages.shape[-1] and key_min.is_contiguous() and key_max.is_contiguous():
        first, stride, m = run
        D = key_max.shape[-1]
        size, step = (pages.shape[0] * pages.shape[1], m, D), (stride * D, D, 1)
        box = torch.cat([t.as_strided(size, step, t.storage_offset() + first * D) for t in (key_max, key_min)],
                        -1).float()
        box[..., D:].neg_()
        return box.view(*pages.shape, 2 * D)
    flat = pages.reshape(-1)
    padded = bool((flat < 0).any())
    idx = flat.clamp(min=0) if padded else flat
    box = torch.cat([key_max.index_select(0, idx), key_min.index_select(0, idx).neg_()], -1).float()
    if padded:
        box.masked_fill_((flat < 0)[:, None], -math.inf)
    return box.view(*pages.shape, box.shape[-1])


def box_bound(qs: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of q·k over each box: `[R, G, 2D]` x `[R, N, 2D]` -> `[R, G, N]` float32.

    Computed in the boxes' dtype (a bf16 bound is rounded to 8 mantissa bits: near-ties may
    swap). An empty box (all `-inf`) bounds to `-inf` (its `0 * -inf` terms are NaN).
    """
    bound = torch.bmm(qs.to(boxes.dtype), boxes.transpose(1, 2)).float()
    return bound.nan_to_num_(nan=-math.inf)


def reduce_group(bound: torch.Tensor, reduce: str, scale: float) -> torch.Tensor:
    """Aggregate `[..., G, P]` bounds over the G query heads of a KV head -> `[..., P]`.

    max: the group's best head decides (a page any head needs is kept). sum/mean: rank the
    same (mean = sum / G). softmax: sum over heads of each head's softmax over pages of
    `scale * bound`, i.e. the attention mass each head would put on the page if the bound were
    tight, so one head with a sharp peak is not outvoted by flat heads' large raw bounds.
    """
    if reduce == "max":
        return bound.amax(-2)
    if reduce == "sum":
        return bound.sum(-2)
    if reduce == "mean":
        return bound.mean(-2)
    if reduce != "softmax":
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    return torch.softmax(bound * scale, dim=-1).nan_to_num(0.0).sum(-2)


def quest_scores(q: torch.Tensor, boxes: torch.Tensor, forced: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """Quest's page scores `[B, H, P]`: the group-reduced bound of each listed page, replaced by
    `forced` where that is non-zero (`-inf` at padding, `+inf`/`SINK_SCORE` for forced pages).

    q: `[B, Hq, D]`; boxes: `[B, H, P, 2D]` (`signed_boxes`); forced: `[B or 1, H or 1, P]`.
    """
    B, H, P, _ = boxes.shape
    bound = box_bound(signed_query(q, B * H), boxes.reshape(B * H, P, -1))  # [R, G, P]
    score = reduce_group(bound, reduce, q.shape[-1] ** -0.5).view(B, H, P)
    return torch.where(forced != 0, forced, score)


# ---- LServe: two levels, and reuse ---------------------------------------------------------------
def lserve_scores(q: torch.Tensor, boxes: torch.Tensor, budget_pages: int | torch.Tensor, group: int,
                  coarse: int, reduce: str = "max", fill: float = -math.inf,
                  fine: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """LServe's two-level page scores `[B, H, P]` (before forcing: see `quest_scores`).

    Level 1: `group` consecutive list entries form a logical page whose box is the union of
    theirs; per row the best `ceil(coarse * budget_pages / group)` logical pages by the
    group-reduced bound are kept. Level 2: the entries inside them score by their own bound
    (or by `fine`); entries outside score `fill`; padding `-inf`.

    q: `[B, Hq, D]`; boxes: `[B, H, P, 2D]` signed boxes, empty (`-inf`) at padding;
    budget_pages: pages read per row, an int or `[B]`; fine: optional `entries [B*H, K] ->
    [B*H, G, K]` bounds of the listed entries (the vLLM backend scores a block by its best
    sub-page); by default `box_bound` on `boxes`. Only the kept entries are scored at level 2.
    """
    B, H, P, D2 = boxes.shape
    R, L = B * H, -(-P // group)
    scale = q.shape[-1] ** -0.5
    box = boxes.reshape(R, P, D2)
    if L * group != P:
        box = F.pad(box, (0, 0, 0, L * group - P), value=-math.inf)
    qs = signed_query(q, R)
    logical = box.view(R, L, group, D2).amax(2)  # [R, L, 2D] the union of each group's boxes
    upper = reduce_group(box_bound(qs, logical), reduce, scale)  # [R, L]
    keep = -(-coarse * torch.as_tensor(budget_pages).reshape(-1) // group)  # [1 or B]
    keep = keep.clamp(max=L).repeat_interleave(H) if keep.numel() > 1 else keep.clamp(max=L)
    top = upper.topk(int(keep.max()), dim=-1).indices  # [R, K_l] best first
    entries = (top[..., None] * group + torch.arange(group, device=q.device)).flatten(-2)  # [R, K_l * group]
    if fine is None:  # every entry's own bound: a softmax reduce normalises over the whole row
        inner = reduce_group(box_bound(qs, box), reduce, scale).gather(1, entries)  # [R, K_l * group]
    else:
        inner = reduce_group(fine(entries.clamp(max=P - 1)), reduce, scale)
    own = (torch.arange(top.shape[-1], device=q.device) < keep[:, None]).repeat_interleave(group, -1)
    padding = box.gather(1, entries[..., None]).squeeze(-1) == -math.inf  # an empty box: past the end
    inner = torch.where(own, inner, fill).masked_fill_(padding, -math.inf)
    scores = torch.full((R, L * group), fill, device=q.device)
    scores.scatter_(-1, entries, inner)
    scores = scores[:, :P]
    if fill != -math.inf:
        scores = scores.masked_fill(box[:, :P, 0] == -math.inf, -math.inf)
    return scores.view(B, H, P)


def reuse_scores(kept: torch.Tensor, P: int, fill: float = -math.inf) -> torch.Tensor:
    """`[B, H, P]` scores of a reused choice: 0 for the kept list entries (`kept`: `[B, H, K]`
    entry indices, -1 padded), `fill` elsewhere. The caller puts the forcing on top (sink and
    window pages that appeared since the choice are read too)."""
    B, H, _ = kept.shape
    out = torch.full((B, H, P + 1), fill, device=kept.device)
    out.scatter_(-1, torch.where(kept >= 0, kept, P), 0.0)  # -1 entries land in a spare column
    return out[..., :P]


# ---- pages always read -----------------------------------------------------------------------------
def forced_from_positions(slot_pos: torch.Tensor, pages: torch.Tensor, lengths: torch.Tensor,
                          sink: int, window: int) -> torch.Tensor:
    """`[B, H, P]` float32: `+inf` for pages holding one of the last `window` positions,
    `SINK_SCORE` for pages holding one of the first `sink`, 0 elsewhere, `-inf` for padding.

    From the positions the slots really hold (`slot_pos` `[N, S]`, -1 empty), so it stays right
    after eviction and for pages in any order; lengths `[B]`.
    """
    sp = slot_pos[pages.clamp(min=0)]  # [B, H, P, S] int32, -1 empty
    newest = sp.amax(-1)  # [B, H, P]
    oldest = torch.where(sp >= 0, sp, torch.iinfo(sp.dtype).max).amin(-1)
    recent = newest >= (lengths - window).view(-1, 1, 1)
    out = torch.where(oldest < sink, SINK_SCORE, 0.0)
    out = torch.where(recent, math.inf, out)
    return torch.where(pages >= 0, out, -math.inf)


def forced_from_lengths(lengths: torch.Tensor, P: int, S: int, sink: int, window: int) -> torch.Tensor:
    """`forced_from_positions` `[B, P]` for lists whose entry i holds positions `[i*S, (i+1)*S)`
    (nothing evicted, as serving engines keep them), from the lengths `[B]` alone."""
    idx = torch.arange(P, device=lengths.device)
    used = (lengths + S - 1) // S
    newest = torch.minimum((idx[None, :] + 1) * S, lengths[:, None]) - 1  # [B, P]
    out = torch.where((idx * S < sink)[None, :], SINK_SCORE, 0.0)
    out = torch.where(newest >= (lengths[:, None] - window), math.inf, out)
    return torch.where(idx[None, :] < used[:, None], out, -math.inf)


@functools.lru_cache(maxsize=64)
def forced_pages(seq_lens: tuple[int, ...], P: int, S: int, sink: int, window: int, device: str) -> torch.Tensor:
    """`[B, 1, P]` `forced_from_lengths` on `device`. Cached: every layer of a decode step asks
    for the same one (it is never written to)."""
    return forced_from_lengths(torch.tensor(seq_lens), P, S, sink, window)[:, None, :].to(device)


# ---- top-k -------------------------------------------------------------------------------------------
def top_pages(scores: torch.Tensor, pages: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` best-scoring pages of each row, in list order: `[B, H, min(k, P)]`, -1 padded."""
    k = min(k, pages.shape[-1])
    top = scores.topk(k, dim=-1, sorted=False).indices.sort(-1).values
    chosen = pages.gather(-1, top)
    return torch.where(scores.gather(-1, top) > -math.inf, chosen, -1)


def top_pages_per_row(scores: torch.Tensor, pages: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`top_pages` with a budget per row (`k`: `[B]`): `[B, H, max(k)]` (at most the P listed),
    each row's choice in list order, -1 padded at the end."""
    K = min(int(k.max()), pages.shape[-1])
    if bool((k == k[0]).all()):
        return top_pages(scores, pages, K)
    out = torch.full((*pages.shape[:2], K), -1, dtype=pages.dtype, device=pages.device)
    for budget in k.unique().tolist():
        rows = (k == budget).nonzero().squeeze(1)
        chosen = top_pages(scores[rows], pages[rows], budget)
        out[rows, :, : chosen.shape[-1]] = chosen
    return out


def is_listed(pages: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`[B, H, P]` bool: which entries of `pages` (`[B, H, P]`, -1 padded) appear in the same
    row of `kept` (`[B, H, K]`, -1 padded). A sorted search, not a `[P, K]` comparison."""
    ks = kept.sort(-1).values.contiguous()
    at = torch.searchsorted(ks, pages.contiguous()).clamp_(max=ks.shape[-1] - 1)
    return (ks.gather(-1, at) == pages) & (pages >= 0)
