"""Which (block, KV head) pages a decode step reads in vLLM: what the backend adds to
`kvkit.scoring` to run Quest and LServe on vLLM's blocks. Every scoring rule (Quest's bound,
LServe's two levels, reuse, forcing, top-k) is `kvkit.scoring`'s; this module keeps the per-page
tables, scores a block by its best sub-page, and decides LServe's refresh steps per request id.

Pages here are vLLM blocks seen per KV head (`block * Hkv + head`, see impl.py), each with the
signed boxes `[max | -min]` of its R sub-pages (`bounds`: `[NB * Hkv, R, 2D]`, empty = -inf, as
`kvkit.scoring` defines them). A block is scored by its best sub-page: an upper bound of q·k over
the block, tighter than the block's own box. This is LServe's hierarchy (arXiv:2502.14866: large
physical pages for the kernel, small logical pages for the statistics, a physical page scored by
its best logical page).

Shapes: B decode requests, H KV heads, G query heads per KV head, P listed pages (the longest
request's blocks), R sub-pages per block, D head_dim, K list entries scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvkit import scoring
from kvkit.policies.selectors.quest import LServeSelector

# ranked below every real page but still read: the virtual plan counts on reading exactly
# min(budget, listed) pages per row (LServeSelector reads fewer in the rare case its kept
# logical pages hold fewer than the budget)
FILL_SCORE = -torch.finfo(torch.float32).max


@dataclass
class SelectionPlan:
    """What the page choice needs that all layers of a step with one selector share."""

    vpages: torch.Tensor  # [B, H, P] virtual page ids (block * Hkv + head), -1 past the end
    forced: torch.Tensor  # [B, H, P] kvkit.scoring.forced_from_lengths
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


def empty_bounds(num_pages: int, R: int, D: int, dtype: torch.dtype) -> torch.Tensor:
    """`[num_pages, R, 2D]` signed boxes of unwritten sub-pages: all -inf."""
    return torch.full((num_pages, R, 2 * D), -math.inf, dtype=dtype)


def page_boxes(bounds: torch.Tensor) -> torch.Tensor:
    """`[N, 2D]` each page's whole box (the union of its sub-pages' boxes) from its sub-page
    boxes `[N, R, 2D]`: what the backend keeps up to date at KV write for LServe."""
    return bounds.amax(1)


def block_bound_scores(q: torch.Tensor, bounds: torch.Tensor, vpages: torch.Tensor) -> torch.Tensor:
    """`[B, H, G, P]` Quest's bound of each listed page: the best of its sub-pages' bounds
    (`kvkit.scoring.box_bound`, in the bounds' dtype: in bf16 a bound is rounded to 8 mantissa
    bits, so pages whose bounds agree that closely may swap places), -inf at -1 entries and for
    sub-pages not written yet."""
    B, H, P = vpages.shape
    rows = gather_rows(bounds, vpages)  # [B, H, P, R, 2D]
    R = rows.shape[3]
    bound = scoring.box_bound(scoring.signed_query(q, B * H), rows.view(B * H, P * R, -1))  # [B*H, G, P*R]
    bound = bound.view(B, H, -1, P, R).amax(-1)  # [B, H, G, P]
    return bound.masked_fill((vpages < 0)[:, :, None, :], -math.inf)


def lserve_block_scores(q: torch.Tensor, bounds: torch.Tensor, boxes: torch.Tensor, vpages: torch.Tensor,
                        budget_pages: torch.Tensor, sel: LServeSelector) -> torch.Tensor:
    """`[B, H, P]` LServe's two-level scores (`kvkit.scoring.lserve_scores`) on vLLM's blocks:
    logical pages from the blocks' whole `boxes` (`page_boxes(bounds)`, `[N, 2D]`), the blocks of
    the kept logical pages scored by their best sub-page (`block_bound_scores`), the others
    `FILL_SCORE`, padding -inf. budget_pages: `[B]`.

    Only the kept logical pages' sub-page bounds are gathered and scored (coarse x the budget of
    the listed blocks): the rest of the list costs one box per block, 1/R of its bounds."""
    B, H, P = vpages.shape
    listed = gather_rows(boxes, vpages)  # [B, H, P, 2D], a copy of its own
    padding = (vpages < 0).view(-1).nonzero().squeeze(1)
    if padding.numel():  # an empty box, whatever page 0 holds; only those rows are written,
        listed.view(-1, listed.shape[-1]).index_fill_(0, padding, -math.inf)  # not a masked_fill of it all
    rows = vpages.reshape(B * H, P)

    def fine(entries: torch.Tensor) -> torch.Tensor:  # [B*H, K] list entries -> [B*H, G, K]
        picked = rows.gather(1, entries).view(B, H, -1)  # [B, H, K] pages
        return block_bound_scores(q, bounds, picked).flatten(0, 1)
    return scoring.lserve_scores(q, listed, budget_pages, sel.group, sel.coarse, sel.reduce,
                                 fill=FILL_SCORE, fine=fine)


def stack_padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """`[n, H, width]` from n choices `[H, K_i]` (list entries or pages), each -1 padded at the
    end: requests with budgets of their own choose different numbers of pages."""
    if any(r.shape[-1] != width for r in rows):
        rows = [torch.nn.functional.pad(r, (0, width - r.shape[-1]), value=-1) for r in rows]
    return torch.stack(rows)


def choose_afresh(chosen_at: dict[str, int], req_ids: list[str], lengths: list[int], fits: list[bool],
                  reuse_steps: int) -> list[bool]:
    """Per row, whether LServe chooses its pages afresh this step: when its request has no kept
    choice, or made it `reuse_steps` or more tokens ago (or at a length above today's: a request
    that was preempted and recomputed), as `LServeSelector` decides; and, when any row's choice
    is that old, every row whose choice is a step old or more. The batch then chooses together
    (one scoring call per layer every `reuse_steps` steps, not a few rows on most steps, which
    costs more: a scoring call's fixed cost is paid on every step) and no choice serves more than `reuse_steps` steps.

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
