"""Expert cache policies and the replay: yardsticks, invariants, errors."""

from __future__ import annotations

import numpy as np
import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from kvkit.moe.cache import CacheConfig, make_policy, policy_names, replay
from kvkit.moe.synth import simple_trace
from kvkit.moe.trace import Trace

DEMAND = ("lru", "lfu", "score")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), capacity=st.integers(2, 9),
       scope=st.sampled_from(["layer", "shared"]))
def test_belady_beats_every_demand_policy(seed, capacity, scope):
    trace = simple_trace(tokens=60, layers=2, num_experts=10, top_k=2, seed=seed)
    cfg = CacheConfig(capacity, scope=scope)
    best = replay(trace, "belady", cfg).hit_rate
    for name in DEMAND:
        assert replay(trace, name, cfg).hit_rate <= best + 1e-12, name


@pytest.mark.parametrize("name", ["lru", "lfu", "belady", "score"])
def test_capacity_of_all_experts_has_only_cold_misses(trace, name):
    res = replay(trace, name, CacheConfig(trace.num_experts))
    distinct = sum(len(np.unique(trace.experts[:, l])) for l in range(trace.num_layers))
    assert res.misses == distinct and res.hits == res.accesses - distinct


def test_capacity_top_k_keeps_exactly_the_last_step(trace):
    # with room for one step only, a hit is an expert the same layer used one token before
    res = replay(trace, "lru", CacheConfig(trace.top_k))
    ex = trace.experts
    shared = sum(len(set(ex[t, l]) & set(ex[t - 1, l])) for t in range(1, trace.num_tokens)
                 for l in range(trace.num_layers))
    assert res.hits == shared


def test_bytes_count_loads_and_prefetches(trace):
    pred = trace.with_predictions(trace.experts.copy(), 1, "tokens")
    res = replay(pred, "lookahead", CacheConfig(4))
    assert res.bytes_moved == (res.miss_how["load"] + res.prefetch_issued) * trace.expert_bytes
    assert 0 <= res.prefetch_useful <= res.prefetch_issued


def test_lookahead_with_exact_predictions_beats_lru(trace):
    pred = trace.with_predictions(trace.experts.copy(), 1, "tokens")
    cfg = CacheConfig(4, warmup_tokens=20)
    lru = replay(pred, "lru", cfg)
    look = replay(pred, make_policy("lookahead", prefetch_budget=0), cfg)
    belady = replay(pred, "belady", cfg)
    assert lru.hit_rate < look.hit_rate <= belady.hit_rate + 1e-12
    pre = replay(pred, "lookahead", cfg)          # prefetching exact predictions: no misses,
    assert pre.misses == 0 and pre.prefetch_accuracy == 1.0   # but prefetches are not hits
    assert pre.hit_rate + pre.prefetch_hit_rate == pytest.approx(1.0)
    assert pre.prefetch_hit_rate > 0 and pre.hit_rate < 1.0


def test_lookahead_needs_predictions(trace):
    with pytest.raises(ValueError, match="needs trace.predicted"):
        replay(trace, "lookahead", CacheConfig(4))


def test_capacity_below_top_k_is_refused(trace):
    with pytest.raises(ValueError, match="cannot hold one step's top_k=2"):
        replay(trace, "lru", CacheConfig(1))


def test_capacity_bytes_converts_with_expert_bytes(trace):
    a = replay(trace, "lru", CacheConfig(capacity_bytes=4 * trace.expert_bytes + 10))
    b = replay(trace, "lru", CacheConfig(4))
    assert a.capacity == 4 and a.hits == b.hits


def test_shared_scope_with_layer_times_capacity_is_at_least_as_good_for_belady(trace):
    per = replay(trace, "belady", CacheConfig(3))
    shared = replay(trace, "belady", CacheConfig(3 * trace.num_layers, scope="shared"))
    assert shared.hit_rate >= per.hit_rate - 0.02


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one of"),
    ({"capacity": 0}, "capacity must be >= 1"),
    ({"capacity": 2, "scope": "global"}, "scope must be one of"),
    ({"capacity": 2, "capacity_bytes": 5}, "exactly one of"),
])
def test_cache_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(**kwargs)


def test_unknown_policy_lists_known():
    with pytest.raises(ValueError, match="known: belady, lfu, lookahead, lru, score"):
        make_policy("arc")
    assert policy_names() == ["belady", "lfu", "lookahead", "lru", "score"]
    with pytest.raises(ValueError, match="half_life"):
        make_policy("lfu", half_life=0)


def test_warmup_excludes_early_tokens(trace):
    res = replay(trace, "lru", CacheConfig(4, warmup_tokens=50))
    assert res.accesses == (trace.num_tokens - 50) * trace.num_layers * trace.top_k
    assert res.counted_tokens == trace.num_tokens - 50
    with pytest.raises(ValueError, match="leaves nothing"):
        replay(trace, "lru", CacheConfig(4, warmup_tokens=trace.num_tokens))


def test_record_metrics_is_safe_without_prometheus():
    from kvkit.moe.cache import record_metrics

    assert record_metrics("lru", 1, 2, 3) in (True, False)


def test_single_token_trace():
    t = Trace(np.array([[[0, 1]]]), np.array([0]), None, 0,
              {"num_experts": 2, "top_k": 2, "expert_bytes": 8, "model": "x"})
    res = replay(t, "lru", CacheConfig(2))
    assert res.misses == 2 and res.bytes_moved == 16
