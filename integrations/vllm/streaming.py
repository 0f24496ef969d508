"""Sink + window layers in vLLM with real memory savings: a KV cache spec and manager that free
the blocks between a layer's attention sinks and its recent window, and the block-table trim
that keeps attention off what was freed.

Which layers: every layer whose KV heads all run one `SinkWindowEvictor` (the `streaming`
policy; DuoAttention's layers where every head is a streaming head). vLLM allocates a block for
all KV heads of a layer at once, so a layer with one retrieval head keeps all its blocks (its
streaming heads would need the layer split in two; see NOTES.md).

- `StreamingSpec` is vLLM's sliding-window spec plus `sink` tokens. vLLM groups layers by spec,
  so streaming layers get their own KV cache group and block table, and vLLM sizes the pool and
  admits requests from the spec's per-request bound (`max_admission_blocks_per_request`): the
  saving shows in vLLM's own accounting (more requests fit, longer contexts start).
- `StreamingManager` is vLLM's sliding-window manager, except that it frees blocks
  `[ceil(sink / S), window start)` instead of `[0, window start)`.
- `trim_blocks` removes the blocks a row does not read from its block list before the stock
  kernel runs: the sink blocks stay first, then every block from the one holding the window
  start of the row's first query. Positions stay in order, so the kernel's causal mask on the
  shortened sequence is the true one; freed blocks (vLLM leaves the null block in their place)
  are never read, whether or not the manager has freed them yet.

Reads are whole blocks: up to S - 1 tokens more at the window's start (and the rest of the sink
block) than kvkit's token-exact evictor keeps. Prefix caching must be off for these layers
(vLLM's sliding-window prefix-cache lookup does not know about sinks).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, fields

import torch

from vllm.model_executor.layers.attention.attention import Attention
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, KVCacheSpec, SlidingWindowSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from kvkit.errors import ConfigError
from kvkit.policies import Policy
from kvkit.policies.evictors.sink_window import SinkWindowEvictor
from kvkit.integrations.vllm.layers import layer_index

logger = logging.getLogger(__name__)


def model_kv_heads(vllm_config) -> int:
    """The model's KV heads, all of them. Which layers stream (and which selector a layer runs)
    is decided over these, so every tensor-parallel worker, which holds a slice of them, decides
    the same: vLLM needs one KV cache spec per layer across workers."""
    return vllm_config.model_config.get_total_num_kv_heads()


def streaming_evictor(policy: Policy, layer: int, num_kv_heads: int) -> SinkWindowEvictor | None:
    """The `SinkWindowEvictor` every KV head of `layer` runs, or None when the layer keeps all
    its KV (no evictor, or some head without this one)."""
    groups = policy.evictors(layer, num_kv_heads)
    if len(groups) == 1 and isinstance(groups[0][0], SinkWindowEvictor):
        return groups[0][0]
    return None


@dataclass(frozen=True, kw_only=True)
class StreamingSpec(SlidingWindowSpec):
    """vLLM's sliding-window spec with the first `sink` tokens kept too."""

    sink: int = 0

    @property
    def sink_blocks(self) -> int:
        return cdiv(self.sink, self.block_size)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        window = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(window + self.sink_blocks, cdiv(max_model_len, self.block_size))

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(isinstance(s, StreamingSpec) and (s.sink, s.sliding_window) == (self.sink, self.sliding_window)
                   for s in kv_cache_specs.values())


class StreamingManager(SlidingWindowManager):
    """Frees the blocks between the sink blocks and the window; the rest is the sliding-window
    manager's."""

    def __init__(self, kv_cache_spec: StreamingSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink_blocks = kv_cache_spec.sink_blocks

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        window_start = self.get_num_skipped_tokens(processed_computed_tokens)
        self._remove_blocks_in_range(request_id, self.sink_blocks, window_start // self.block_size)


def trim_blocks(block_table: torch.Tensor, seq_lens: torch.Tensor, query_lens: torch.Tensor,
                block_size: int, sink: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's block list without the blocks between its sink blocks and its window.

    block_table: `[B, M]` block ids in position order; seq_lens / query_lens: `[B]` tokens in
    the sequence / scheduled this step. Returns `(table [B, M], seq_lens [B] int32)`: the sink
    blocks, then the blocks from the one holding `first query position - window + 1` on; the
    tail of a shortened row repeats its last column (never read: past its new length).
    """
    S = block_size
    sink_blocks = cdiv(sink, S)
    first = seq_lens.long() - query_lens.long()  # position of each row's first query
    window_block = ((first - window + 1).clamp(min=0) // S).clamp(min=sink_blocks)  # [B]
    gap = window_block - sink_blocks  # blocks skipped per row
    col = torch.arange(block_table.shape[1])[None, :]
    src = torch.where(col < sink_blocks, col, col + gap[:, None]).clamp(max=block_table.shape[1] - 1)
    return block_table.gather(1, src), (seq_lens.long() - gap * S).to(torch.int32)


def register_spec() -> None:
    """Register `StreamingSpec` with its manager, after vLLM's built-in specs (registering first
    would stop vLLM from registering its own, and full attention would lose its manager)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(StreamingSpec, StreamingManager, uniform_type_base_spec=StreamingSpec)


# On import: a process that holds a StreamingSpec (the engine core unpickles the workers' specs,
# which imports this module) must find its manager, else vLLM would fall back to the
# sliding-window manager through the class hierarchy and free the sink blocks.
register_spec()


def patch_attention_spec(policy: Policy) -> None:
    """Make vLLM's `Attention.get_kv_cache_spec` return a `StreamingSpec` for the policy's
    streaming layers. Idempotent."""
    stock = Attention.get_kv_cache_spec
    if getattr(stock, "_kvkit", False):
        return

    @functools.wraps(stock)
    def get_kv_cache_spec(self: Attention, vllm_config) -> KVCacheSpec | None:
        spec = stock(self, vllm_config)
        if type(spec) is not FullAttentionSpec:
            return spec
        heads = model_kv_heads(vllm_config)  # all of the model's: a worker holds a slice under TP
        evictor = streaming_evictor(policy, layer_index(self.layer_name), heads)
        if evictor is None:
            return spec
        if vllm_config.cache_config.enable_prefix_caching:
            raise ConfigError(
                f"kvkit policy {policy.name!r} frees blocks between sinks and window, which vLLM's "
                "prefix cache cannot share: start vLLM with prefix caching off "
                "(--no-enable-prefix-caching, or LLM(..., enable_prefix_caching=False))")
        if vllm_config.scheduler_config.disable_hybrid_kv_cache_manager and not _all_streaming(
                policy, vllm_config, heads):
            _warn_no_hybrid(policy.name)
            return spec  # vLLM would turn a window spec into full attention anyway
        base = {f.name: getattr(spec, f.name) for f in fields(AttentionSpec) if f.init}
        return StreamingSpec(**base, sliding_window=evictor.window, sink=evictor.sink)

    get_kv_cache_spec._kvkit = True  # type: ignore[attr-defined]
    Attention.get_kv_cache_spec = get_kv_cache_spec


def _all_streaming(policy: Policy, vllm_config, num_kv_heads: int) -> bool:
    num_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
    return all(streaming_evictor(policy, layer, num_kv_heads) for layer in range(num_layers))


@functools.cache
def _warn_no_hybrid(policy_name: str) -> None:
    logger.warning(
        "kvkit: vLLM's hybrid KV cache manager is off (a KV connector such as LMCache's turns it "
        "off, as does --disable-hybrid-kv-cache-manager), so policy %r keeps every block of its "
        "streaming layers: they still read only sinks + window, but no memory is saved", policy_name)
