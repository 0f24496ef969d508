"""Query-aware page selection: Quest (arXiv:2406.10774) and LServe's two-level variant
(arXiv:2502.14866).

Every page keeps the per-channel min and max of its keys (`PagedKVStore(key_bounds=True)`,
updated on append). At a decode step each page gets an upper bound of q·k over its keys,
`sum_c max(q_c * kmin_c, q_c * kmax_c)`, and each KV head reads its best pages within a token
budget; the pages holding the attention sinks and the recent window are always read.

Shapes: B sequences, Hq/Hkv query/KV heads (here Hh: the KV heads a selector serves),
G = Hq // Hkv, P pages in a list, S page_size, D head_dim, K pages kept.

What makes it work on a small GQA model (SmolLM2-135M, 9:3 heads, 30 layers): see
`QuestSelector` and `bench/results/selection_quality.md`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from kvkit.policies.base import Policy, Rule, Selector, component
from kvkit.policies.registry import register
from kvkit.policies.selectors.full import FullSelector
from kvkit.store import PagedKVStore, Selection

REDUCES = ("max", "sum", "mean", "softmax")
_SINK_SCORE = torch.finfo(torch.float32).max  # forced in, ranked after the recent window (+inf)


# ---- the pieces, shared by the selectors, the fast decode path and the benchmark -------------
def gather_bounds(key_min: torch.Tensor, key_max: torch.Tensor,
                  pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The min and max keys of the listed pages: `[*pages.shape, D]` float32 each (junk at -1 padding).
    One `index_select` per tensor: advanced indexing (`key_min[pages]`) is several times slower."""
    idx = pages.clamp(min=0).reshape(-1)
    shape = (*pages.shape, key_min.shape[1])
    return (key_min.index_select(0, idx).view(shape).float(),  # float32 for the bound (a no-op if already)
            key_max.index_select(0, idx).view(shape).float())


