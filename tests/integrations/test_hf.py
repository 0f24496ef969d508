import math

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
    # dense was compacted after its one prefill; give the streaming pool's decode-time growth
    # slack (16 pages at least per growth, large next to this tiny model) back the same way
    cache.store.compact()
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


def test_metrics_follow_a_real_decode(models):
    from prometheus_client import REGISTRY

    _, kv = models

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = value("kvkit_pages_read_total", policy="streaming", layer_group="all")
    cache = KVKitCache(kv, policies.get("streaming", sink=4, window=16), page_size=8, metrics=True,
                       recall_every=1)
    kv.generate(prompt(length=60), past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    read = value("kvkit_pages_read_total", policy="streaming", layer_group="all") - before
    assert read > 0  # 5 decode steps x 3 layers x 2 heads, each reading its resident pages
    assert value("kvkit_kv_resident_bytes", policy="streaming", model="") == cache.nbytes()
    assert value("kvkit_evicted_tokens_total", policy="streaming") >= cache.evicted > 0
    # full selection over what is resident: recall is 1 up to rounding
    assert value("kvkit_selection_recall_count", policy="streaming") > 0
    assert value("kvkit_selection_recall_sum", policy="streaming") == pytest.approx(
        value("kvkit_selection_recall_count", policy="streaming"), rel=1e-4)


def test_selection_recall_measures_what_a_sparse_read_loses():
    from kvkit.attention.monitor import selection_recall
    from kvkit.store import Selection

    torch.manual_seed(0)
    store = policies.get("dense").make_store(1, 1, 8, page_size=4, dtype=torch.float32)
    seq = store.add_sequence()
    k = torch.zeros(8, 1, 8)
    k[4:, 0, 0] = 10.0  # page 1 holds keys the query attends to almost entirely
    store.append(seq, 0, k, torch.randn(8, 1, 8))
    q = torch.zeros(1, 2, 8)
    q[..., 0] = 1.0
    pages = store.page_tables([seq], 0)  # [[[0, 1]]]
    hot = math.exp(10.0 / math.sqrt(8))  # weight of each key of page 1 against 1 for page 0
    assert selection_recall(q, store, [seq], 0, Selection(pages[..., 1:])) == pytest.approx(hot / (hot + 1))
    assert selection_recall(q, store, [seq], 0, Selection(pages[..., :1])) == pytest.approx(1 / (hot + 1))
    assert selection_recall(q, store, [seq], 0, Selection(pages)) == pytest.approx(1.0)


def test_a_step_that_fails_in_a_later_layer_leaves_every_layer_as_it_was(models):
    """Layer 0 streams (room to spare), layer 1 keeps everything and its pool is full: the
    decode step raises OutOfPages in layer 1, and layer 0's token is taken back with it."""
    from kvkit import OutOfPages
    from kvkit.policies import Policy, Rule, SinkWindowEvictor
    _, kv = models
    policy = Policy(rules=(Rule(layers=(0,), evictor=SinkWindowEvictor(sink=4, window=16)),))
    cache = KVKitCache(kv, policy, page_size=8, max_pages=16)  # 64 tokens x 2 heads fill layer 1
    out = kv(prompt(length=64), past_key_values=cache, use_cache=True)
    before = [cache.store.length(cache.seqs[0], layer) for layer in range(3)]
    resident = cache.store.stats().tokens_resident
    with pytest.raises(OutOfPages, match="unchanged"):
        kv(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    assert [cache.store.length(cache.seqs[0], layer) for layer in range(3)] == before == [64, 64, 64]
    assert cache.store.stats().tokens_resident == resident
