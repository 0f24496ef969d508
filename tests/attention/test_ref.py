import pytest
import torch
import torch.nn.functional as F

from kvkit import policies
from kvkit.attention import PagedAttention, decode, sparse_decode_ref
from kvkit.store import Selection
from kvkit.testing import TOL, random_paged_case


def dense_attention(q, k, v, mask):
    """q [B, Hq, D]; k, v [B, Hkv, L, D]; mask [B, Hkv, L] -> SDPA over the masked tokens."""
    G = q.shape[1] // k.shape[1]
    attn_mask = mask.repeat_interleave(G, dim=1)[:, :, None]  # [B, Hq, 1, L]
    out = F.scaled_dot_product_attention(q.float()[:, :, None], k.float(), v.float(), attn_mask=attn_mask,
                                         enable_gqa=True)
    return out[:, :, 0]


@pytest.mark.parametrize("seq_len", [1, 15, 16, 17, 97])
@pytest.mark.parametrize("num_qo_heads,num_kv_heads", [(4, 4), (9, 3), (8, 2)])
def test_all_pages_selected_equals_sdpa(seq_len, num_qo_heads, num_kv_heads):
    case = random_paged_case(seq_len, num_qo_heads, num_kv_heads, page_size=16, seed=seq_len)
    out, lse = sparse_decode_ref(case["q"], case["k_cache"], case["v_cache"], case["page_table"],
                                 case["slot_valid"])
    ref = dense_attention(case["q"], case["dense_k"], case["dense_v"], case["selected"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("budget_pages", [1, 3])
def test_subset_of_pages_equals_sdpa_over_those_tokens(budget_pages):
    case = random_paged_case(70, 9, 3, page_size=16, budget_pages=budget_pages, seed=1)
    out, _ = sparse_decode_ref(case["q"], case["k_cache"], case["v_cache"], case["page_table"],
                               case["slot_valid"])
    ref = dense_attention(case["q"], case["dense_k"], case["dense_v"], case["selected"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_empty_selection_gives_zeros_and_minus_inf_lse():
    case = random_paged_case(20, 9, 3, page_size=16, budget_pages=0)
    out, lse = sparse_decode_ref(case["q"], case["k_cache"], case["v_cache"], case["page_table"],
                                 case["slot_valid"])
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_over_store_matches_reference(dtype):
    torch.manual_seed(0)
    store = policies.get("dense").make_store(1, 3, 64, page_size=16, dtype=dtype)
    seqs = [store.add_sequence(), store.add_sequence()]
    lengths = [37, 5]
    for seq, n in zip(seqs, lengths):
        store.append(seq, 0, torch.randn(n, 3, 64).to(dtype), torch.randn(n, 3, 64).to(dtype))
    q = torch.randn(2, 9, 64).to(dtype)
    out, _ = decode(q, store, seqs, 0, Selection(store.page_tables(seqs, 0)))
    for b, seq in enumerate(seqs):
        k = torch.stack([store.read(seq, 0, h)[1] for h in range(3)])[None]  # [1, 3, n, D]
        v = torch.stack([store.read(seq, 0, h)[2] for h in range(3)])[None]
        ref = dense_attention(q[b:b + 1], k, v, torch.ones(1, 3, lengths[b], dtype=torch.bool))
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(out[b:b + 1].float(), ref, atol=atol, rtol=rtol)


def test_decode_rejects_bad_query_shape():
    store = policies.get("dense").make_store(1, 3, 64)
    seq = store.add_sequence()
    store.append(seq, 0, torch.randn(4, 3, 64), torch.randn(4, 3, 64))
    with pytest.raises(ValueError, match=r"q must be \[num_seqs, num_qo_heads, head_dim\] = \[1, Hq, 64\], got \[1, 64, 9\]"):
        decode(torch.randn(1, 64, 9), store, [seq], 0, Selection(store.page_tables([seq], 0)))


def test_paged_attention_dense_equals_causal_sdpa_through_decode():
    torch.manual_seed(0)
    B, Hq, Hkv, D, T = 2, 9, 3, 32, 40
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    attn = PagedAttention(Hq, Hkv, D, policy="dense", page_size=8)
    outs = [attn(q[:, :, :30], k[:, :, :30], v[:, :, :30])]  # prefill
    outs += [attn(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]) for t in range(30, 35)]  # decode
    outs.append(attn(q[:, :, 35:], k[:, :, 35:], v[:, :, 35:]))  # a second multi-token step
    torch.testing.assert_close(torch.cat(outs, dim=2), ref, atol=1e-5, rtol=1e-5)


def test_paged_attention_streaming_matches_windowed_sdpa():
    torch.manual_seed(1)
    Hq, Hkv, D, T, sink, window = 4, 2, 16, 60, 2, 10
    q, k, v = torch.randn(1, Hq, T, D), torch.randn(1, Hkv, T, D), torch.randn(1, Hkv, T, D)
    attn = PagedAttention(Hq, Hkv, D, policy=policies.get("streaming", sink=sink, window=window), page_size=4)
    attn(q[:, :, :20], k[:, :, :20], v[:, :, :20])
    for t in range(20, T):
        out = attn(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        keep = torch.zeros(t + 1, dtype=torch.bool)
        keep[:sink] = True
        keep[max(0, t - window):] = True  # the window kept after the last step, plus the token just written
        ref = F.scaled_dot_product_attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1],
                                             attn_mask=keep[None, None, None], enable_gqa=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert attn.store.num_resident(attn.seqs[0], 0, 0) == sink + window


def test_paged_attention_takes_the_models_layer_count_for_a_whole_model_policy():
    """SmolLM2's duo pattern names 30 layers x 3 KV heads: a one-layer store of its own is
    refused (the pattern was not made for it); with num_layers=30 layer 17 runs it."""
    from kvkit import ConfigError
    with pytest.raises(ConfigError, match="30"):
        PagedAttention(9, 3, 16, policy="duo", layer=0)
    attn = PagedAttention(9, 3, 16, policy="duo", layer=17, num_layers=30, page_size=8)
    q, k, v = torch.randn(1, 9, 12, 16), torch.randn(1, 3, 12, 16), torch.randn(1, 3, 12, 16)
    assert attn(q, k, v).shape == (1, 9, 12, 16)
    with pytest.raises(ValueError, match=r"layer must be in \[0, num_layers=30\)"):
        PagedAttention(9, 3, 16, policy="duo", layer=30, num_layers=30)
