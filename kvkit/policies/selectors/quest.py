"""Query-aware page selection: Quest (arXiv:2406.10774) and LServe's two-level variant
(arXiv:2502.14866).

Every page keeps the per-channel min and max of its keys (`PagedKVStore(key_bounds=True)`,
updated on append). At a decode step each page gets an upper bound of q·k over its keys,
`sum_c max(q_c * kmin_c, q_c * kmax_c)`, and each KV head reads its best pages within a token
budget; the pages holding the attention sinks and the recent window are always read.

The scoring rules themselves live in `kvkit.scoring`; these selectors apply them to a store.

Shapes: B sequences, Hq/Hkv query/KV heads (here Hh: the KV heads a selector serves),
G = Hq // Hkv, P pages in a list, S page_size, D head_dim, K pages kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kvkit.policies.base import Policy, Rule, Selector, component
from kvkit.policies.registry import register
from kvkit.policies.selectors.full import FullSelector
from kvkit.scoring import (REDUCES, forced_from_positions, forced_pages, is_listed, lserve_scores, quest_scores,
                           signed_boxes, top_pages)
from kvkit.store import PagedKVStore, Selection


def _forced(store: PagedKVStore, seqs: Sequence[int], layer: int, pages: torch.Tensor, sink: int, window: int,
            lean: bool) -> torch.Tensor:
    """The pages always read: from the lengths when nothing was evicted (`lean`), else from the
    positions the slots hold (`[B or 1, H or 1, P]`, see `kvkit.scoring`)."""
    lengths = [store.length(s, layer) for s in seqs]
    if lean:
        return forced_pages(tuple(lengths), pages.shape[-1], store.page_size, sink, window, str(pages.device))
    return forced_from_positions(store.slot_positions(layer), pages, torch.tensor(lengths, device=pages.device),
                                 sink, window)


def _window_pages(window: int, page_size: int) -> int:
    """The most pages `window` positions can touch: when they fit the budget, every one of them
    is chosen (they score +inf), the row's last page among them."""
    return -(-(window - 1) // page_size) + 1


def _reads_as_kept(store: PagedKVStore, seqs: Sequence[int], layer: int, heads: Sequence[int],
                   kept: torch.Tensor) -> np.ndarray | None:
    """`[B, Hh]` tokens each row reads when a kept choice (`[B, Hh, K]` pages in list order, -1
    padded at the end) still ends with the row's last page: then no page came since the choice,
    every page forced now was forced then, and the choice is read as it was (clean rows: all
    kept pages but the last are full). None when some row gained a page since."""
    table, npages, _ = store.table_arrays(layer)
    rows = store.rows(seqs, heads)
    ids = kept.cpu().numpy()
    count = (ids >= 0).sum(-1)  # [B, Hh]
    if (count == 0).any():
        return None
    last_kept = np.take_along_axis(ids, (count - 1)[..., None], -1)[..., 0]
    if (last_kept != table[rows, npages[rows] - 1]).any():
        return None
    return store.prefix_lengths(seqs, layer, heads, count)


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
    than `budget` tokens, at least one page) goes to the best pages by the bound
    (`kvkit.scoring.quest_scores`), aggregated over the G query heads of the group (`reduce`),
    so the heads of a group share the pages they read. When a head holds no more pages than
    the budget, it reads them all (equals dense). Memory: a min and a max key per page,
    2/page_size of the key bytes (in the store's dtype), counted in `store.nbytes()`.

    `reduce="max"` keeps Quest's per-head guarantee (a page any query head of the group bounds
    high stays in). Small pages give tighter bounds, so `quest()` asks for 8-token pages; what
    was measured on the embedded model is in bench/results/selection_quality*.md.

    Limits: the bound is an upper bound, not the score; heads whose keys spread widely over a
    channel get loose bounds everywhere. Every page is scored every step (no reuse: see
    `LServeSelector`).
    """

    budget: int = 1024   # tokens read per KV head per step, sink and window included
    sink: int = 4        # first positions always read
    window: int = 32     # last positions always read
    reduce: str = "max"  # aggregation of the bound over a GQA group: max | sum | mean | softmax

    needs_key_bounds = True

    def __post_init__(self) -> None:
        _check_common("QuestSelector", self.budget, self.sink, self.window, self.reduce)

    def scores(self, store: PagedKVStore, seqs: Sequence[int], layer: int, q: torch.Tensor,
               pages: torch.Tensor, run: tuple[int, int, int] | None = None) -> torch.Tensor:
        """`[B, Hh, P]` page scores of the listed `pages` (forced pages +inf / SINK_SCORE, padding
        -inf); `run`: their `Selection.run`, if known (the bounds are then read in place)."""
        key_min, key_max = store.key_bounds(layer)
        lean = store.nothing_evicted(seqs, layer)
        forced = _forced(store, seqs, layer, pages, self.sink, self.window, lean)
        return quest_scores(q, signed_boxes(key_min, key_max, pages, run), forced, self.reduce)

    def select(self, store: PagedKVStore, seqs: Sequence[int], layer: int, q: torch.Tensor,
               heads: Sequence[int]) -> Selection:
        whole = store.read_all(seqs, layer, heads)  # every page, computed once per step
        pages = whole.pages  # [B, Hh, P]
        budget_pages = max(1, self.budget // store.page_size)
        if pages.shape[-1] <= budget_pages:
            return whole
        chosen = top_pages(self.scores(store, seqs, layer, q, pages, whole.run), pages, budget_pages)
        # when the window's pages fit the budget they are all read (+inf), the last one listed last
        fits = _window_pages(self.window, store.page_size) <= budget_pages
        lengths = store.prefix_lengths(seqs, layer, heads, budget_pages) if fits else None
        return Selection(chosen, lengths=lengths)


# ---- LServe --------------------------------------------------------------------------------
@component("selector", "lserve")
@dataclass(frozen=True)
class LServeSelector(Selector):
    """Two-level page selection reused across decode steps. LServe, arXiv:2502.14866.

    Level 1: `group` consecutive pages of a head's list form a logical page whose key bounds
    are the min/max over its pages; the best logical pages by the Quest bound are kept, enough
    to cover `coarse` times the budget. Level 2: the physical pages inside them are scored and
    the best fit the budget (sink and window pages always in); `kvkit.scoring.lserve_scores`.
    The chosen pages are kept in `store.policy_state(seq)` and reused for `reuse_steps` decode
    steps (LServe's reusable page selector): between refreshes no page is scored, only the
    sink/window pages are updated (a page that filled up since is added) and pages freed since
    are dropped.

    LServe's own hierarchy runs the other way (large physical pages for the kernel, small
    logical pages for the statistics, a physical page scored by its best logical page); kvkit's
    pages are already small, so the hierarchy here is coarse-to-fine over them, which is what
    saves scoring work at long context. Limits: a needle that becomes relevant between
    refreshes is seen only at the next refresh, and reuse costs perplexity at small budgets
    (bench/results/quality_read_codec_budgets.md).
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
        whole = store.read_all(seqs, layer, heads)  # every page, computed once per step
        pages = whole.pages  # [B, Hh, P]
        budget_pages = max(1, self.budget // store.page_size)
        if pages.shape[-1] <= budget_pages:
            return whole
        key = self._key(layer, heads)
        states = [store.policy_state(s).get(key) for s in seqs]
        lengths = [store.length(s, layer) for s in seqs]
        fresh = all(st is not None and 0 <= n - st[0] < self.reuse_steps and st[1].shape[0] == len(heads)
                    for st, n in zip(states, lengths))
        lean = store.nothing_evicted(seqs, layer)
        if fresh:  # reuse: the kept pages that are still listed, plus sink and window pages
            kept = torch.nn.utils.rnn.pad_sequence([st[1].T for st in states], padding_value=-1).permute(1, 2, 0)
            if lean and _window_pages(self.window, store.page_size) <= budget_pages:
                lengths = _reads_as_kept(store, seqs, layer, heads, kept)
                if lengths is not None:  # no page since the choice: the kept pages are the choice
                    return Selection(kept, lengths=lengths)
            forced = _forced(store, seqs, layer, pages, self.sink, self.window, lean)
            listed = is_listed(pages, kept)  # [B, Hh, P]
            scores = torch.where(forced != 0, forced, torch.where(listed, 0.0, -math.inf))
            return Selection(top_pages(scores, pages, budget_pages))
        forced = _forced(store, seqs, layer, pages, self.sink, self.window, lean)
        key_min, key_max = store.key_bounds(layer)
        scores = lserve_scores(q, signed_boxes(key_min, key_max, pages, whole.run), budget_pages, self.group, self.coarse,
                               self.reduce)
        chosen = top_pages(torch.where(forced != 0, forced, scores), pages, budget_pages)  # [B, Hh, K]
        for b, (s, n) in enumerate(zip(seqs, lengths)):
            store.policy_state(s)[key] = (n, chosen[b])
        return Selection(chosen)


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
