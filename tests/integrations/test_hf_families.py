"""Which transformers families KVKitCache decodes exactly as transformers does, and which it
refuses at `KVKitCache(...)` because kvkit's attention would compute something else.

Tiny random models from the config classes (`kvkit.testing.tiny_config`), no download. The
reference is the eager attention of transformers with a `DynamicCache`: it is the model's
definition (transformers' SDPA path drops Gemma2's softcap, for one).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, T5Config

from kvkit.integrations.hf import KVKitCache
from kvkit.integrations.hf import cache as hf_cache
from kvkit.testing import tiny_config

FULL = ["full_attention", "full_attention"]
SUPPORTED = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": None}),
    "mistral-window-of-whole-context": ("mistral", {"sliding_window": 512}),  # = max_position_embeddings
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),  # q/k norms before RoPE
    "phi3": ("phi3", {}),  # fused qkv
    # no softcap, no sliding layers; scaling = query_pre_attn_scalar**-0.5, not head_dim**-0.5
    "gemma2-plain": ("gemma2", {"attn_logit_softcapping": None, "layer_types": FULL,
                                "query_pre_attn_scalar": 64}),
}
REFUSED = {
    "mistral-sliding": ("mistral", {"sliding_window": 16}, r"MistralConfig\.sliding_window=16"),
    "qwen2-sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
                      r"Qwen2Config\.sliding_window=16"),
    "gemma2": ("gemma2", {}, r"Gemma2Config\.attn_logit_softcapping=50\.0: kvkit's attention has no logit softcap"),
    "gemma2-sliding": ("gemma2", {"attn_logit_softcapping": None, "sliding_window": 16},
                       r"Gemma2Config\.sliding_window=16"),
    "qwen3-chunked": ("qwen3", {"layer_types": ["full_attention", "chunked_attention"]},
                      r"Qwen3Config\.layer_types has \['chunked_attention'\]"),
    "deepseek_v3": ("deepseek_v3", {}, r"DeepseekV3Config\.kv_lora_rank=16: multi-head latent attention"),
}


def model_of(family: str, overrides: dict):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation="eager").eval()


def generate(model, cache):
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    return model.generate(ids, past_key_values=cache, max_new_tokens=20, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("case", list(SUPPORTED))
def test_dense_generate_equals_dynamic_cache(case):
    model = model_of(*SUPPORTED[case])
    expected = generate(model, DynamicCache(config=model.config))
    got = generate(model, KVKitCache(model, "dense", page_size=8))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("case", list(REFUSED))
def test_model_kvkit_would_decode_differently_is_refused(case):
    family, overrides, match = REFUSED[case]
    model = model_of(family, overrides)
    with pytest.raises(NotImplementedError, match=match + r".*use transformers' own cache"):
        KVKitCache(model, "dense")
    assert model.config._attn_implementation == "eager"  # refused before switching the model


def test_encoder_decoder_is_refused():
    with pytest.raises(NotImplementedError, match=r"T5Config\.is_encoder_decoder=True"):
        KVKitCache(T5Config(num_layers=2, d_model=64, num_heads=4, d_kv=16))


@pytest.mark.parametrize("family,overrides", [("mistral", {"sliding_window": 16}),
                                              ("gemma2", {"attn_logit_softcapping": 1.0, "layer_types": FULL})])
def test_what_is_refused_would_really_differ(monkeypatch, family, overrides):
    # Without the check, kvkit decodes these wrongly without a word: the reason to refuse them.
    model = model_of(family, overrides)
    monkeypatch.setattr(hf_cache, "check_supported", lambda config: None)
    expected = generate(model, DynamicCache(config=model.config))  # before KVKitCache switches attention
    assert not torch.equal(generate(model, KVKitCache(model, "dense", page_size=8)), expected)
