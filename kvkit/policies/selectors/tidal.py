"""TidalDecode (arXiv:2410.05076): token selection in a few layers, reused by the layers between.

Shapes: B sequences, Hq query heads, Hh the KV heads a selector serves, G = Hq // Hh,
P pages in a list, S page_size, L positions appended so far, K tokens kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from kvkit.policies.base import Policy, Selector, component
from kvkit.policies.registry import register
from kvkit.store import PagedKVStore, Selection


@component("selector", "tidal")
@dataclass(frozen=True)
class TidalSelector(Selector):
    """Full attention in a few *selection layers*, which pick the top tokens by their real
    attention; the layers after each reuse that choice until the next selection layer.

    - layers before the first selection layer read everything (TidalDecode keeps the first two
      layers dense);
    - a selection layer reads everything, computes softmax(q·k) per query head over every
      resident token, sums it over the query heads (over all heads of the layer when `shared`,
      else over each KV head's group), and keeps the `budget` best positions, the first `sink`
      and the last `window` positions always among them;
    - a layer after it reads, per KV head, only the slots holding those positions (a
      `slot_mask`; positions, not slots, are handed on, since each layer has its own pages).
      Never more than `budget` tokens per KV head; the heads of a GQA group share them.

    The choice lives in `store.policy_state(seq)` and is used only in the decode step that made
    it (a stale or missing one makes the layer select for itself). TidalDecode's reference
    (github.com/DerrickYLJ/TidalDecode, `src/tidal_build/modify_llama.py`) takes the top tokens
    of each query head's q·k logits in the selection layer and masks each head to its own in
    the layers after; here a KV head's pages serve all its query heads, so the choice is one
    token set per KV head (`shared=False`) or one for the layer (`shared=True`, the default).
    What it keeps on the embedded model: bench/results/selection_quality.md and NOTES.md there.
    Limits: a selection layer costs a full read (2 of 30 layers by default); the reuse assumes
    the layers between attend like the selection layer.
    """

    budget: int = 1024
    sink: int = 4
    window: int = 32
    selection_layers: tuple[int, ...] = (2, 14)
    shared: bool = True     # one token set for every KV head (else one per KV head)

    def __post_init__(self) -> None:
        if not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"TidalSelector.budget must be an int >= 1 token per KV head, got {self.budget!r}")
        if not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"TidalSelector.sink must be an int >= 0, got {self.sink!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"TidalSelector.window must be an int >= 1, got {self.window!r}")
        if self.sink + self.window > self.budget:
            raise ValueError(f"TidalSelector: sink + window = {self.sink + self.window} exceed the "
                             f"budget of {self.budget} tokens")
        layers = tuple(self.selection_layers) if self.selection_layers is not None else ()
        if not layers or not all(isinstance(i, int) and i >= 0 for i in layers):
            raise ValueError(f"TidalSelector.selection_layers must be non-negative ints (at least one), "
                             f"got {self.selection_layers!r}")
        object.__setattr__(self, "selection_layers", tuple(sorted(set(layers))))
        if not isinstance(self.shared, bool):
            raise TypeError(f"TidalSelector.shared must be a bool, got {self.shared!r}")

    def _key(self, heads: Sequence[int]) -> tuple:
        return ("tidal", tuple(heads))

    def select(self, store: PagedKVStore, seqs: Sequence[int], layer: int, q: torch.Tensor,
               heads: Sequence[int]) -> Selection:
        pages = store.page_tables(seqs, layer, heads)  # [B, Hh, P]
        if layer < self.selection_layers[0]:
            return Selection(pages)
        resident = max(store.num_resident(s, layer, h) for s in seqs for h in heads)
        if resident <= self.budget:
            return Selection(pages)
        lengths = [store.length(s, layer) for s in seqs]
        key = self._key(heads)
        source = max(i for i in self.selection_layers if i <= layer) if layer >= self.selection_layers[0] else None
        states = [store.policy_state(s).get(key) for s in seqs]
        usable = layer not in self.selection_layers and all(
            st is not None and st[0] == n and st[1] == source for st, n in zip(states, lengths))
        if not usable:  # a selection layer (or nothing to reuse): read all, choose for the next ones
            chosen = self._choose(store, seqs, layer, q, pages, lengths)  # [B, Hsel, K]
            for b, (s, n) in enumerate(zip(seqs, lengths)):
                store.policy_state(s)[key] = (n, layer, chosen[b])
            return Selection(pages)
        chosen = torch.nn.utils.rnn.pad_sequence([st[2].T for st in states], padding_value=-1).permute(1, 2, 0)
        return _token_selection(store, layer, pages, chosen, max(lengths))

    def _choose(self, store: PagedKVStore, seqs: Sequence[int], layer: int, q: torch.Tensor,
                pages: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """The `budget` positions to keep: `[B, 1 or Hh, budget]` int64, -1 padded."""
        B, Hh, P = pages.shape
        S, D = store.page_size, store.head_dim
        k, _ = store.storage(layer).read(pages.clamp(min=0).reshape(-1))  # [B*Hh*P, S, D]
        sp = store.slot_positions(layer)[pages.clamp(min=0)].long()  # [B, Hh, P, S]
        sp = torch.where((pages >= 0)[..., None], sp, -1).view(B, Hh, P * S)
        qg = q.float().view(B, Hh, q.shape[1] // Hh, D)
        logits = qg @ k.float().view(B, Hh, P * S, D).transpose(-1, -2) * D ** -0.5  # [B, Hh, G, P*S]
        logits = logits.masked_fill((sp < 0)[:, :, None], -math.inf)
        mass = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(2)  # [B, Hh, P*S]
        L = max(lengths)
        per_pos = torch.zeros(B, Hh, L + 1, device=q.device)  # slot L collects empty slots
        per_pos.scatter_add_(-1, torch.where(sp >= 0, sp, L), mass)
        per_pos = per_pos[..., :L]
        if self.shared:
            per_pos = per_pos.sum(1, keepdim=True)  # [B, 1, L]
        resident = torch.zeros(B, Hh, L + 1, dtype=torch.bool, device=q.device)
        resident.scatter_(-1, torch.where(sp >= 0, sp, L), True)
        resident = resident[..., :L].any(1, keepdim=True) if self.shared else resident[..., :L]
        pos = torch.arange(L, device=q.device)
        length = torch.tensor(lengths, device=q.device).view(B, 1, 1)
        forced = (pos < self.sink) | (pos >= length - self.window)
        score = torch.where(forced, math.inf, per_pos)
        score = torch.where(resident, score, -math.inf)
        top = score.topk(min(self.budget, L), dim=-1)
        return torch.where(top.values > -math.inf, top.indices, -1)


def _token_selection(store: PagedKVStore, layer: int, pages: torch.Tensor, chosen: torch.Tensor,
                     length: int) -> Selection:
    """Pages holding `chosen` positions (`[B, 1 or Hh, K]`) with a slot mask, compacted."""
    B, Hh, P = pages.shape
    S = store.page_size
    wanted = torch.zeros(B, chosen.shape[1], length + 1, dtype=torch.bool, device=pages.device)
    wanted.scatter_(-1, torch.where(chosen >= 0, chosen, length), True)
    wanted = wanted.expand(B, Hh, length + 1)
    sp = store.slot_positions(layer)[pages.clamp(min=0)].long()  # [B, Hh, P, S]
    sp = torch.where((pages >= 0)[..., None] & (sp >= 0) & (sp < length), sp, length)
    mask = wanted.gather(-1, sp.view(B, Hh, P * S)).view(B, Hh, P, S) & (sp < length)
    used = mask.any(-1)  # [B, Hh, P]
    order = torch.argsort((~used).to(torch.int8), dim=-1, stable=True)
    width = int(used.sum(-1).max())
    order = order[..., :width]
    keep = used.gather(-1, order)
    out_pages = torch.where(keep, pages.gather(-1, order), -1)
    out_mask = mask.gather(2, order[..., None].expand(B, Hh, width, S))
    return Selection(out_pages, out_mask)


@register("tidal")
def tidal(budget: int = 1024, sink: int = 4, window: int = 32,
          selection_layers: tuple[int, ...] | list[int] = (2, 14), shared: bool = True) -> Policy:
    """TidalDecode (arXiv:2410.05076): top-`budget` tokens by real attention in the selection
    layers, reused by the layers after each; layers before the first one read everything."""
    if isinstance(selection_layers, str):  # from the CLI: --param selection_layers=2,14
        selection_layers = tuple(int(x) for x in selection_layers.split(",") if x.strip())
    elif isinstance(selection_layers, int):
        selection_layers = (selection_layers,)
    return Policy(selector=TidalSelector(budget=budget, sink=sink, window=window,
                                         selection_layers=tuple(selection_layers), shared=shared),
                  name="tidal")
