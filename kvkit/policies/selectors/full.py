"""Read every resident page: the dense selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kvkit.policies.roles import Selector, component
from kvkit.store import PagedKVStore, Selection


@component("selector", "full")
@dataclass(frozen=True)
class FullSelector(Selector):
    """Every page each KV head holds (what eviction left is what is read)."""

    def select(self, store: PagedKVStore, seqs: Sequence[int], layer: int, q: torch.Tensor,
               heads: Sequence[int]) -> Selection:
        return store.read_all(seqs, layer, heads)
