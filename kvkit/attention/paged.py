"""One attention layer over the paged store, as the integrations and `PagedAttention` run it:
append the new K/V, attend (dense prefill, or decode over the policy's selection), evict.

Shapes: B sequences, Hq/Hkv query/KV heads, G = Hq // Hkv, T new tokens, D head_dim.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kvkit import policies
from kvkit.attention.decode import decode, decode_in_place
from kvkit.attention.ref import causal_prefill_ref
from kvkit.stats import PrefillStats
from kvkit.store import PagedKVStore

DensePrefill = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attention_step(store: PagedKVStore, policy, seqs: Sequence[int], layer: int, q: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   dense_prefill: DensePrefill | None = None,
                   prefill_chunk: int = 512, monitor: Callable[..., None] | None = None
                   ) -> tuple[torch.Tensor, int]:
    """Run one layer for new tokens of `seqs`; returns (out `[B, Hq, T, D]`, tokens evicted).

    q: `[B, Hq, T, D]`; k, v: `[B, Hkv, T, D]`, RoPE applied. A first prefill (empty store)
    attends densely over k, v themselves (`dense_prefill`, default causal SDPA); a later
    multi-token step attends over what the store holds; a single token decodes through the
    policy's selection. A first prefill is written in chunks of `prefill_chunk` tokens with
    eviction after each, so an evicting policy never holds the whole prompt in the store.
    `monitor` (e.g. `kvkit.attention.monitor.DecodeMonitor`) sees each single-token step.
    """
    B, Hq, T, D = q.shape
    if T == 1:
        return _decode_step(store, policy, seqs, layer, q[:, :, 0], k[:, :, 0], v[:, :, 0], scale, monitor)
    past = [store.length(s, layer) for s in seqs]
    evicted = 0
    # a first prefill goes in chunks only when something evicts between them; else in one piece,
    # so each (sequence, KV head) gets its pages in one run (read in place at decode: fast.py)
    chunk = prefill_chunk if not any(past) and policy.evicts else T
    # Evictors that score by attention (H2O, A2SF) get the prefill's attention chunk by chunk.
    prefill_stats = not any(past) and policy.needs_attention
    stats = None
    for start in range(0, T, chunk):
        for b, seq in enumerate(seqs):
            kb, vb = k[b, :, start:start + chunk], v[b, :, start:start + chunk]
            store.append(seq, layer, kb.transpose(0, 1), vb.transpose(0, 1))  # [t, Hkv, D]
        if prefill_stats:
            end = min(start + chunk, T)
            stats = PrefillStats(q[:, :, start:end], k[:, :, :end], start, scale, final=end == T)
        if start + chunk < T:
            evicted += policy.evict(store, seqs, layer, stats)
    if not any(past):
        out = (dense_prefill(q, k, v) if dense_prefill is not None else
               F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True))
    else:
        out = _prefill_over_store(store, seqs, layer, q, past, scale)
    return out, evicted + policy.evict(store, seqs, layer, stats)


def _decode_step(store: PagedKVStore, policy, seqs: Sequence[int], layer: int, q: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, scale: float | None,
                 monitor: Callable[..., None] | None) -> tuple[torch.Tensor, int]:
    """One new token per sequence (q `[B, Hq, D]`, k, v `[B, Hkv, D]`): one vectorized write for
    the batch, the policy's selection, decode over it, eviction. Returns (`[B, Hq, 1, D]`, evicted)."""
    store.append_step(seqs, layer, k, v)
    if monitor is None and policy.reads_everything(layer, store.num_kv_heads):
        out = decode_in_place(q, store, seqs, layer, scale)
        if out is not None:
            return out[:, :, None], 0
    start = time.perf_counter() if monitor is not None else 0.0
    selection = policy.select(store, seqs, layer, q)
    selected = time.perf_counter() if monitor is not None else 0.0
    out, stats = decode(q, store, seqs, layer, selection, scale, return_stats=policy.needs_attention)
    if monitor is not None:
        monitor(store, seqs, layer, q, selection, selected - start, time.perf_counter() - start, scale)
    return out[:, :, None], policy.evict(store, seqs, layer, stats) if policy.evicts else 0


