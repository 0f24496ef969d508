"""What evictors learn from attention: the types attention hands them, below both.

`AttentionStats` is what a decode step read and how much attention each read slot got;
`PrefillStats` is the attention of a prefill chunk, computed lazily when an evictor asks.
`kvkit.attention` produces them; `kvkit.policies`' evictors (H2O, A2SF) consume them. They
live here, beside `kvkit.scoring`, so neither of those packages imports the other.

Shapes: B sequences, Hq/Hkv query/KV heads, G = Hq // Hkv, P pages, S page_size, t chunk
queries, L keys, D head_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["AttentionStats", "PrefillStats"]


@dataclass
class AttentionStats:
    """Attention each selected slot received, for evictors: summed over the G query heads.

    pages: `[B, Hkv, P]` the pages read (-1 padded); probs: `[B, Hkv, P, S]` float32.
    """

    pages: torch.Tensor
    probs: torch.Tensor


class PrefillStats:
    """The attention of one chunk of a first prefill, for evictors that score by attention.

    The chunk's queries are `q` `[B, Hq, t, D]` at positions `q_start .. q_start + t - 1`; they
    attend causally to keys `k` `[B, Hkv, L, D]` at positions `0 .. L - 1` (L = q_start + t).
    `final` is True for the last chunk of the prompt. Nothing is computed until an evictor asks:

    - `column_scores(decay)` -> `[B, Hkv, L]` float32: the attention each key received from the
      chunk's queries, summed over each KV head's G query heads, query i weighted by
      `decay ** (q_start + t - 1 - i)` (decay 1: plain column sums, as H2O accumulates; decay < 1:
      A2SF's forgetting factor, applied per query step). Computed in blocks of `block` queries,
      so memory stays `[B, Hq, block, L]`; cached per decay.
    - `num_queries`: t, for decaying scores accumulated before this chunk by `decay ** t`.

    The probabilities are recomputed here (float32 softmax of `q k^T * scale`, causal) rather
    than taken from the model's prefill, which does not return them; a model's padding mask is
    not applied (padding is evicted after prefill anyway).
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, q_start: int, scale: float | None,
                 final: bool, block: int = 128):
        self.q, self.k, self.q_start, self.final, self.block = q, k, q_start, final, block
        self.scale = scale if scale is not None else q.shape[-1] ** -0.5
        self.num_queries = q.shape[2]
        self._cache: dict[float, torch.Tensor] = {}

    def column_scores(self, decay: float = 1.0) -> torch.Tensor:
        if decay in self._cache:
            return self._cache[decay]
        B, Hq, t, D = self.q.shape
        Hkv, L = self.k.shape[1], self.k.shape[2]
        G = Hq // Hkv
        kf = self.k.float()  # [B, Hkv, L, D]
        key_pos = torch.arange(L, device=self.k.device)
        total = torch.zeros(B, Hkv, L, dtype=torch.float32, device=self.k.device)
        last = self.q_start + t - 1
        for i in range(0, t, self.block):
            qb = self.q[:, :, i:i + self.block].float()  # [B, Hq, b, D]
            b = qb.shape[2]
            q_pos = torch.arange(self.q_start + i, self.q_start + i + b, device=self.k.device)
            qg = qb.reshape(B, Hkv, G, b, D)  # the G query heads of each KV head
            logits = torch.einsum("bhgtd,bhld->bhgtl", qg, kf) * self.scale  # [B, Hkv, G, b, L]
            logits = logits.masked_fill(key_pos[None, :] > q_pos[:, None], -math.inf)
            probs = torch.softmax(logits, dim=-1)
            weight = torch.pow(torch.tensor(float(decay), dtype=torch.float64),
                               (last - q_pos).double()).float()  # [b]
            total += torch.einsum("bhgtl,t->bhl", probs, weight)
        self._cache[decay] = total
        return total
