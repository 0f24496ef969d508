"""Which (block, KV head) pages a decode step reads in vLLM: Quest's bound per block, LServe's
two-level choice and its reuse across steps. Plain tensor functions; the backend calls them.

Pages here are vLLM blocks seen per KV head (`block * Hkv + head`, see backend.py), each with
the key max/min of its R sub-pages (`bounds`: `[NB * Hkv, R, 2, D]`, max at `[..., 0, :]`, min at
`[..., 1, :]`). A block is scored by its best sub-page: an upper bound of q·k over the block,
tighter than the block's own box. This is LServe's hierarchy (arXiv:2502.14866: large physical
pages for the kernel, small logical pages for the statistics, a physical page scored by its
best logical page).

Shapes: B decode requests, H KV heads, G query heads per KV head, P listed pages (the longest
request's blocks), R sub-pages per block, D head_dim, L = ceil(P / group) logical pages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvkit.policies.selectors.quest import LServeSelector, reduce_group, top_pages

# ranked below every real page but still read: the virtual plan counts on reading exactly
# min(budget, listed) pages per row (LServeSelector reads fewer in the rare case its kept
# logical pages hold fewer than the budget)
FILL_SCORE = -torch.finfo(torch.float32).max


@dataclass
class SelectionPlan:
    """What the page choice needs that all layers of a step with one selector share."""

    vpages: torch.Tensor  # [B, H, P] virtual page ids (block * Hkv + head), -1 past the end
    forced: torch.Tensor  # [B, H, P] quest.forced_from_lengths
    all_fit: bool = False  # every row's pages fit its budget: read them all, score nothing
    # LServe: per row, whether this step chooses afresh (True) or reuses the kept choice, and the
    # rows' request ids (None: no ids known, every step chooses afresh)
    refresh: list[bool] | None = None
    req_ids: list[str] | None = None
    # per row: it reuses a choice made at its current page count, with the choice's sink and
    # window pages still all it forces, so it reads the kept pages exactly as they were chosen
    as_kept: list[bool] | None = None
    live: set[str] = field(default_factory=set)  # requests whose kept choice is still tracked


def gather_rows(bounds: torch.Tensor, vpages: torch.Tensor) -> torch.Tensor:
    """`[B, H, P, ...]` the listed pages' rows of a per-page table `[N, ...]` (sub-page bounds,
    boxes; page 0's at -1 entries)."""
    B, H, P = vpages.shape
    rows = bounds.view(bounds.shape[0], -1).index_select(0, vpages.clamp(min=0).reshape(-1))
    return rows.view(B, H, P, *bounds.shape[1:])


