"""Keep everything."""

from __future__ import annotations

from dataclasses import dataclass

from kvkit.policies.roles import Evictor, component


@component("evictor", "none")
@dataclass(frozen=True)
class NoEvictor(Evictor):
    """Never evicts: the store grows with the sequence."""

    def step(self, store, seqs, layer, heads, stats) -> int:
        return 0
