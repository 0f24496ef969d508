"""The plugin's configuration and registration, without starting an engine."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this environment; "
                    "run `make test-vllm`")

from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402

from kvkit.errors import ConfigError  # noqa: E402
from kvkit.integrations.vllm import plugin  # noqa: E402
from kvkit.integrations.vllm.layers import layer_index  # noqa: E402


@pytest.fixture
def clean(monkeypatch):
    monkeypatch.setattr(plugin, "_registered", None)
    monkeypatch.delenv(plugin.ENV_ALIAS, raising=False)
    AttentionBackendEnum.CPU_ATTN.clear_override()
    yield monkeypatch
    AttentionBackendEnum.CPU_ATTN.clear_override()


def test_unset_policy_leaves_vllm_stock(clean):
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    clean.delenv(plugin.ENV, raising=False)
    plugin.register()
    assert plugin.active_policy() is None
    # CPU_ATTN resolves through kvkit, which hands back vLLM's own class with no kvkit config
    assert AttentionBackendEnum.CPU_ATTN.get_path() == plugin.CONFIGURED_PATH
    assert AttentionBackendEnum.CPU_ATTN.get_class() is CPUAttentionBackend
    assert plugin.active_policy() is None


class _Config:  # what the resolver reads of vLLM's config
    def __init__(self, additional_config):
        self.additional_config = additional_config


@pytest.mark.parametrize("extra,name", [
    ({}, None), ({"kvkit": None}, None), ({"other": 1}, None),
    ({"kvkit": "quest"}, "quest"),
    ({"kvkit": {"name": "quest", "params": {"budget": 128}}}, "quest"),
])
def test_policy_from_additional_config(extra, name):
    policy = plugin.policy_from_vllm_config(_Config(extra))
    assert (policy.name if policy else None) == name


@pytest.mark.parametrize("extra,error", [
    ({"kvkit": 3}, "policy name, a policy config object"),
    ({"kvkit": "no_such_policy"}, "no_such_policy"),
    ({"kvkit": {"name": "quest", "params": {"budget": -1}}}, "budget"),
])
def test_bad_additional_config_says_what_is_wrong(extra, error):
    with pytest.raises(ConfigError, match=error):
        plugin.policy_from_vllm_config(_Config(extra))


def test_configured_backend_resolves_from_the_current_vllm_config(clean):
    from vllm.config import VllmConfig, set_current_vllm_config

    clean.delenv(plugin.ENV, raising=False)
    plugin.register()
    with set_current_vllm_config(VllmConfig(additional_config={"kvkit": "dense"})):
        cls = AttentionBackendEnum.CPU_ATTN.get_class()
    assert cls.__name__ == "KVKitCPUAttentionBackend"
    assert plugin.active_policy().name == "dense"
    with pytest.raises(ConfigError, match="already active"):
        plugin.install(plugin.load_policy("quest"), "a second config")


def test_engines_in_one_process_resolve_their_own_backend(clean):
    """vLLM caches resolved backend classes by head size, dtype, ...; without the kvkit entry in
    that key a second in-process engine would get the first one's class (fails unpatched: every
    call below then answers with the first class)."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.v1.attention import selector

    clean.delenv(plugin.ENV, raising=False)
    plugin.register()

    def resolve(extra: dict) -> str:
        with set_current_vllm_config(VllmConfig(additional_config=extra)):
            return selector.get_attn_backend(64, torch.bfloat16, None).__name__

    assert [resolve({}), resolve({"kvkit": "dense"}), resolve({})] == [
        "CPUAttentionBackend", "KVKitCPUAttentionBackend", "CPUAttentionBackend"]


def test_kvkit_config_is_an_alias_and_a_conflict_is_an_error(clean, tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"name": "quest", "params": {"budget": 64}}))
    clean.delenv(plugin.ENV, raising=False)
    clean.setenv(plugin.ENV_ALIAS, str(path))
    assert plugin.load_policy().selector.budget == 64
    clean.setenv(plugin.ENV, "dense")
    with pytest.raises(ConfigError, match="disagree"):
        plugin.load_policy()


def test_register_installs_kvkit_backend_and_is_idempotent(clean):
    clean.setenv(plugin.ENV, "dense")
    plugin.register()
    plugin.register()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == plugin.BACKEND_PATH
    cls = AttentionBackendEnum.CPU_ATTN.get_class()
    assert cls.__name__ == "KVKitCPUAttentionBackend" and cls.get_name() == "CPU_ATTN"
    assert plugin.active_policy().name == "dense"


def test_register_refuses_a_different_policy_in_the_same_process(clean):
    clean.setenv(plugin.ENV, "dense")
    plugin.register()
    clean.setenv(plugin.ENV, "quest")
    with pytest.raises(ConfigError, match="policy 'dense' is already active"):
        plugin.register()


@pytest.mark.parametrize("value,name", [
    ("quest", "quest"),
    ('{"name": "quest", "params": {"budget": 256}}', "quest"),
    ("  dense ", "dense"),
])
def test_load_policy_accepts_name_and_json(value, name):
    assert plugin.load_policy(value).name == name


def test_load_policy_reads_a_file(tmp_path):
    from kvkit import policies

    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policies.get("quest", budget=512).to_config()))
    assert plugin.load_policy(str(path)).selector.budget == 512


