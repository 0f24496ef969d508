import math

import pytest
import torch
from transformers import LlamaForCausalLM

from kvkit import ConfigError, policies
from kvkit.attention.paged import attention_step
from kvkit.stats import AttentionStats, PrefillStats
from kvkit.integrations.hf import KVKitCache
from kvkit.policies import Policy
from kvkit.policies.evictors.h2o import A2SFEvictor, H2OEvictor
from kvkit.store import PagedKVStore
from kvkit.testing import tiny_llama_config


def _store(tokens=6, heads=1, page_size=4):
    store = PagedKVStore(1, heads, 8, page_size=page_size, dtype=torch.float32, slot_scores=True)
    seq = store.add_sequence()
    store.append(seq, 0, torch.randn(tokens, heads, 8), torch.randn(tokens, heads, 8))
    return store, seq


def _stats(store, seq, attention: dict[int, float]) -> AttentionStats:
    """Decode stats in which position p received attention[p] (head 0, every page read)."""
    pages = store.page_tables([seq], 0)  # [1, H, P]
    pos = store.slot_positions(0)[pages.clamp(min=0)]  # [1, H, P, S]
    probs = torch.zeros(pos.shape)
    for p, a in attention.items():
        probs[pos == p] = a
    return AttentionStats(pages, probs)


@pytest.mark.parametrize("factor,survivor", [(1.0, 1), (0.5, 2)])
def test_decayed_heavy_hitter_loses(factor, survivor):
    # Position 1 got a lot of attention once, long ago; position 2 a little at every recent step.
    # H2O (factor 1) keeps the old heavy hitter; A2SF's forgetting factor lets it fade.
    store, seq = _store()
    accumulate = A2SFEvictor(budget=100, forgetting_factor=factor, sink=1, window=3)
    accumulate.step(store, [seq], 0, [0], _stats(store, seq, {1: 2.0}))
    for _ in range(3):
        accumulate.step(store, [seq], 0, [0], _stats(store, seq, {2: 0.5}))
    shrink = A2SFEvictor(budget=5, forgetting_factor=factor, sink=1, window=3)
    assert shrink.step(store, [seq], 0, [0], None) == 1
    assert store.positions(seq, 0, 0).tolist() == [0, survivor, 3, 4, 5]
    scores = store.slot_scores(0)
    expect = 2.0 if factor == 1 else 2.0 * 0.5 ** 3
    assert math.isclose(float(scores.max()), max(expect, 0.5 * sum(factor ** i for i in range(3))), rel_tol=1e-6)


@pytest.mark.parametrize("factor", [1.0, 0.9])
def test_evictor_never_exceeds_budget_and_protects_sinks_and_window(factor):
    g = torch.Generator().manual_seed(0)
    store = PagedKVStore(2, 2, 8, page_size=4, dtype=torch.float32, slot_scores=True)
    seq = store.add_sequence()
    ev = A2SFEvictor(budget=12, forgetting_factor=factor, sink=2, window=5)
    for step in range(60):
        n = 7 if step == 0 else 1
        for layer in range(2):
            store.append(seq, layer, torch.randn(n, 2, 8), torch.randn(n, 2, 8))
            pages = store.page_tables([seq], layer)
            probs = torch.rand(*pages.shape, 4, generator=g)
            ev.step(store, [seq], layer, [0, 1], AttentionStats(pages, probs))
            length = store.length(seq, layer)
            for h in range(2):
                pos = store.positions(seq, layer, h).tolist()
                assert len(pos) <= 12
                assert set(range(min(2, length))) <= set(pos)
                assert set(range(max(0, length - 5), length)) <= set(pos)