def _prefill_over_store(store: PagedKVStore, seqs: Sequence[int], layer: int, q: torch.Tensor,
                        past: list[int], scale: float | None) -> torch.Tensor:
    # Heads may hold different tokens after eviction, so each KV head attends on its own.
    B, Hq, T, D = q.shape
    G = Hq // store.num_kv_heads
    out = torch.empty_like(q)
    for b, seq in enumerate(seqs):
        q_pos = torch.arange(past[b], past[b] + T, device=q.device)
        for h in range(store.num_kv_heads):
            pos, k, v = store.read(seq, layer, h)  # [n], [n, D], [n, D]
            out[b, h * G:(h + 1) * G] = causal_prefill_ref(
                q[b, h * G:(h + 1) * G], k[None].to(q.dtype), v[None].to(q.dtype), q_pos, pos, scale)
    return out


class PagedAttention(nn.Module):
    """Attention with its own paged KV store, for people who write their own models.

    It replaces the `k_cache`/`v_cache` + SDPA of a gpt-fast-style attention layer: compute q,
    k, v and RoPE as usual, then `out = self.attn(q, k, v)` with q `[B, Hq, T, D]` and k, v
    `[B, Hkv, T, D]`. Layers of one model may share a store (`store=`, `layer=`), which
    cross-layer policies need; a store of its own has `num_layers` layers (default
    `layer + 1`), so give the model's count for a policy whose rules or head pattern were made
    for the whole model (e.g. `duo`). Call `reset()` before a new batch of sequences.

    Example:
        >>> attn = PagedAttention(num_heads=9, num_kv_heads=3, head_dim=64,
        ...                       policy=kvkit.policies.get("streaming", window=256))
        >>> out = attn(q, k, v)            # prefill, then one token at a time
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, policy=None,
                 page_size: int = 16, store: PagedKVStore | None = None, layer: int = 0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 num_layers: int | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.policy = policies.get(policy) if isinstance(policy, str) else policy or policies.get("dense")
        self.layer = layer
        num_layers = num_layers if num_layers is not None else layer + 1
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer must be in [0, num_layers={num_layers}), got {layer}")
        self.store = store or self.policy.make_store(num_layers, num_kv_heads, head_dim, page_size,
                                                     dtype=dtype, device=device)
        self.seqs: list[int] = []

    def reset(self) -> None:
        """Forget every sequence (frees their pages)."""
        for seq in self.seqs:
            self.store.free(seq)
        self.seqs = []

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: `[B, Hq, T, D]`, k/v: `[B, Hkv, T, D]` (RoPE applied) -> `[B, Hq, T, D]`."""
        B = q.shape[0]
        if q.dim() != 4 or q.shape[1] != self.num_heads or q.shape[-1] != self.head_dim:
            raise ValueError(f"q must be [B, num_heads, T, head_dim] = [B, {self.num_heads}, T, "
                             f"{self.head_dim}], got {list(q.shape)}")
        if k.shape != v.shape or k.shape != (B, self.num_kv_heads, q.shape[2], self.head_dim):
            raise ValueError(f"k and v must be [{B}, {self.num_kv_heads}, {q.shape[2]}, {self.head_dim}], "
                             f"got {list(k.shape)} and {list(v.shape)}")
        if not self.seqs:
            self.seqs = [self.store.add_sequence() for _ in range(B)]
        elif len(self.seqs) != B:
            raise ValueError(f"batch of {B} but this layer holds {len(self.seqs)} sequences; call reset() first")
        out, _ = attention_step(self.store, self.policy, self.seqs, self.layer, q, k, v)
        return out
