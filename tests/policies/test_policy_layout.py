"""A policy's rules and duo pattern are checked against the model (or store) when the cache or
store is made, so nothing a policy names is silently ignored or put on the wrong heads."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from kvkit import policies
from kvkit.errors import ConfigError
from kvkit.integrations.hf import KVKitCache
from kvkit.policies.base import Policy, Rule
from kvkit.policies.duo import DuoPattern
from kvkit.policies.evictors.sink_window import SinkWindowEvictor
from kvkit.testing import tiny_llama_config

STREAM = SinkWindowEvictor(sink=2, window=8)
TINY = "the model has 3 layers x 2 KV heads"  # tiny_llama_config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def duo_policy(tmp_path, num_layers: int, num_kv_heads: int) -> Policy:
    """Retrieval heads: (0, 0) and every head 2; the rest stream."""
    gates = [[1.0 if h == 2 or (layer, h) == (0, 0) else 0.0 for h in range(num_kv_heads)]
             for layer in range(num_layers)]
    path = DuoPattern("toy", num_layers, num_kv_heads, gates, sink=2, window=8).save(tmp_path / "p.json")
    return policies.get("duo", pattern=str(path), threshold=0.5)


def rules_fit(policy: Policy, num_layers: int, num_kv_heads: int) -> bool:
    return all(max(r.layers or [0]) < num_layers and max(r.heads or [0]) < num_kv_heads for r in policy.rules)


@pytest.mark.parametrize("rule,match", [
    (Rule(layers=(100,), evictor=STREAM), rf"rules\[1\]\.layers names 100, but {TINY}"),
    (Rule(heads=(2,), evictor=STREAM), rf"rules\[1\]\.heads names 2, but {TINY}"),
])
def test_rule_beyond_the_model_is_refused(tiny, rule, match):
    policy = Policy(rules=(Rule(layers=(0,), evictor=STREAM), rule))
    with pytest.raises(ConfigError, match=match):
        policy.make_store(3, 2, 16)
    with pytest.raises(ConfigError, match=match):
        KVKitCache(tiny, policy)


def test_smollm2_duo_pattern_on_a_tiny_model_is_refused_at_kvkit_cache(tiny):
    tiny.set_attn_implementation("sdpa")
    with pytest.raises(ConfigError, match=rf"policy 'duo' was made for 30 layers x 3 KV heads; {TINY}\. "
                                          r"Build the policy for this model"):
        KVKitCache(tiny, "duo")
    assert tiny.config._attn_implementation == "sdpa"  # refused before switching the model


@pytest.mark.parametrize("shape", [(2, 2), (3, 3)])  # fewer layers; more heads
def test_duo_pattern_of_another_shape_is_refused_where_its_rules_fit(tmp_path, tiny, shape):
    # A 2x2 pattern names layers 0-1 only; a 3x3 one whose head 2 is all retrieval names heads
    # 0-1 only: the rules fit the 3x2 model, the pattern does not.
    policy = duo_policy(tmp_path, *shape)
    assert policy.rules and rules_fit(policy, 3, 2)
    with pytest.raises(ConfigError, match=rf"made for {shape[0]} layers x {shape[1]} KV heads; {TINY}"):
        KVKitCache(tiny, policy)


def test_policy_that_fits_is_accepted_and_runs(tmp_path, tiny):
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    custom = Policy(rules=(Rule(layers=(0, 2), heads=(1,), evictor=STREAM),))
    for policy in (custom, duo_policy(tmp_path, 3, 2)):
        out = tiny.generate(ids, past_key_values=KVKitCache(tiny, policy, page_size=4), max_new_tokens=4,
                            do_sample=False, pad_token_id=0)
        assert out.shape == (1, 34)
        assert policy.make_store(3, 2, 16).num_layers == 3


def test_model_shape_round_trips_and_is_validated(tmp_path):
    policy = duo_policy(tmp_path, 3, 2)
    assert policy.model_shape == (3, 2)
    cfg = json.loads(json.dumps(policy.to_config()))
    assert cfg["model_shape"] == [3, 2] and Policy.from_config(cfg) == policy
    assert "model_shape" not in policies.get("dense").to_config()
    with pytest.raises(ConfigError, match=r"model_shape must be \(num_layers, num_kv_heads\).*got \[3\]"):
        Policy.from_config({**cfg, "model_shape": [3]})
