"""Attention sinks plus a recent window (StreamingLLM, arXiv:2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kvkit.policies.base import Evictor, component
from kvkit.store import PagedKVStore


@component("evictor", "sink_window")
@dataclass(frozen=True)
class SinkWindowEvictor(Evictor):
    """Keep the first `sink` positions and the last `window`; evict everything between.

    Memory per head is bounded by sink + window tokens (plus at most one partly filled page
    more, since freed slots are reused before new pages are taken). Limits: what falls out of
    the window is gone for good — long-range retrieval fails once the needle leaves it.
    """

    sink: int = 4
    window: int = 1024

    def __post_init__(self) -> None:
        if not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"SinkWindowEvictor.sink must be an int >= 0, got {self.sink!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"SinkWindowEvictor.window must be an int >= 1 token, got {self.window!r}")

    def step(self, store: PagedKVStore, seqs: Sequence[int], layer: int, heads: Sequence[int],
             stats=None) -> int:
        evicted = 0
        for seq in seqs:
            stop = store.length(seq, layer) - self.window  # positions below this leave
            if stop <= self.sink:
                continue
            for head in heads:
                if store.num_resident(seq, layer, head) <= self.sink + self.window:
                    continue
                pos = store.positions(seq, layer, head)
                gone = pos[(pos >= self.sink) & (pos < stop)]
                evicted += store.evict(seq, layer, head, gone)
        return evicted
