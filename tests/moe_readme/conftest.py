"""Fixtures: a tiny random Llama saved as an HF folder (with SmolLM2's tokenizer), so the MoE
machinery runs in milliseconds; the embedded SmolLM2 where the real model matters."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the machine's two cores are shared


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Folder of a 2-layer random Llama: hidden 64, intermediate 96, 4/2 heads."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kvkit.models import smollm2

    tok = AutoTokenizer.from_pretrained(smollm2())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger MLP weights, so routing choices change the logits visibly
        for layer in model.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _random_part(num_layers: int, inter: int, num_experts: int, shared: int = 0, seed: int = 0):
    from kvkit.moe.readme.extract import random_partition

    parts = [random_partition(inter, num_experts, shared, seed=seed + i) for i in range(num_layers)]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


@pytest.fixture(scope="session")
def random_part():
    """random_part(num_layers, inter, num_experts, shared=0, seed=0) -> ([L, E, m], [L, s])."""
    return _random_part
