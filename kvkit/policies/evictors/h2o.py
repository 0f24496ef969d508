"""Score-based eviction: H2O's accumulated attention and A2SF's forgetting factor.

H2O (Heavy-Hitter Oracle, arXiv:2306.14048) keeps, per KV head, the tokens that received the
most attention so far ("heavy hitters") plus a recent window. A2SF (arXiv:2407.20485) notes
that a plain sum favours old tokens (more queries have seen them) and multiplies every past
contribution by a forgetting factor f < 1 per query step:

    score_j(t) = f * score_j(t - 1) + a_{t, j}      (H2O: f = 1)

Each slot's score lives in the store (`store.slot_scores(layer)`, `[N, S]` float32, zeroed when
a token is written). After each step, a (sequence, KV head) holding more than `budget` tokens
frees its lowest-score slots, never the first `sink` positions nor the last `window` ones.

Where the attention comes from:
- prefill: `kvkit.attention.paged.PrefillStats`, chunk by chunk, weighted by f ** distance to
  the chunk's last query (so a prompt is scored exactly as if its queries came one by one);
- decode: `kvkit.attention.ref.AttentionStats`, the probabilities of the slots read, summed over
  the G query heads of the KV head (as H2O's reference sums over the heads of a group).

Shapes: B sequences, Hkv KV heads, P pages, S page_size, N pages in the pool, L keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kvkit.policies.base import Evictor, Policy, component
from kvkit.policies.registry import register
from kvkit.stats import AttentionStats, PrefillStats
from kvkit.store import PagedKVStore

__all__ = ["A2SFEvictor", "H2OEvictor", "a2sf", "h2o"]

PREFILL_MODES = ("end", "chunk")


@component("evictor", "a2sf")
@dataclass(frozen=True)
class A2SFEvictor(Evictor):
    """Keep `budget` tokens per KV head: sinks, a recent window, and the highest decayed scores.

    Args:
        budget: tokens kept per (sequence, layer, KV head), sinks and window included.
        forgetting_factor: f in (0, 1]; each past contribution is multiplied by f per query step.
            1.0 is H2O. A2SF's reference code uses one f for all layers; so does this.
        sink: first positions never evicted (attention sinks).
        window: last positions never evicted; None means budget // 2 (H2O's even split between
            heavy hitters and recent tokens).
        prefill: "end" scores the whole prompt before evicting (as H2O's and A2SF's reference
            implementations do: the prompt's last queries, e.g. a question, count); "chunk"
            evicts after each prefill chunk, so the store never holds more than
            budget + one chunk, at the price of evicting before the prompt's end is seen.

    Limits: an evicted token is gone for good; scores of pages shared by forked sequences are
    updated once per sequence (fork + eviction double-counts them).
    """

    budget: int = 1024
    forgetting_factor: float = 0.99
    sink: int = 4
    window: int | None = None
    prefill: str = "end"

    needs_attention = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"{name}.budget must be an int >= 1 token, got {self.budget!r}")
        f = self.forgetting_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ValueError(f"{name}.forgetting_factor must be in (0, 1] (1 is H2O), got {f!r}")
        object.__setattr__(self, "forgetting_factor", float(f))
        if not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"{name}.sink must be an int >= 0, got {self.sink!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 0):
            raise ValueError(f"{name}.window must be None or an int >= 0, got {self.window!r}")
        if self.sink + self.recent > self.budget:
            raise ValueError(f"{name}: sink ({self.sink}) + window ({self.recent}) must not exceed "
                             f"budget ({self.budget}); lower them or raise the budget")
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"{name}.prefill must be one of {PREFILL_MODES}, got {self.prefill!r}")

    @property
    def recent(self) -> int:
        """The protected recent window in tokens."""
        return self.budget // 2 if self.window is None else self.window

    # ---- the step ----------------------------------------------------------------------------
    def step(self, store: PagedKVStore, seqs: Sequence[int], layer: int, heads: Sequence[int],
             stats: AttentionStats | PrefillStats | None) -> int:
        scores = store.slot_scores(layer)  # [N, S]
        slot_pos = store.slot_positions(layer)  # [N, S]
        f = self.forgetting_factor
        if isinstance(stats, PrefillStats):
            cols = stats.column_scores(f)  # [B, Hkv, L]
            decay = f ** stats.num_queries
            for b, seq in enumerate(seqs):
                for h in heads:
                    pages = torch.tensor(store.page_table(seq, layer, h), dtype=torch.int64)
                    pos = slot_pos[pages].long()  # [P, S]
                    valid = (pos >= 0) & (pos < cols.shape[-1])
                    add = cols[b, h][pos.clamp(0, cols.shape[-1] - 1)] * valid  # [P, S]
                    scores[pages] = scores[pages] * decay + add
            if not stats.final and self.prefill == "end":
                return 0
        elif isinstance(stats, AttentionStats):
            for b, seq in enumerate(seqs):
                for h in heads:
                    own = torch.tensor(store.page_table(seq, layer, h), dtype=torch.int64)
                    if f != 1.0:
                        scores[own] *= f
                    read = stats.pages[b, h]  # [P]
                    ok = read >= 0
                    scores[read[ok]] += stats.probs[b, h][ok].to(scores.dtype)  # [p, S]
        return sum(self._shrink(store, seq, layer, h, scores, slot_pos) for seq in seqs for h in heads)

    def _shrink(self, store: PagedKVStore, seq: int, layer: int, head: int,
                scores: torch.Tensor, slot_pos: torch.Tensor) -> int:
        excess = store.num_resident(seq, layer, head) - self.budget
        if excess <= 0:
            return 0
        pages = torch.tensor(store.page_table(seq, layer, head), dtype=torch.int64)
        pos = slot_pos[pages].reshape(-1).long()  # [P*S]
        sc = scores[pages].reshape(-1)
        length = store.length(seq, layer)
        candidate = (pos >= self.sink) & (pos < length - self.recent)
        idx = candidate.nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            return 0
        idx = idx[pos[idx].argsort()]  # oldest first, so ties evict the older token
        order = torch.argsort(sc[idx], stable=True)  # lowest score first
        gone = pos[idx[order[:excess]]]
        return store.evict(seq, layer, head, gone)


@component("evictor", "h2o")
@dataclass(frozen=True)
class H2OEvictor(A2SFEvictor):
    """H2O (arXiv:2306.14048): accumulated attention with no forgetting (factor fixed at 1)."""

    forgetting_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.forgetting_factor != 1.0:
            raise ValueError(f"H2OEvictor.forgetting_factor is 1 by definition, got "
                             f"{self.forgetting_factor!r}; use A2SFEvictor for another factor")
        super().__post_init__()


@register("h2o")
def h2o(budget: int = 1024, sink: int = 4, window: int | None = None, prefill: str = "end") -> Policy:
    """H2O (arXiv:2306.14048): keep heavy hitters by accumulated attention + a recent window."""
    return Policy(evictor=H2OEvictor(budget=budget, sink=sink, window=window, prefill=prefill), name="h2o")


@register("a2sf")
def a2sf(budget: int = 1024, forgetting_factor: float = 0.99, sink: int = 4, window: int | None = None,
         prefill: str = "end") -> Policy:
    """A2SF (arXiv:2407.20485): H2O with each past attention score decayed by a forgetting factor."""
    return Policy(evictor=A2SFEvictor(budget=budget, forgetting_factor=forgetting_factor, sink=sink,
                                      window=window, prefill=prefill), name="a2sf")