def bound_from(qg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """`sum_c max(q_c*lo_c, q_c*hi_c) = relu(q)·hi + min(q, 0)·lo`: two small matmuls instead of
    an elementwise max over `[.., P, D]`. qg: `[B, Hh, G, D]`; lo, hi: `[B, Hh, P, D]` -> `[B, Hh, G, P]`."""
    return qg.clamp(min=0) @ hi.transpose(-1, -2) + qg.clamp(max=0) @ lo.transpose(-1, -2)


def page_bounds(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor,
                pages: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of q·k for every listed page and every query head.

    q: `[B, Hq, D]`; key_min, key_max: `[N, D]`; pages: `[B, Hh, P]` (-1 padded, Hq % Hh == 0).
    Returns `[B, Hh, G, P]` float32, -inf at padding (so it takes no part in any group reduce,
    softmax included, in a ragged batch).
    """
    B, Hq, D = q.shape
    Hh = pages.shape[1]
    lo, hi = gather_bounds(key_min, key_max, pages)  # [B, Hh, P, D]
    bound = bound_from(q.float().view(B, Hh, Hq // Hh, D), lo, hi)
    return bound.masked_fill((pages < 0)[:, :, None, :], -math.inf)


def reduce_group(bound: torch.Tensor, reduce: str, scale: float) -> torch.Tensor:
    """Aggregate `[B, Hh, G, P]` bounds over the G query heads of a KV head -> `[B, Hh, P]`.

    max: the group's best head decides (a page any head needs is kept). sum/mean: rank the
    same (mean = sum / G). softmax: sum over heads of each head's softmax over pages of
    `scale * bound`, i.e. the attention mass each head would put on the page if the bound were
    tight, so one head with a sharp peak is not outvoted by flat heads' large raw bounds.
    """
    if reduce == "max":
        return bound.amax(2)
    if reduce == "sum":
        return bound.sum(2)
    if reduce == "mean":
        return bound.mean(2)
    finite = torch.where(torch.isfinite(bound), bound, -math.inf)
    return torch.softmax(finite * scale, dim=-1).nan_to_num(0.0).sum(2)


def forced_scores(store: PagedKVStore, seqs: Sequence[int], layer: int, pages: torch.Tensor,
                  sink: int, window: int) -> torch.Tensor:
    """`[B, Hh, P]` float32: +inf for pages holding a recent-window position, float32 max for
    pages holding a sink position, 0 elsewhere, -inf for padding (-1).

    Uses the positions the slots really hold, so it stays right after eviction and for
    pages in any order.
    """
    lengths = torch.tensor([store.length(s, layer) for s in seqs], device=pages.device)
    return forced_from_positions(store.slot_positions(layer), pages, lengths, sink, window)


def forced_from_positions(slot_pos: torch.Tensor, pages: torch.Tensor, lengths: torch.Tensor,
                          sink: int, window: int) -> torch.Tensor:
    """`forced_scores` from the pool's slot positions `[N, S]` and the lengths `[B]`."""
    sp = slot_pos[pages.clamp(min=0)]  # [B, Hh, P, S] int32, -1 empty
    newest = sp.amax(-1)  # [B, Hh, P]
    oldest = torch.where(sp >= 0, sp, torch.iinfo(sp.dtype).max).amin(-1)
    recent = newest >= (lengths - window).view(-1, 1, 1)
    out = torch.where(oldest < sink, _SINK_SCORE, 0.0)
    out = torch.where(recent, math.inf, out)
    return torch.where(pages >= 0, out, -math.inf)


def forced_from_lengths(lengths: torch.Tensor, P: int, S: int, sink: int, window: int) -> torch.Tensor:
    """`forced_scores` `[B, P]` for lists whose entry i holds positions `[i*S, (i+1)*S)` (pages
    never evicted, as serving engines keep them), from the lengths `[B]` alone."""
    idx = torch.arange(P, device=lengths.device)
    used = (lengths + S - 1) // S
    newest = torch.minimum((idx[None, :] + 1) * S, lengths[:, None]) - 1  # [B, P]
    out = torch.where((idx * S < sink)[None, :], _SINK_SCORE, 0.0)
    out = torch.where(newest >= (lengths[:, None] - window), math.inf, out)
    return torch.where(idx[None, :] < used[:, None], out, -math.inf)


@functools.lru_cache(maxsize=64)
def forced_pages(seq_lens: tuple[int, ...], P: int, S: int, sink: int, window: int, device: str) -> torch.Tensor:
    """`[B, 1, P]` `forced_from_lengths` on `device`. Cached: every layer of a decode step asks
    for the same one (it is never written to)."""
    return forced_from_lengths(torch.tensor(seq_lens), P, S, sink, window)[:, None, :].to(device)


def signed_boxes(key_min: torch.Tensor, key_max: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """The listed pages' key boxes as float32 `[n, 2D]` rows `[max | -min]`.

    Both halves are maxima, so the box of a union of pages is one `amax`, and with
    `signed_query` Quest's bound is one matmul: sum_c max(q_c*lo_c, q_c*hi_c) =
    relu(q)·hi + relu(-q)·(-lo). float32 because bf16 matmuls this small cost a fixed ~40 µs
    each on this CPU, more than the widening (exact) and a float32 matmul together.
    """
    return torch.cat([key_max.index_select(0, entries), key_min.index_select(0, entries).neg_()], -1).float()


def signed_query(q: torch.Tensor, rows: int) -> torch.Tensor:
    """`[B, Hq, D]` -> float32 `[rows, G, 2D]` `[relu(q) | relu(-q)]`, rows = B * Hkv."""
    qf = q.reshape(rows, -1, q.shape[-1]).float()
    return torch.cat([qf.clamp(min=0), qf.clamp(max=0).neg_()], -1)


def quest_scores_fast(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, page_table: torch.Tensor,
                      seq_lens: list[int], page_size: int, sink: int, window: int) -> torch.Tensor:
    """`quest_scores(reduce="max")` `[B, Hkv, P]` in a few fused ops, for lists never evicted
    (`PagedKVStore.nothing_evicted`): sinks, window and padding follow from `seq_lens` (on the
    host, as serving engines keep them) instead of per-slot positions. Unscaled: a positive
    scale keeps the ranking. Chooses the pages `quest_scores` chooses (tested)."""
    B, Hkv, P = page_table.shape
    flat = page_table.reshape(-1)
    if any(-(-n // page_size) < P for n in seq_lens):  # padded lists: -1 entries
        flat = flat.clamp(min=0)
    box = signed_boxes(key_min, key_max, flat).view(B * Hkv, P, -1)
    score = torch.bmm(signed_query(q, B * Hkv), box.transpose(1, 2)).amax(1).view(B, Hkv, P)
    return score + forced_pages(tuple(seq_lens), P, page_size, sink, window, str(q.device))


def lserve_select_fast(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, page_table: torch.Tensor,
                       seq_lens: list[int], page_size: int, budget_pages: int, group: int = 4, coarse: int = 2,
                       sink: int = 4, window: int = 32) -> torch.Tensor:
    """LServe's two-level page selection (reduce="max") in one lean pass, for lists never
    evicted (`PagedKVStore.nothing_evicted`: entry j holds positions j*S .. j*S+S-1).

    Logical pages of `group` list entries are scored by the bound of their merged min/max box;
    the best `coarse * budget_pages / group` are kept, and inside them the entries with the best
    own bounds are read; sink and window pages always. q: `[B, Hq, D]`; key_min, key_max:
    `[N, D]`; page_table: `[B, Hkv, P]` (row b valid for its first ceil(seq_lens[b] / S)
    entries). Returns the chosen pages `[B, Hkv, K]` in list order, -1 padded: what
    `LServeSelector` chooses from per-slot positions (tested; both score in float32).
    """
    B, Hq, D = q.shape
    Hkv, P = page_table.shape[1], page_table.shape[2]
    L = -(-P // group)
    pad = L * group - P
    flat = page_table.reshape(-1)
    padded = any(-(-n // page_size) < P for n in seq_lens)
    if padded:
        flat = flat.clamp(min=0)
    box = signed_boxes(key_min, key_max, flat).view(B, Hkv, P, 2 * D)
    forced = forced_pages(tuple(seq_lens), P, page_size, sink, window, str(q.device))  # [B, 1, P]
    if padded:  # keep -1 entries out of the logical boxes
        box = box.masked_fill((forced == -math.inf)[..., None], -math.inf)
    box = box.view(B * Hkv, P, 2 * D)
    qs = signed_query(q, B * Hkv)
    box_l = (F.pad(box, (0, 0, 0, pad), value=-math.inf) if pad else box).view(B * Hkv, L, group, 2 * D).amax(2)
    upper = torch.bmm(qs, box_l.transpose(1, 2)).amax(1).view(B, Hkv, L)
    if padded:  # a logical page past the end has an empty box: 0 * -inf
        upper = upper.nan_to_num_(-math.inf)
    keep_l = min(L, -(-coarse * budget_pages // group))
    outside = torch.full((B, Hkv, L, 1), -math.inf, device=q.device)
    outside.scatter_(2, upper.topk(keep_l, dim=-1).indices[..., None], 0.0)
    fine = torch.bmm(qs, box.transpose(1, 2)).amax(1).view(B, Hkv, P)
    fine = (F.pad(fine, (0, pad)) if pad else fine).view(B, Hkv, L, group).add_(outside).view(B, Hkv, L * group)
    score = torch.where(forced != 0, forced, fine[..., :P])
    return top_pages(score, page_table, budget_pages)


def quest_scores(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, pages: torch.Tensor,
                 slot_pos: torch.Tensor, lengths: torch.Tensor, sink: int, window: int,
                 reduce: str = "max") -> torch.Tensor:
    """Quest's page scores `[B, Hh, P]` from plain tensors (what `QuestSelector` computes):
    the group-reduced bound, +inf / float32 max for window / sink pages, -inf for padding."""
    bound = reduce_group(page_bounds(q, key_min, key_max, pages), reduce, q.shape[-1] ** -0.5)
    forced = forced_from_positions(slot_pos, pages, lengths, sink, window)
    return torch.where(forced != 0, forced, bound)


def top_pages(scores: torch.Tensor, pages: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` best-scoring pages of each row, in list order: `[B, Hh, min(k, P)]`, -1 padded."""
    k = min(k, pages.shape[-1])
    top = scores.topk(k, dim=-1, sorted=False).indices.sort(-1).values
    chosen = pages.gather(-1, top)
    return torch.where(scores.gather(-1, top) > -math.inf, chosen, -1)


def is_listed(pages: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`[B, Hh, P]` bool: which entries of `pages` (`[B, Hh, P]`, -1 padded) appear in the same
    row of `kept` (`[B, Hh, K]`, -1 padded). A sorted search, not a `[P, K]` comparison."""
    ks = kept.sort(-1).values.contiguous()
    at = torch.searchsorted(ks, pages.contiguous()).clamp_(max=ks.shape[-1] - 1)
    return (ks.gather(-1, at) == pages) & (pages >= 0)


def _check_common(cls: str, budget: int, sink: int, window: int, reduce: str) -> None:
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"{cls}.budget must be an int >= 1 token per KV head, got {budget!r}")
    if not isinstance(sink, int) or sink < 0:
        raise ValueError(f"{cls}.sink must be an int >= 0 tokens, got {sink!r}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"{cls}.window must be an int >= 1 token, got {window!r}")
    if sink + window > budget:
        raise ValueError(f"{cls}: sink + window = {sink + window} tokens exceed the budget of {budget}; "
                         "raise the budget or shrink the window")
    if reduce not in REDUCES:
        raise ValueError(f"{cls}.reduce must be one of {REDUCES}, got {reduce!r}")


# ---- Quest ---------------------------------------------------------------------------------
@component("selector", "quest")
@dataclass(frozen=True)
class QuestSelector(Selector):
    """Read the pages whose key min/max bound q·k highest. Quest, arXiv:2406.10774.

    Per KV head: the pages holding the first `sink` positions and the last `window` positions
    are always read; the rest of the budget (`budget // page_size` pages in all, so never more
    than `budget` tokens, at least one page) goes to the best pages by the bound, aggregated over
    the G query heads of the group (`reduce`), so the heads of a group share the pages they
    read. When a head holds no more pages than the budget, it reads them all (equals dense).
    Memory: a min and a max key per page, 2/page_size of the key bytes (in the store's dtype), counted in
    `store.nbytes()`.

    What works on SmolLM2-135M (GQA 9:3, 30 layers), passkey, greedy
    (`bench/selection_quality.py`, results in bench/results/selection_quality*.md):
    - the page size matters most. Over 12 depths at 2.4K and 4.8K, with 16-token pages Quest
      keeps 8-11/12 at budgets 1/8 and 1/4 (reduce max 8-11, sum 9-11, softmax 10-12); with
      8-token pages it keeps 12/12 in every one of those cells, so `quest()` asks for 8-token
      pages (`Policy.page_size`). A smaller page gives a tighter bound: a 16-token page around
      the needle also holds filler whose keys widen the box (one sample tried on 32-token pages
      came back wrong with every reduce). The cost: twice as many bounds to score and store (a
      min and a max per page and channel: 25% of the key bytes at 8 tokens).
    - the budget split: the window comes out of the same budget, so a long one starves the
      retrieved pages. At 2.4K and 1/16 (150 tokens, 16-token pages): window 32: 3/6, window
      96: 1/6, window 64 + sum + no dense layers (a "plain" Quest): 2/6.
    - at 1/16 the GQA reduce and the dense first layers do not rescue flat Quest on 16-token
      pages (max 3/6, sum 3/6, softmax 4/6, 0 / 2 / 4 dense layers 3/6 each), but LServe's
      two-level selection with reuse (`LServeSelector`) and TidalDecode keep 6/6 there.
    - `reduce="max"` is the default: it keeps Quest's per-head guarantee (a page any query
      head of the group bounds high stays in); with 8-token pages the reduces tie.

    Limits: the bound is an upper bound, not the score; heads whose keys spread widely over a
    channel get loose bounds everywhere. The score is computed over every page each step (no
    reuse: see `LServeSelector`).

    With reduce="max" on lists nothing was evicted from (`PagedKVStore.nothing_evicted`, the
    usual case), the scores come from `quest_scores_fast`: the same choice from fewer ops.
    """

    budget: int = 1024   # tokens read per KV head per step, sink and window included
    sink: int = 4        # first positions always read
    window: int = 32     # last positions always read
    reduce: str = "max"  # aggregation of the bound over a GQA group: max | sum | mean | softmax

    needs_key_bounds = True

    def __post_init__(self) -> None:
        _check_common("QuestSelector", self.budget, self.sink, self.window, self.reduce)

    def scores(self, store: PagedKVStore, seqs: Sequence[int], layer: int, q: torch.Tensor,
               pages: torch.Tensor) -> torch.Tensor:
        """`[B, Hh, P]` page scores: forced pages +inf / float32 max, padding -inf."""
        key_min, key_max = store.key_bounds(layer)
        lengths = torch.tensor([store.length(s, layer) for s in seqs], device=pages.device)
        return quest_scores(q, key_min, key_max, pages, store.slot_positions(layer), lengths,
                            self.sink, self.window, self.reduce)

    def select(self, store: PagedKVStore, seqs: Sequence[int], layer: int, q: torch.Tensor,
               heads: Sequence[int]) -> Selection:
        pages = store.page_tables(seqs, layer, heads)  # [B, Hh, P]
        budget_pages = max(1, self.budget // store.page_size)
        if pages.shape[-1] <= budget_pages:
            return Selection(pages)
        if self.reduce == "max" and store.nothing_evicted(seqs, layer, heads):  # the same choice, fewer ops
            key_min, key_max = store.key_bounds(layer)
            lengths = [store.length(s, layer) for s in seqs]
            scores = quest_scores_fast(q, key_min, key_max, pages, lengths, store.page_size, self.sink, self.window)
        else:
            scores = self.scores(store, seqs, layer, q, pages)
        return Selection(top_pages(scores, pages, budget_pages))


# ---- LServe --------------------------------------------------------------------------------
@component("selector", "lserve")
@dataclass(frozen=True)
class LServeSelector(Selector):
    """Two-level page selection reused across decode steps. LServe, arXiv:2502.14866.

    Level 1: `group` consecutive pages of a head's list form a logical page whose key bounds
    are the min/max over its pages; the best logical pages by the Quest bound are kept, enough
    to cover `coarse` times the budget. Level 2: the physical pages inside them are scored and
    the best fit the budget (sink and window pages always in). The chosen pages are kept in
    `store.policy_state(seq)` and reused for `reuse_steps` decode steps (LServe's reusable page
    selector): between refreshes no page is scored, only the sink/window pages are updated (a
    page that filled up since is added) and pages freed since are dropped.

    LServe's own hierarchy runs the other way (large physical pages for the kernel, small
    logical pages for the statistics, a physical page scored by its best logical page); kvkit's
    pages are already small, so the hierarchy here is coarse-to-fine over them, which is what
    saves scoring work at long context. Limits: a needle that becomes relevant between
    refreshes is seen only at the next refresh.

    Measured (SmolLM2-135M passkey, 16-token pages): 12/12 at 2.3K, 4.6K and 7.2K tokens for
    budgets 1/8 and 1/4 (bench/results/selection_quality.md), and 6/6 at 2.4K with 1/16 (150
    tokens) where flat Quest on 16-token pages keeps 3/6. The reuse is what helps there: the
    selection made at the first decoded token, whose query points at the needle, serves the
    next digits (ablation in bench/results/selection_quality_page16.md). The price of reuse is
    perplexity at small budgets: +16% at 1/8 on GPL-3 (quest: +3%; quality_read_codec_budgets.md).

    With reduce="max" on lists nothing was evicted from (`PagedKVStore.nothing_evicted`), a
    fresh choice runs `lserve_select_fast` and sinks/window follow from the lengths: the same
    pages from fewer ops.
    """

    budget: int = 1024
    sink: int = 4
    window: int = 32
    reduce: str = "max"
    group: int = 4         # physical pages per logical page
    coarse: int = 2        # level 1 keeps logical pages covering coarse x budget tokens
    reuse_steps: int = 4   # a selection serves this many decode steps (1: every step)

    needs_key_bounds = True

    def __post_init__(self) -> None:
        _check_common("LServeSelector", self.budget, self.sink, self.window, self.reduce)
        for name in ("group", "coarse", "reuse_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LServeSelector.{name} must be an int >= 1, got {value!r}")

    def _key(self, layer: int, heads: Sequence[int]) -> tuple:
        return ("lserve", layer, tuple(heads))

    def select(self, store: PagedKVStore, seqs: Sequence[int], layer: int, q: torch.Tensor,
               heads: Sequence[int]) -> Selection:
        pages = store.page_tables(seqs, layer, heads)  # [B, Hh, P]
        budget_pages = max(1, self.budget // store.page_size)
        if pages.shape[-1] <= budget_pages:
            return Selection(pages)
        key = self._key(layer, heads)
        states = [store.policy_state(s).get(key) for s in seqs]
        lengths = [store.length(s, layer) for s in seqs]
        fresh = all(st is not None and 0 <= n - st[0] < self.reuse_steps and st[1].shape[0] == len(heads)
                    for st, n in zip(states, lengths))
        # lists never evicted: sinks and window follow from the lengths, and the choice takes the
        # lean path (the same pages, fewer ops)
        lean = self.reduce == "max" and store.nothing_evicted(seqs, layer, heads)
        if lean:
            forced = forced_pages(tuple(lengths), pages.shape[-1], store.page_size, self.sink, self.window,
                                  str(pages.device))  # [B, 1, P]
        else:
            forced = forced_scores(store, seqs, layer, pages, self.sink, self.window)
        if fresh:  # reuse: the kept pages that are still listed, plus sink and window pages
            kept = torch.nn.utils.rnn.pad_sequence([st[1].T for st in states], padding_value=-1)
            listed = is_listed(pages, kept.permute(1, 2, 0))  # [B, Hh, P]
            scores = torch.where(forced != 0, forced, torch.where(listed, 0.0, -math.inf))
            return Selection(top_pages(scores, pages, budget_pages))
        if lean:
            key_min, key_max = store.key_bounds(layer)
            chosen = lserve_select_fast(q, key_min, key_max, pages, lengths, store.page_size, budget_pages,
                                        self.group, self.coarse, self.sink, self.window)
        else:
            scores = self._two_level_scores(store, layer, q, pages, budget_pages)
            chosen = top_pages(torch.where(forced != 0, forced, scores), pages, budget_pages)  # [B, Hh, K]
        for b, (s, n) in enumerate(zip(seqs, lengths)):
            store.policy_state(s)[key] = (n, chosen[b])
        return Selection(chosen)

    def _two_level_scores(self, store: PagedKVStore, layer: int, q: torch.Tensor,
                          pages: torch.Tensor, budget_pages: int) -> torch.Tensor:
        """`[B, Hh, P]`: the bound of each physical page inside the kept logical pages, -inf elsewhere."""
        B, Hh, P = pages.shape
        key_min, key_max = store.key_bounds(layer)
        scale = q.shape[-1] ** -0.5
        L = -(-P // self.group)
        lo, hi = gather_bounds(key_min, key_max, pages)  # [B, Hh, P, D], gathered once for both levels
        real = pages >= 0
        if not bool(real.all()):
            lo = torch.where(real[..., None], lo, math.inf)
            hi = torch.where(real[..., None], hi, -math.inf)
        pad = L * self.group - P
        lo_l = F.pad(lo, (0, 0, 0, pad), value=math.inf).view(B, Hh, L, self.group, -1).amin(-2)  # [B, Hh, L, D]
        hi_l = F.pad(hi, (0, 0, 0, pad), value=-math.inf).view(B, Hh, L, self.group, -1).amax(-2)
        qg = q.float().view(B, Hh, q.shape[1] // Hh, -1)
        coarse = reduce_group(bound_from(qg, lo_l, hi_l), self.reduce, scale)  # [B, Hh, L]
        first = F.pad(pages, (0, pad), value=-1).view(B, Hh, L, self.group)[..., 0]
        coarse = torch.where(first >= 0, coarse.nan_to_num(-math.inf), -math.inf)
        keep_l = min(L, -(-self.coarse * budget_pages // self.group))
        top_l = coarse.topk(keep_l, dim=-1).indices  # [B, Hh, keep_l]
        inside = torch.zeros(B, Hh, L, dtype=torch.bool, device=pages.device)
        inside.scatter_(-1, top_l, True)
        inside = inside[..., None].expand(B, Hh, L, self.group).reshape(B, Hh, -1)[..., :P]
        fine = reduce_group(bound_from(qg, lo, hi), self.reduce, scale)
        return torch.where(inside & (pages >= 0), fine, -math.inf)


# ---- named policies ------------------------------------------------------------------------
def _dense_first(selector: Selector, dense_layers: int, name: str, page_size: int | None = None) -> Policy:
    if not isinstance(dense_layers, int) or dense_layers < 0:
        raise ValueError(f"dense_layers must be an int >= 0, got {dense_layers!r}")
    rules = (Rule(layers=tuple(range(dense_layers)), selector=FullSelector()),) if dense_layers else ()
    return Policy(selector=selector, rules=rules, name=name, page_size=page_size)


@register("quest")
def quest(budget: int = 1024, sink: int = 4, window: int = 32, reduce: str = "max",
          dense_layers: int = 2, page_size: int | None = 8) -> Policy:
    """Quest (arXiv:2406.10774): top pages by the key min/max bound of q·k within `budget`
    tokens per KV head; the first `dense_layers` layers read everything. Tuned for 8-token
    pages (the store's page size unless the caller sets one; see `QuestSelector`)."""
    return _dense_first(QuestSelector(budget=budget, sink=sink, window=window, reduce=reduce),
                        dense_layers, "quest", page_size)


@register("lserve")
def lserve(budget: int = 1024, sink: int = 4, window: int = 32, reduce: str = "max", group: int = 4,
           coarse: int = 2, reuse_steps: int = 4, dense_layers: int = 2) -> Policy:
    """LServe (arXiv:2502.14866): two-level page selection, reused for `reuse_steps` steps."""
    return _dense_first(LServeSelector(budget=budget, sink=sink, window=window, reduce=reduce,
                                       group=group, coarse=coarse, reuse_steps=reuse_steps),
                        dense_layers, "lserve")