@pytest.mark.parametrize("value,err,match", [
    ("qeust", ConfigError, "unknown policy 'qeust'"),
    ("{not json", ConfigError, "KVKIT_POLICY is not valid JSON"),
    ('{"name": "quest", "params": {"budgt": 1}}', ConfigError, "budgt"),
    ("gear", NotImplementedError, "does not run GearCodec"),
    ('{"name": "h2o", "params": {"prefill": "chunk"}}', NotImplementedError, "prefill=.end."),
])
def test_load_policy_rejects_bad_or_unsupported(value, err, match):
    with pytest.raises(err, match=match):
        plugin.load_policy(value)


def test_a_tuned_policy_with_quantized_layers_is_refused_by_name(tmp_path):
    # kvkit's codecs do not run in vLLM yet: a tuned file that quantizes says so before any engine starts
    from kvkit.tools.tune import build_policy
    from kvkit.tools.tune_alloc import Allocation

    alloc = Allocation(codec=(1,) + (0,) * 29, window=((0, 1, 0),) * 30, loss=0.0, nbytes=0.0)
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(build_policy(alloc, ["bf16", "q4"], [None, 128], 16, 32, (30, 3)).to_config()))
    with pytest.raises(NotImplementedError, match="does not run GearCodec .policy 'tuned'"):
        plugin.load_policy(str(path))


def test_layer_index_from_vllm_layer_names():
    assert layer_index("model.layers.17.self_attn.attn") == 17
    with pytest.raises(ValueError, match="layer index"):
        layer_index("lm_head")


@pytest.mark.parametrize("extra", [{"kvkit_budget": b} for b in (0, -5, "512", 1.5, True)]
                         + [{"kvkit_budget_bytes": 0}, {"kvkit_budget": 512, "kvkit_budget_bytes": 1 << 20}])
def test_a_bad_request_budget_is_the_clients_error(clean, extra):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    clean.delenv(plugin.ENV, raising=False)
    plugin.register()
    with pytest.raises(VLLMValidationError, match="kvkit_budget"):
        SamplingParams(extra_args=extra)
    for good in ({"kvkit_budget": 512}, {"kvkit_budget_bytes": 1 << 20}, {"other": "x"}):
        assert SamplingParams(extra_args=good).extra_args == good


@pytest.mark.parametrize("name, boxes", [("quest", False), ("lserve", True)])
def test_memory_planning_counts_what_the_backend_allocates(name, boxes):
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kvkit.integrations.vllm.memory import extra_bytes_per_block, scaled_memory
    from kvkit.integrations.vllm.selection import empty_bounds

    policy = plugin.load_policy(name)  # dense layers 0-1, page selection from layer 2
    spec = FullAttentionSpec(block_size=32, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)
    # what KVKitCPUAttentionImpl._update_bounds allocates per block (3 KV heads): 8-token sub-pages
    bounds = empty_bounds(3, 32 // 8, 64, torch.bfloat16)
    want = bounds.nbytes + (bounds[:, 0].nbytes if boxes else 0)
    assert extra_bytes_per_block(policy, "model.layers.2.self_attn.attn", spec, 3, 2) == want
    assert extra_bytes_per_block(policy, "model.layers.1.self_attn.attn", spec, 3, 2) == 0
    assert extra_bytes_per_block(plugin.load_policy("dense"), "model.layers.2.self_attn.attn", spec, 3, 2) == 0
    per_block, extra = spec.page_size_bytes * 30, want * 28
    blocks = scaled_memory(64 << 20, per_block, extra) // per_block
    assert blocks * (per_block + extra) <= 64 << 20 < (blocks + 1) * (per_block + extra)
    assert scaled_memory(64 << 20, per_block, 0) == 64 << 20


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A config-only Llama folder (3 layers, 2 KV heads): enough for vLLM's ModelConfig."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=256).save_pretrained(path)
    return path


def _builder(model_dir, policy_config):
    import torch
    from vllm.config import ModelConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kvkit.integrations.vllm.metadata import KVKitCPUAttentionMetadataBuilder

    vllm_config = VllmConfig(model_config=ModelConfig(model=str(model_dir), skip_tokenizer_init=True,
                                                      dtype="bfloat16"),
                             additional_config={"kvkit": policy_config})
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=16, dtype=torch.bfloat16)
    return KVKitCPUAttentionMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], vllm_config,
                                            torch.device("cpu"))


@pytest.mark.parametrize("policy_config, match", [
    ("duo", r"made for 30 layers x 3 KV heads; the model has 3 layers x 2 KV heads"),
    ({"name": "r", "rules": [{"layers": [7], "evictor": {"type": "sink_window", "sink": 4, "window": 64}}]},
     r"rules\[0\]\.layers names 7, but the model has 3 layers"),
    ({"name": "r", "rules": [{"heads": [2], "evictor": {"type": "sink_window", "sink": 4, "window": 64}}]},
     r"rules\[0\]\.heads names 2, but the model has 3 layers x 2 KV heads"),
])
def test_metadata_builder_refuses_a_policy_for_another_model_shape(clean, tiny_model_dir, policy_config, match):
    clean.delenv(plugin.ENV, raising=False)
    with pytest.raises(ConfigError, match=match):
        _builder(tiny_model_dir, policy_config)


def test_metadata_builder_takes_a_policy_that_fits(clean, tiny_model_dir):
    clean.delenv(plugin.ENV, raising=False)
    fits = {"name": "r", "rules": [{"layers": [2], "heads": [1],
                                    "evictor": {"type": "sink_window", "sink": 4, "window": 64}}]}
    assert _builder(tiny_model_dir, fits).policy.name == "r"
