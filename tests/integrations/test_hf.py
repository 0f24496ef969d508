import pytest
import torch
from transformers import LlamaForCausalLM

from kvkit import policies
from kvkit.integrations.hf import KVKitCache
from kvkit.testing import tiny_llama_config


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = LlamaForCausalLM(tiny_llama_config()).eval()
    ref.set_attn_implementation("sdpa")
    kv = LlamaForCausalLM(tiny_llama_config()).eval()
    kv.load_state_dict(ref.state_dict())
    return ref, kv


def prompt(batch=1, length=50, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_dense_generate_equals_transformers(models):
    ref, kv = models
    ids = prompt(batch=2)
    expected = ref.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0)
    cache = KVKitCache(kv, "dense", page_size=8)
    got = kv.generate(ids, past_key_values=cache, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
    assert cache.store.length(cache.seqs[0], 0) == 50 + 29  # the last token is never fed back


def test_dense_logits_match_each_step(models):
    ref, kv = models
    ids = prompt(length=40)
    cache = KVKitCache(kv, "dense")
    out_ref = ref(ids[:, :30], use_cache=True)
    out_kv = kv(ids[:, :30], past_key_values=cache, use_cache=True)
    past = out_ref.past_key_values
    torch.testing.assert_close(out_kv.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    for t in range(30, 40):
        a = ref(ids[:, t:t + 1], past_key_values=past, use_cache=True)
        b = kv(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        past = a.past_key_values
        torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_unpadded_runs(models):
    _, kv = models
    short, long = prompt(length=20, seed=1), prompt(length=32, seed=2)
    ids = torch.cat([torch.cat([torch.zeros(1, 12, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :12] = 0
    cache = KVKitCache(kv, "dense")
    batched = kv.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=10,
                          do_sample=False, pad_token_id=0)
    assert cache.store.num_resident(cache.seqs[0], 0, 0) == 20 + 9  # padding evicted
    alone = kv.generate(short, past_key_values=KVKitCache(kv, "dense"), max_new_tokens=10,
                        do_sample=False, pad_token_id=0)
    assert torch.equal(batched[0, 12:], alone[0])


def test_streaming_store_stops_growing_once_window_is_full(models):
    _, kv = models
    cache = KVKitCache(kv, policies.get("streaming", sink=4, window=32), page_size=8)
    ids = prompt(length=20)
    out = kv(ids, past_key_values=cache, use_cache=True)
    sizes = []
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(120):
        out = kv(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        sizes.append(cache.nbytes())
    assert sizes[-1] == sizes[40]  # flat once 4 + 32 tokens are resident
    dense = KVKitCache(kv, "dense", page_size=8)
    kv(torch.cat([ids, torch.zeros(1, 120, dtype=torch.long)], 1), past_key_values=dense, use_cache=True)
    assert cache.nbytes() < dense.nbytes() / 2
    assert cache.store.num_resident(cache.seqs[0], 2, 1) == 36


def test_model_switched_to_kvkit_still_works_without_the_cache(models):
    ref, kv = models
    KVKitCache(kv)  # switches the attention implementation
    ids = prompt()
    torch.testing.assert_close(kv(ids, use_cache=False).logits, ref(ids, use_cache=False).logits)


def test_cache_rejects_a_new_batch_size(models):
    _, kv = models
    cache = KVKitCache(kv)
    kv(prompt(batch=2), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="holds 2 sequences, the batch has 1"):
        kv(prompt(batch=1), past_key_values=cache, use_cache=True)


def test_bad_policy_arguments(models):
    _, kv = models
    with pytest.raises(ValueError, match="unknown policy 'qeust'"):
        KVKitCache(kv, "qeust")
    with pytest.raises(ValueError, match="only apply to a policy given by name"):
        KVKitCache(kv, policies.get("dense"), window=3)
