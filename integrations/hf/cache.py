"""A transformers Cache over the paged store, and the attention function that reads it.

transformers calls `cache.update(k, v, layer_idx)` and then the attention function of the
layer, which does not receive the cache. `update` therefore only hands the layer's new K/V over
(thread-locally) and the attention function — registered as "kvkit" — runs kvkit's
append/attend/evict step. A model switched to "kvkit" but called without a KVKitCache falls
back to SDPA, so switching is harmless.

Shapes: B batch, Hq/Hkv query/KV heads, T new tokens, D head_dim.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from kvkit import policies as kv_policies
from kvkit.attention.monitor import DecodeMonitor
from kvkit.attention.paged import attention_step
from kvkit.policies.base import Policy
from kvkit.store import PagedKVStore

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

logger = logging.getLogger(__name__)
ATTN_NAME = "kvkit"
_handoff = threading.local()  # (cache, layer_idx, key, value) between update() and attention


def register() -> None:
    """Register the "kvkit" attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, kvkit_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def check_supported(config: Any) -> None:
    """Refuse a model whose attention kvkit would compute differently from transformers.

    kvkit decodes plain causal softmax(q·kᵀ·scaling)·v over every cached token of a layer, with
    RoPE applied before caching and `scaling` taken from the attention call (so Gemma's
    `query_pre_attn_scalar` is honoured). Refused, because decoding would differ without a word:
    a sliding window shorter than `max_position_embeddings` (Mistral, Qwen2/3 with
    `use_sliding_window`, Gemma2/3's sliding layers), other `layer_types` (chunked, linear),
    attention logit softcapping (Gemma2; transformers' own SDPA path drops it too), multi-head
    latent attention (DeepSeek-V2/V3's `kv_lora_rank`) and encoder-decoder models.

    Raises:
        NotImplementedError: naming the config field, its value and what to do instead.
    """
    name = type(config).__name__
    instead = "use transformers' own cache (DynamicCache) for this model"
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(f"KVKitCache: {name}.is_encoder_decoder=True: kvkit caches decoder "
                                  f"self-attention only, not cross-attention; {instead}")
    if (rank := getattr(config, "kv_lora_rank", None)) is not None:
        raise NotImplementedError(f"KVKitCache: {name}.kv_lora_rank={rank}: multi-head latent attention "
                                  f"is not Llama-like attention and kvkit cannot cache it; {instead}")
    if (softcap := getattr(config, "attn_logit_softcapping", None)) is not None:
        raise NotImplementedError(f"KVKitCache: {name}.attn_logit_softcapping={softcap}: kvkit's attention "
                                  f"has no logit softcap; {instead}")
    layer_types = getattr(config, "layer_types", None)
    if other := sorted(set(layer_types or ()) - {"full_attention", "sliding_attention"}):
        raise NotImplementedError(f"KVKitCache: {name}.layer_types has {other}: kvkit runs full causal "
                                  f"attention in every layer; {instead}")
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in layer_types if layer_types is not None else window is not None
    # A window no shorter than the model's context never hides a token.
    if sliding and window is not None and window < getattr(config, "max_position_embeddings", float("inf")):
        raise NotImplementedError(f"KVKitCache: {name}.sliding_window={window}: kvkit attends over the whole "
                                  f"cache, not a sliding window, so tokens past it would differ; {instead}")


