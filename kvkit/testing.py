"""Helpers shared by tests and benchmarks: random paged cases, tolerances, a tiny Llama,
tiny random configs of other transformers families, a prose text that ships with kvkit."""

from __future__ import annotations

import torch

# English prose that ships with kvkit (the Apache-2.0 license, ~11K characters, ~2.6K SmolLM2
# tokens; `kvkit ppl`'s default), so that no test or benchmark depends on one OS image's files.
from kvkit.cli import DEFAULT_TEXT as SHIPPED_TEXT


def shipped_text(chars: int | None = None) -> str:
    """The first `chars` characters of `SHIPPED_TEXT` (all of it when None), repeated as needed."""
    text = SHIPPED_TEXT.read_text()
    if chars is None:
        return text
    return (text * -(-chars // len(text)))[:chars]

# (atol, rtol) per dtype for attention outputs against the float32 reference.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def random_paged_case(seq_len: int, num_qo_heads: int, num_kv_heads: int, head_dim: int = 64,
                      page_size: int = 16, budget_pages: int | None = None, batch: int = 2,
                      shuffle_pages: bool = True, dtype: torch.dtype = torch.float32,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """A decode case in the layout of `sparse_decode_ref`: a page pool with `batch` sequences.

    Each (sequence, KV head) holds `seq_len` tokens in its own pages, placed at random physical
    slots when `shuffle_pages`; it selects `budget_pages` of them at random (all when None).
    Returns q `[B, Hq, D]`, k_cache/v_cache `[N, S, D]`, page_table `[B, Hkv, P]` (-1 padded),
    slot_valid `[N, S]`, plus dense k/v `[B, Hkv, L, D]` and the selected token mask `[B, Hkv, L]`.
    """
    g = torch.Generator().manual_seed(seed)
    pages_per_head = -(-seq_len // page_size)
    num_pages = max(1, batch * num_kv_heads * pages_per_head)
    order = torch.randperm(num_pages, generator=g) if shuffle_pages else torch.arange(num_pages)
    k_cache = torch.randn(num_pages, page_size, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_pages, page_size, head_dim, generator=g).to(dtype)
    slot_valid = torch.zeros(num_pages, page_size, dtype=torch.bool)
    budget = pages_per_head if budget_pages is None else min(budget_pages, pages_per_head)
    page_table = torch.full((batch, num_kv_heads, max(budget, 0)), -1, dtype=torch.int64)
    dense_k = torch.zeros(batch, num_kv_heads, pages_per_head * page_size, head_dim, dtype=dtype)
    dense_v = torch.zeros_like(dense_k)
    selected = torch.zeros(batch, num_kv_heads, pages_per_head * page_size, dtype=torch.bool)
    i = 0
    for b in range(batch):
        for h in range(num_kv_heads):
            own = order[i:i + pages_per_head]
            i += pages_per_head
            for j, page in enumerate(own.tolist()):
                filled = min(page_size, seq_len - j * page_size)
                slot_valid[page, :filled] = True
                dense_k[b, h, j * page_size:(j + 1) * page_size] = k_cache[page]
                dense_v[b, h, j * page_size:(j + 1) * page_size] = v_cache[page]
            pick = torch.randperm(pages_per_head, generator=g)[:budget]
            page_table[b, h, :budget] = own[pick]
            for j in pick.tolist():
                filled = min(page_size, seq_len - j * page_size)
                selected[b, h, j * page_size:j * page_size + filled] = True
    q = torch.randn(batch, num_qo_heads, head_dim, generator=g).to(dtype)
    return {"q": q, "k_cache": k_cache, "v_cache": v_cache, "page_table": page_table,
            "slot_valid": slot_valid, "dense_k": dense_k, "dense_v": dense_v, "selected": selected}


def random_store(lengths, num_kv_heads: int = 3, head_dim: int = 16, page_size: int = 8, seed: int = 0,
                 scale: float = 0.1, dtype: torch.dtype = torch.float32):
    """A one-layer store (of `dtype`) with key bounds holding one random sequence per entry of
    `lengths` (keys scaled by `scale`); returns (store, seq ids). For selector tests."""
    from kvkit.store import PagedKVStore
    g = torch.Generator().manual_seed(seed)
    store = PagedKVStore(1, num_kv_heads, head_dim, page_size=page_size, dtype=dtype, key_bounds=True)
    seqs = []
    for n in lengths:
        seq = store.add_sequence()
        store.append(seq, 0, scale * torch.randn(n, num_kv_heads, head_dim, generator=g),
                     torch.randn(n, num_kv_heads, head_dim, generator=g))
        seqs.append(seq)
    return store, seqs


def tiny_llama_config(**overrides):
    """A small random Llama (GQA 3:1 like SmolLM2) for fast integration tests."""
    from transformers import LlamaConfig
    params = dict(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=1024, rope_theta=10000.0, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    params.update(overrides)
    return LlamaConfig(**params)


def tiny_llama_generate(policy: str = "dense", page_size: int = 8, new_tokens: int = 12, **params):
    """Greedy tokens of a seeded tiny random Llama (`tiny_llama_config`) on two seeded
    120-token prompts, through `KVKitCache(model, policy, page_size, **params)`.
    Returns (tokens `[2, 120 + new_tokens]`, the cache)."""
    from transformers import LlamaForCausalLM

    from kvkit.integrations.hf import KVKitCache
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    ids = torch.randint(3, 256, (2, 120), generator=torch.Generator().manual_seed(0))
    cache = KVKitCache(model, policy, page_size=page_size, **params)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out, cache


# Per family: the transformers config class and what a tiny random model of it needs beyond
# the shared shape (vocab 256, hidden 64, 2 layers, 4 query / 2 KV heads of 16 dims).
TINY_FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "gemma2": ("Gemma2Config", {"query_pre_attn_scalar": 16}),  # = head_dim (default 256)
    "phi3": ("Phi3Config", {}),
    # multi-head latent attention (keys and values through a rank-16 latent), a small MoE
    "deepseek_v3": ("DeepseekV3Config", {"kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8,
                                         "qk_nope_head_dim": 8, "v_head_dim": 16, "head_dim": 8,
                                         "num_key_value_heads": 4, "n_routed_experts": 4,
                                         "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
                                         "moe_intermediate_size": 32, "first_k_dense_replace": 1}),
}


def tiny_config(family: str, **overrides):
    """A tiny random-weight config of a transformers model family (one of `TINY_FAMILIES`),
    built from its config class without a download; `overrides` replace any field.

    Example: `AutoModelForCausalLM.from_config(tiny_config("qwen3"))`.
    """
    import transformers
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    cls_name, extra = TINY_FAMILIES[family]
    params = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                  initializer_range=0.1)  # peaked attention, so a wrong scale or cap changes tokens
    params.update(extra)
    params.update(overrides)
    return getattr(transformers, cls_name)(**params)

