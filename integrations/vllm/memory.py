"""kvkit's own per-block tensors counted in vLLM's KV memory planning.

Quest and LServe layers keep, beside vLLM's KV pool, the signed key box `[max | -min]` of each
block's R sub-pages per KV head (`bounds`, impl.py), and LServe each block's whole box too: `Hkv * (R + 1) * 2 * D`
values per block and layer in the keys' dtype, 12.5-16% of the pool with 8-token sub-pages. vLLM
turns the memory it is given (`--kv-cache-memory-bytes`, or what profiling left over) into
`available // bytes_per_block` blocks, so kvkit hands it `available * B / (B + E)` instead (B:
vLLM's bytes per block, E: kvkit's): the pool and kvkit's tensors together fit the budget, and
vLLM's admission checks (max_model_len, concurrency) plan with the blocks that really exist.

The hook wraps `get_kv_cache_configs` where the engine core calls it (a private surface, pinned
in tests/integrations/vllm/test_contract.py). It runs in the engine core, which may not have
built the attention layers (tensor-parallel workers are other processes), so the layers'
selectors are worked out from the policy and each layer's KV cache spec, as the backend does.
"""

from __future__ import annotations

import logging

from kvkit.policies import Policy
from kvkit.policies.selectors.quest import LServeSelector
from kvkit.integrations.vllm.layers import PageSelector, layer_index, layer_selector, sub_page_size

logger = logging.getLogger(__name__)


def extra_bytes_per_block(policy: Policy, layer_name: str, spec, model_kv_heads: int, key_itemsize: int) -> int:
    """Bytes kvkit keeps per KV block of layer `layer_name` (`spec`: its vLLM KV cache spec, whose
    `num_kv_heads` are this worker's): what impl.py allocates for it, 0 for dense layers."""
    block_size, heads, head_size = (getattr(spec, a, None) for a in ("block_size", "num_kv_heads", "head_size"))
    if None in (block_size, heads, head_size):  # not an attention layer's spec
        return 0
    selector = layer_selector(policy, layer_index(layer_name), model_kv_heads)
    if not isinstance(selector, PageSelector):
        return 0
    boxes_per_page = block_size // sub_page_size(policy, block_size)  # sub-page bounds
    if isinstance(selector, LServeSelector):
        boxes_per_page += 1  # the block's whole box
    return heads * boxes_per_page * 2 * head_size * key_itemsize


def scaled_memory(available: int, bytes_per_block: int, extra_per_block: int) -> int:
    """The memory to hand vLLM so that `num_blocks * (bytes_per_block + extra_per_block)` stays
    within `available`."""
    if extra_per_block <= 0 or bytes_per_block <= 0:
        return available
    return available * bytes_per_block // (bytes_per_block + extra_per_block)


def patch_memory_planning() -> None:
    """Make the engine core plan vLLM's KV pool with kvkit's per-block tensors counted. Idempotent;
    a pass-through when no kvkit policy is configured."""
    import vllm.v1.engine.core as core
    from vllm.v1.core import kv_cache_utils

    from kvkit.integrations.vllm import plugin

    original = core.get_kv_cache_configs
    if getattr(original, "_kvkit", False):
        return

    def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory):
        policy = plugin.active_policy() or plugin.policy_from_vllm_config(vllm_config)
        if policy is not None:
            model = vllm_config.model_config
            key_itemsize = model.dtype.itemsize  # the bounds keep the incoming keys' dtype
            model_heads = model.get_total_num_kv_heads()
            scaled = []
            for specs, avail in zip(kv_cache_specs, available_memory):
                extra = sum(extra_bytes_per_block(policy, name, spec, model_heads, key_itemsize)
                            for name, spec in specs.items())
                groups = kv_cache_utils.get_kv_cache_groups(vllm_config, dict(specs)) if extra else []
                per_block = kv_cache_utils._pool_bytes_per_block(vllm_config, groups) if groups else 0
                scaled.append(scaled_memory(avail, per_block, extra))
                if per_block:
                    logger.info("kvkit: %d bytes of page summaries per %d-byte KV block; vLLM plans the pool "
                                "from %d of the %d bytes given", extra, per_block, scaled[-1], avail)
            available_memory = scaled
        return original(vllm_config, kv_cache_specs, available_memory)

    get_kv_cache_configs._kvkit = True
    core.get_kv_cache_configs = get_kv_cache_configs
