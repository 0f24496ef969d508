"""Live numbers of a decode step for `kvkit.metrics`: pages and bytes read against a dense
read, time spent, and — on a sampled fraction of steps — the selection's recall, the share of
dense attention mass the selected pages capture (how much a sparse read loses, measured).

Shapes: B sequences, Hkv KV heads, P pages, S page_size, Hq query heads, D head_dim.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kvkit.attention.decode import decode
from kvkit.store import PagedKVStore, Selection


def selection_recall(q: torch.Tensor, store: PagedKVStore, seqs: Sequence[int], layer: int,
                     selection: Selection, scale: float | None = None) -> float:
    """Share (0..1) of dense attention mass that falls on the selected slots, averaged over
    sequences and KV heads. q: `[B, Hq, D]`; costs one dense decode."""
    dense = Selection(store.page_tables(seqs, layer))
    _, stats = decode(q, store, seqs, layer, dense, scale, return_stats=True, backend="ref")
    probs = stats.probs  # [B, Hkv, Pd, S], each (b, h) sums to G
    chosen = torch.zeros_like(probs, dtype=torch.bool)
    for b in range(probs.shape[0]):
        for h in range(probs.shape[1]):
            sel = selection.pages[b, h]
            keep = torch.isin(dense.pages[b, h], sel[sel >= 0])  # [Pd]
            chosen[b, h] = keep[:, None]
            if selection.slot_mask is not None:  # token-level selection inside pages
                for j in keep.nonzero(as_tuple=True)[0].tolist():
                    where = (sel == dense.pages[b, h, j]).nonzero(as_tuple=True)[0][0]
                    chosen[b, h, j] &= selection.slot_mask[b, h, where]
    total = probs.sum(dim=(-1, -2))  # [B, Hkv]
    kept = (probs * chosen).sum(dim=(-1, -2))
    return float((kept / total.clamp(min=1e-30)).mean())


class DecodeMonitor:
    """Reports decode steps of one policy to `kvkit.metrics` (needs prometheus-client).

    Called by `attention_step` after each single-token step of a layer. `recall_every`:
    measure recall on one call in that many (0: never), since it costs a dense decode.
    """

    def __init__(self, policy: str, recall_every: int = 16):
        if recall_every < 0:
            raise ValueError(f"recall_every must be >= 0, got {recall_every}")
        from kvkit import metrics  # imported here so kvkit.attention does not need prometheus
        self.metrics, self.policy, self.recall_every, self.calls = metrics, policy, recall_every, 0

    def __call__(self, store: PagedKVStore, seqs: Sequence[int], layer: int, q: torch.Tensor,
                 selection: Selection, select_seconds: float, seconds: float, scale: float | None) -> None:
        pages_read = int((selection.pages >= 0).sum())
        pages_total = sum(len(store.page_table(s, layer, h)) for s in seqs for h in range(store.num_kv_heads))
        storage = store.storage(layer)
        capacity = store.slot_positions(layer).shape[0]
        page_bytes = sum(t.numel() * t.element_size() for t in storage.tensors()) // max(1, capacity)
        self.metrics.record_decode(self.policy, pages_read, pages_total, pages_read * page_bytes, seconds,
                                   select_seconds)
        self.calls += 1
        if self.recall_every and self.calls % self.recall_every == 0:
            self.metrics.record_selection_recall(
                self.policy, min(1.0, selection_recall(q, store, seqs, layer, selection, scale)))