def box_bounds(q: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """`[B, H, N, G]` Quest bound of q against N boxes `[B, H, N, 2, D]` (max, min).

    `sum_c max(q_c*lo_c, q_c*hi_c) = relu(q)·hi + min(q, 0)·lo` is one matmul of the boxes with
    `[relu(q), min(q, 0)]`, in the boxes' dtype: in bf16 (AMX) a bound is rounded to 8 mantissa
    bits, so boxes whose bounds agree that closely may swap places; it costs half of the float32
    path's time, which spent most of it converting and transposing the gathered rows. Empty
    boxes (max -inf, min +inf: 0 * inf) are -inf."""
    B, H, N, _, D = boxes.shape
    qg = q.view(B, H, -1, D)
    qq = torch.cat([qg.clamp(min=0), qg.clamp(max=0)], -1).to(boxes.dtype)  # [B, H, G, 2D]
    bound = (boxes.reshape(B, H, N, 2 * D) @ qq.transpose(-1, -2)).float()
    return torch.where(bound.isnan(), -math.inf, bound)


def block_bound_scores(q: torch.Tensor, bounds: torch.Tensor, vpages: torch.Tensor) -> torch.Tensor:
    """`[B, H, G, P]` Quest bound of each listed page: the best of its sub-pages' bounds, -inf at
    -1 pages and for sub-pages not written yet."""
    B, H, P = vpages.shape
    rows = gather_rows(bounds, vpages)  # [B, H, P, R, 2, D]
    R = rows.shape[3]
    bound = box_bounds(q, rows.view(B, H, P * R, 2, -1))  # [B, H, P * R, G]
    bound = bound.view(B, H, P, R, -1).amax(3).transpose(-1, -2)  # [B, H, G, P]
    return bound.masked_fill((vpages < 0)[:, :, None, :], -math.inf)


def empty_bounds(num_pages: int, R: int, D: int, dtype: torch.dtype) -> torch.Tensor:
    """`[num_pages, R, 2, D]` bounds of unwritten sub-pages: max -inf, min +inf."""
    return torch.tensor([-math.inf, math.inf], dtype=dtype)[:, None].repeat(num_pages, R, 1, D)


def top_pages_per_row(scores: torch.Tensor, pages: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`top_pages` with a budget per row (`k`: `[B]`): `[B, H, max(k)]` (at most the P listed),
    each row's choice in list order, -1 padded at the end."""
    K = min(int(k.max()), pages.shape[-1])
    if bool((k == k[0]).all()):
        return top_pages(scores, pages, K)
    out = torch.full((*pages.shape[:2], K), -1, dtype=pages.dtype)
    for budget in k.unique().tolist():
        rows = (k == budget).nonzero().squeeze(1)
        chosen = top_pages(scores[rows], pages[rows], budget)
        out[rows, :, : chosen.shape[-1]] = chosen
    return out


def stack_padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """`[n, H, width]` from n choices `[H, K_i]` (list entries or pages), each -1 padded at the
    end: requests with budgets of their own choose different numbers of pages."""
    if any(r.shape[-1] != width for r in rows):
        rows = [torch.nn.functional.pad(r, (0, width - r.shape[-1]), value=-1) for r in rows]
    return torch.stack(rows)


def page_boxes(bounds: torch.Tensor) -> torch.Tensor:
    """`[N, 2, D]` each page's whole box (max over its sub-pages' max, min over their min) from
    its sub-page bounds `[N, R, 2, D]`: what the backend keeps up to date at KV write."""
    return torch.stack([bounds[:, :, 0].amax(1), bounds[:, :, 1].amin(1)], 1)


def lserve_scores(q: torch.Tensor, bounds: torch.Tensor, boxes: torch.Tensor, vpages: torch.Tensor,
                  budget_pages: torch.Tensor, sel: LServeSelector, scale: float) -> torch.Tensor:
    """`[B, H, P]` LServe's two-level page scores (`LServeSelector._two_level_scores` on vLLM's
    blocks): `group` consecutive listed blocks form a logical page whose box is the max/min over
    their `boxes` (`page_boxes(bounds)`); per row the best `ceil(coarse * budget / group)`
    logical pages by the group-reduced bound are kept, and the blocks inside them score by their
    own (best sub-page) bound. Blocks outside score `FILL_SCORE`, padding -inf. budget_pages: `[B]`.

    Only the kept logical pages' sub-page bounds are gathered and scored (coarse x the budget of
    the listed blocks): the rest of the list costs one box per block, 1/R of its bounds.

    A -1 entry gathers page 0's bounds: vLLM's null block, never written, so empty (max -inf,
    min +inf) and no part of any box. (Were it written, only the box of a row's last logical
    page would widen: the choice, never what a chosen page reads.)"""
    B, H, P = vpages.shape
    group = sel.group
    L = -(-P // group)
    padded = torch.nn.functional.pad(vpages, (0, L * group - P), value=-1)  # [B, H, L * group]
    D = boxes.shape[-1]
    per_logical = gather_rows(boxes, padded).view(B, H, L, group, 2, D)
    logical = torch.stack([per_logical[..., 0, :].amax(3), per_logical[..., 1, :].amin(3)], 3)  # [B, H, L, 2, D]
    coarse = reduce_group(box_bounds(q, logical).transpose(-1, -2), sel.reduce, scale)  # [B, H, L]
    coarse = coarse.masked_fill(padded.view(B, H, L, group)[..., 0] < 0, -math.inf)  # past a row's end
    keep = (-(-sel.coarse * budget_pages // group)).clamp(max=L)  # [B] logical pages per row
    top = coarse.topk(int(keep.max()), -1).indices  # [B, H, K] best first, as LServeSelector
    entries = (top[..., None] * group + torch.arange(group)).flatten(-2)  # [B, H, K * group] list entries
    fine = reduce_group(block_bound_scores(q, bounds, padded.gather(-1, entries)), sel.reduce, scale)
    kept = (torch.arange(top.shape[-1]) < keep[:, None, None]).repeat_interleave(group, -1)  # a row's own K
    scores = torch.full((B, H, L * group), FILL_SCORE)
    scores.scatter_(-1, entries, torch.where(kept, fine, FILL_SCORE))
    return scores[..., :P].masked_fill(vpages < 0, -math.inf)


def reuse_scores(kept: torch.Tensor, P: int) -> torch.Tensor:
    """`[B, H, P]` scores of a reused choice: 0 for the kept list entries (`kept`: `[B, H, K]`,
    -1 padded), `FILL_SCORE` elsewhere; the caller puts the sink/window forcing on top, as
    `LServeSelector` does between refreshes."""
    B, H, _ = kept.shape
    out = torch.full((B, H, P + 1), FILL_SCORE)
    out.scatter_(-1, torch.where(kept >= 0, kept, P), 0.0)  # -1 entries land in a spare column
    return out[..., :P]


def choose_afresh(chosen_at: dict[str, int], req_ids: list[str], lengths: list[int], fits: list[bool],
                  reuse_steps: int) -> list[bool]:
    """Per row, whether LServe chooses its pages afresh this step: when its request has no kept
    choice, or made it `reuse_steps` or more tokens ago (or at a length above today's: a request
    that was preempted and recomputed), as `LServeSelector` decides; and, when any row's choice
    is that old, every row whose choice is a step old or more. The batch then chooses together
    (one scoring call per layer every `reuse_steps` steps, not a few rows on most steps, which
    costs ~2x on this CPU) and no choice serves more than `reuse_steps` steps.

    A row whose pages all fit its budget (`fits`) reads them all and keeps nothing. Updates
    `chosen_at` (request id -> length at its last choice) and forgets requests that left the
    batch once it holds many (one that comes back chooses afresh)."""
    ages = [None if whole or (at := chosen_at.get(rid)) is None else n - at
            for rid, n, whole in zip(req_ids, lengths, fits)]
    due = any(a is not None and not 0 <= a < reuse_steps for a in ages)
    refresh = []
    for rid, n, whole, age in zip(req_ids, lengths, fits, ages):
        fresh = age is not None and 0 <= age < reuse_steps and not (due and age >= 1)
        if whole:
            chosen_at.pop(rid, None)
        elif not fresh:
            chosen_at[rid] = n
        refresh.append(not fresh)
    if len(chosen_at) > 4 * len(req_ids) + 64:
        batch = set(req_ids)
        for rid in [r for r in chosen_at if r not in batch]:
            del chosen_at[rid]
    return refresh