def test_prefill_stats_are_decayed_column_sums():
    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 2, 6, 2, 24, 8
    q, k = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D)
    start = 10
    stats = PrefillStats(q[:, :, start:], k, start, None, final=True, block=5)
    logits = torch.einsum("bhtd,bhld->bhtl", q, k.repeat_interleave(3, 1)) * D ** -0.5
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    probs = logits.softmax(-1)[:, :, start:]  # [B, Hq, t, L]
    for decay in (1.0, 0.8):
        w = decay ** torch.arange(T - start - 1, -1, -1, dtype=torch.float32)
        expect = torch.einsum("bhtl,t->bhl", probs, w).view(B, Hkv, 3, T).sum(2)
        torch.testing.assert_close(stats.column_scores(decay), expect, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_scores_equal_whole_prompt_scores():
    # Scores accumulated chunk by chunk (decay f**t between chunks) equal those of one pass.
    torch.manual_seed(1)
    Hq, Hkv, T, D, f = 4, 2, 40, 8, 0.9
    q, k, v = torch.randn(1, Hq, T, D), torch.randn(1, Hkv, T, D), torch.randn(1, Hkv, T, D)
    policy = policies.get("a2sf", budget=64, forgetting_factor=f, sink=0, window=0)
    store = policy.make_store(1, Hkv, D, page_size=8, dtype=torch.float32)
    seq = store.add_sequence()
    attention_step(store, policy, [seq], 0, q, k, v, prefill_chunk=16)
    whole = PrefillStats(q, k, 0, None, final=True).column_scores(f)  # [1, Hkv, T]
    for h in range(Hkv):
        pages = torch.tensor(store.page_table(seq, 0, h))
        pos = store.slot_positions(0)[pages].reshape(-1).long()
        got = store.slot_scores(0)[pages].reshape(-1)[pos >= 0]
        torch.testing.assert_close(got, whole[0, h][pos[pos >= 0]], atol=1e-5, rtol=1e-5)


def test_prefill_end_mode_holds_the_prompt_until_its_last_chunk():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 50, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    for mode, peak_ok in (("end", lambda n: n == 50), ("chunk", lambda n: n <= 20 + 16)):
        policy = policies.get("h2o", budget=20, sink=2, window=6, prefill=mode)
        store = policy.make_store(1, 2, 8, page_size=4, dtype=torch.float32)
        seq = store.add_sequence()
        seen = []
        original = store.evict
        store.evict = lambda *a, **kw: (seen.append(store.num_resident(seq, 0, a[2])), original(*a, **kw))[1]
        attention_step(store, policy, [seq], 0, q, k, v, prefill_chunk=16)
        assert seen and all(peak_ok(n) for n in seen[:1])
        assert all(store.num_resident(seq, 0, h) == 20 for h in range(2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=0), "budget must be an int >= 1"),
    (dict(budget=8, sink=4, window=6), r"sink \(4\) \+ window \(6\) must not exceed budget \(8\)"),
    (dict(forgetting_factor=0.0), r"forgetting_factor must be in \(0, 1\]"),
    (dict(forgetting_factor=1.5), r"forgetting_factor must be in \(0, 1\]"),
    (dict(prefill="never"), "prefill must be one of"),
])
def test_bad_a2sf_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        A2SFEvictor(**kwargs)


def test_h2o_is_a2sf_with_factor_one_and_round_trips():
    assert H2OEvictor(budget=64).forgetting_factor == 1.0
    with pytest.raises(ValueError, match="1 by definition"):
        H2OEvictor(forgetting_factor=0.9)
    for p in (policies.get("h2o", budget=64), policies.get("a2sf", budget=64, forgetting_factor=0.95)):
        assert p.needs_attention
        assert Policy.from_config(p.to_config()) == p
    with pytest.raises(ConfigError, match="forgetting_factor"):
        Policy.from_config({"evictor": {"type": "a2sf", "forgetting_factor": 2}})


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.mark.parametrize("name", ["h2o", "a2sf"])
def test_generate_through_kvkit_cache_stays_within_budget(tiny, name):
    ids = torch.randint(3, 256, (2, 50), generator=torch.Generator().manual_seed(0))
    cache = KVKitCache(tiny, name, page_size=8, budget=24, sink=2, window=8)
    out = tiny.generate(ids, past_key_values=cache, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 62
    for layer in range(3):
        for seq in cache.seqs:
            for h in range(2):
                pos = cache.store.positions(seq, layer, h).tolist()
                assert len(pos) == 24 and pos[:2] == [0, 1] and pos[-8:] == list(range(53, 61))


def test_budget_above_length_equals_dense(tiny):
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    dense = tiny.generate(ids, past_key_values=KVKitCache(tiny, "dense"), max_new_tokens=10,
                          do_sample=False, pad_token_id=0)
    a2sf = tiny.generate(ids, past_key_values=KVKitCache(tiny, "a2sf", budget=512), max_new_tokens=10,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(dense, a2sf)
