"""The three roles a policy composes, and the registry of their configurable types.

- A **Selector** picks, at each decode step, the pages each KV head reads.
- An **Evictor** frees slots after each step so the store stays within its budget.
- A **Codec** decides how a page's K and V are stored (it is the store's page format).

`kvkit.policies.base.Policy` composes them; the built-in components import their role from
here, so `base` can import the default components without a cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Sequence

import torch

from kvkit.store import PagedKVStore, PageStorage, Selection

if TYPE_CHECKING:
    from kvkit.stats import AttentionStats

__all__ = ["Selector", "Evictor", "Codec", "component", "COMPONENTS"]

COMPONENTS: dict[str, dict[str, type]] = {"selector": {}, "evictor": {}, "codec": {}}


def component(role: str, type_name: str):
    """Class decorator: make a component findable by `{"type": type_name}` in configs."""
    def wrap(cls: type) -> type:
        cls.type_name = type_name
        COMPONENTS[role][type_name] = cls
        return cls
    return wrap


class Selector:
    """Chooses the pages each KV head reads at a decode step."""

    type_name: ClassVar[str] = ""
    needs_key_bounds: ClassVar[bool] = False  # the store must keep per-page key min/max

    def select(self, store: PagedKVStore, seqs: Sequence[int], layer: int, q: torch.Tensor,
               heads: Sequence[int]) -> Selection:
        """q: `[B, len(heads) * G, D]`, the query heads of the KV heads served (in `heads` order);
        returns their pages: `[B, len(heads), P]`."""
        raise NotImplementedError


class Evictor:
    """Frees slots after a step; returns the number of tokens evicted."""

    type_name: ClassVar[str] = ""
    needs_attention: ClassVar[bool] = False  # wants the attention each slot received

    def step(self, store: PagedKVStore, seqs: Sequence[int], layer: int, heads: Sequence[int],
             stats: AttentionStats | None) -> int:
        raise NotImplementedError


class Codec:
    """How pages are stored: makes a layer's PageStorage (see kvkit.store.PageFormat)."""

    type_name: ClassVar[str] = ""

    def make_storage(self, page_size: int, head_dim: int, dtype: torch.dtype,
                     device: torch.device) -> PageStorage:
        raise NotImplementedError
