"""Fixtures shared by the MoE tests."""

from __future__ import annotations

import pytest
import torch

from kvkit.moe.synth import simple_trace
from kvkit.moe.trace import Trace


@pytest.fixture
def trace() -> Trace:
    return simple_trace()


# -- tiny random-weight MoE models for the offloading tests ---------------------------------
def _mixtral():
    transformers = _transformers()
    cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                     num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=128)
    return transformers.MixtralForCausalLM(cfg)


def _qwen2_moe():
    transformers = _transformers()
    cfg = transformers.Qwen2MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                      moe_intermediate_size=48, shared_expert_intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                                      max_position_embeddings=128)
    return transformers.Qwen2MoeForCausalLM(cfg)


def _olmoe():
    transformers = _transformers()
    cfg = transformers.OlmoeConfig(vocab_size=96, hidden_size=64, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, num_experts=8, num_experts_per_tok=3,
                                   max_position_embeddings=128)
    return transformers.OlmoeForCausalLM(cfg)


def _tiny_readme():
    transformers = _transformers()
    from kvkit.moe.readme import model as readme   # imports transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    E, s = 4, 8
    m = (64 - s) // E
    perms = [torch.randperm(64) for _ in range(3)]
    neurons = torch.stack([p[:E * m].reshape(E, m) for p in perms])
    shared = torch.stack([p[E * m:] for p in perms])
    moe = readme.ReadME(dense, readme.MoEConfig(num_experts=E, top_k=2, shared_neurons=s,
                                                 router="pregate", pregate_width=16,
                                                 layer_router_hidden=0, pregate_window=2),
                        "tiny-llama", (neurons, shared))
    return moe


def _transformers():
    return pytest.importorskip("transformers")


@pytest.fixture
def moe_builders() -> dict:
    """name -> function building a tiny random MoE (transformers' Mixtral, Qwen2-MoE, OLMoE, or
    the Read-ME model of `kvkit.moe.readme` over a tiny Llama)."""
    return {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "olmoe": _olmoe,
            "readme": _tiny_readme}