class KVKitLayer(CacheLayerMixin):
    """One decoder layer's view of the shared store."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: KVKitCache, layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.cache._ensure_store(key_states)
        _handoff.pending = (self.cache, self.layer_idx, key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.cache.seq_length(self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("KVKitCache does not support beam search yet; use greedy or sampling")


class KVKitCache(Cache):
    """A transformers Cache whose K/V live in a kvkit `PagedKVStore` under a policy.

    Args:
        model: the model (or its config) — a Llama-like decoder.
        policy: a Policy, a registered policy name, or None for "dense".
        page_size: token slots per page; None: the policy's own (`Policy.resolve_page_size`).
        max_pages: per-layer page cap (None: grow as needed).
        compact: after the first prefill of each layer of a policy that evicts, pack the tokens
            eviction left in half-empty pages and shrink the pool to the pages in use
            (`PagedKVStore.compact`).
        metrics: report each decode step to `kvkit.metrics` (pages and bytes read, time,
            sampled selection recall every `recall_every` layer-steps, resident bytes,
            evictions); needs prometheus-client.
        policy_params: parameters for a policy given by name.

    The model is switched to the "kvkit" attention implementation (a no-op for calls without
    a KVKitCache). Left-padded batches work: padding tokens are evicted right after prefill.
    Beam search is not supported.

    Raises:
        NotImplementedError: a model kvkit would decode differently (`check_supported`).
        ConfigError: a policy that does not fit the model's layers and KV heads (`Policy.check_fits`).
    """

    def __init__(self, model: PreTrainedModel | Any, policy: Policy | str | None = None,
                 page_size: int | None = None, max_pages: int | None = None, metrics: bool = False,
                 recall_every: int = 16, compact: bool = True, **policy_params: Any):
        config = getattr(model, "config", model)
        check_supported(config)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        check_supported(text)
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if isinstance(policy, str) or policy is None:
            policy = kv_policies.get(policy or "dense", **policy_params)
        elif policy_params:
            raise ValueError(f"policy_params {sorted(policy_params)} only apply to a policy given by name")
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a kvkit Policy or a name, got {type(policy).__name__}")
        policy.check_fits(self.num_layers, self.num_kv_heads)  # here, not at the first forward
        self.policy, self.page_size, self.max_pages = policy, policy.resolve_page_size(page_size), max_pages
        self.compact = compact
        self.store: PagedKVStore | None = None
        self.seqs: list[int] = []
        self.step_start: list[int] | None = None  # lengths before the current forward
        self.evicted = 0
        self.evicted_reported = 0  # evictions already counted in kvkit.metrics
        self.decode_seconds = 0.0  # time in kvkit's decode attention (select + read + evict)
        self.monitor = DecodeMonitor(policy.name, recall_every) if metrics else None
        super().__init__(layers=[KVKitLayer(self, i) for i in range(self.num_layers)])
        if hasattr(model, "set_attn_implementation"):
            register()
            if model.config._attn_implementation != ATTN_NAME:
                model.set_attn_implementation(ATTN_NAME)

    def _ensure_store(self, key_states: torch.Tensor) -> None:
        if self.store is None:
            self.store = self.policy.make_store(self.num_layers, self.num_kv_heads, self.head_dim,
                                                self.page_size, dtype=key_states.dtype,
                                                device=key_states.device, max_pages=self.max_pages)
        if not self.seqs:
            self.seqs = [self.store.add_sequence() for _ in range(key_states.shape[0])]
        elif len(self.seqs) != key_states.shape[0]:
            raise ValueError(f"this KVKitCache holds {len(self.seqs)} sequences, the batch has "
                             f"{key_states.shape[0]}; use a new cache for a new batch")

    def seq_length(self, layer_idx: int = 0) -> int:
        """Positions seen (evicted ones included), as transformers counts them."""
        if self.store is None or not self.seqs:
            return 0
        return self.store.length(self.seqs[0], layer_idx)

    def undo_step(self, layer: int) -> None:
        """Take back what the failing forward wrote to layers `0 .. layer`, so every layer's
        length is again what it was before (all or nothing, as the store's own calls)."""
        if self.store is None or self.step_start is None:
            return
        for l in range(layer + 1):
            for seq, length in zip(self.seqs, self.step_start):
                if self.store.length(seq, l) > length:
                    self.store.truncate(seq, l, length)

    def reset(self) -> None:
        if self.store is not None:
            for seq in self.seqs:
                self.store.free(seq)
        self.seqs = []

    def nbytes(self) -> int:
        """Bytes the store really allocated (0 before the first forward)."""
        return 0 if self.store is None else self.store.nbytes()


def kvkit_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers attention function: query `[B, Hq, T, D]` -> (`[B, T, Hq, D]`, None)."""
    pending = getattr(_handoff, "pending", None)
    _handoff.pending = None
    if pending is None or pending[1] != getattr(module, "layer_idx", None) or pending[2] is not key:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    cache, layer = pending[0], pending[1]
    store = cache.store

    def dense_prefill(q, k, v):  # exactly what plain transformers computes
        out, _ = sdpa_attention_forward(module, q, k, v, attention_mask, dropout=dropout,
                                        scaling=scaling, **kwargs)
        return out.transpose(1, 2)

    start = time.perf_counter()
    first_prefill = store.length(cache.seqs[0], layer) == 0
    if layer == 0:  # where each sequence stood before this forward, to undo a failed one
        cache.step_start = [store.length(s, 0) for s in cache.seqs]
        if cache.max_pages is not None and not first_prefill:  # room in every layer, or fail before writing
            store.reserve(cache.seqs, query.shape[2])
    try:
        out, evicted = attention_step(store, cache.policy, cache.seqs, layer, query, key, value,
                                      scale=scaling, dense_prefill=dense_prefill, monitor=cache.monitor)
    except BaseException:
        cache.undo_step(layer)
        raise
    if first_prefill and attention_mask is not None:
        evicted += _evict_padding(store, cache.seqs, layer, attention_mask)
    # give back what prefill-time eviction left unused; without eviction there is nothing to pack,
    # and shrinking would drop the room each row has for decode to grow in place
    if first_prefill and cache.compact and cache.policy.evicts:
        store.compact([layer])
    if query.shape[2] == 1:
        cache.decode_seconds += time.perf_counter() - start
    cache.evicted += evicted
    if cache.monitor is not None and layer == cache.num_layers - 1:
        from kvkit import metrics  # once per forward, after the last layer
        metrics.observe_store(store, cache.policy.name)
        metrics.record_evictions(cache.policy.name, cache.evicted - cache.evicted_reported)
        cache.evicted_reported = cache.evicted
    return out.transpose(1, 2).contiguous(), None


def _evict_padding(store: PagedKVStore, seqs: list[int], layer: int, mask: torch.Tensor) -> int:
    # The last query row of a 4D mask [B, 1, T, L] allows exactly the real (non-pad) keys.
    last = mask[:, 0, -1]
    allowed = last if last.dtype == torch.bool else last == 0
    evicted = 0
    for b, seq in enumerate(seqs):
        pads = (~allowed[b]).nonzero(as_tuple=True)[0]
        for head in range(store.num_kv_heads):
            resident = store.positions(seq, layer, head)
            evicted += store.evict(seq, layer, head, pads[torch.isin(pads, resident)])
    return evicted
