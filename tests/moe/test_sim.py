"""The timeline model: stalls from link-bound loads, prefetch hiding behind compute."""

from __future__ import annotations

import pytest

from kvkit.moe.cache import CacheConfig, make_policy, replay
from kvkit.moe.sim import HardwareProfile, compare_policies, get_profile, simulate

LINK = HardwareProfile("t", link_bytes_per_s=1e6, link_latency_s=0.0, fast_flops=1e18,
                       fast_mem_bytes_per_s=1e18, slow_flops=1e18, slow_mem_bytes_per_s=1e18)


def test_on_demand_stall_is_bytes_over_bandwidth(trace):
    res = replay(trace, "lru", CacheConfig(4), record=True)
    sim = simulate(trace, res, LINK)
    assert sim.stall_seconds == pytest.approx(res.bytes_moved / 1e6, rel=1e-9)


def test_prefetch_hides_transfers_behind_compute(trace):
    pred = trace.with_predictions(trace.experts.copy(), 1, "tokens")
    cfg = CacheConfig(4)
    demand = replay(pred, make_policy("lookahead", prefetch_budget=0), cfg, record=True)
    ahead = replay(pred, "lookahead", cfg, record=True)
    other = 10 * trace.expert_bytes / 1e6          # compute per layer >> one transfer
    s_demand = simulate(pred, demand, LINK, other_per_layer_s=other)
    s_ahead = simulate(pred, ahead, LINK, other_per_layer_s=other)
    assert s_ahead.stall_seconds < 0.5 * s_demand.stall_seconds


def test_simulate_needs_a_recorded_replay(trace):
    with pytest.raises(ValueError, match="record=True"):
        simulate(trace, replay(trace, "lru", CacheConfig(4)), LINK)


def test_compare_policies_rows(trace):
    rows = compare_policies(trace, ["lfu"], CacheConfig(4, warmup_tokens=10), LINK,
                            record_metrics=False)
    by = {r["policy"]: r for r in rows}
    assert list(by) == ["lru", "belady", "lfu"]
    assert by["lru"]["bytes_vs_lru"] == 1.0 and by["belady"]["gap_to_belady"] == 0.0
    assert by["belady"]["hit_rate"] >= by["lfu"]["hit_rate"]


def test_profiles():
    assert get_profile("a100-pcie4").link_bytes_per_s == 25e9
    with pytest.raises(ValueError, match="known: a100-pcie4"):
        get_profile("tpu")
    with pytest.raises(ValueError, match="link_bytes_per_s must be > 0"):
        HardwareProfile("x", 0, 0, 1, 1, 1, 1)


def test_local_profile_is_measured():
    p = get_profile("local")
    assert p.link_bytes_per_s > 1e7 and p.fast_flops > 1e7 and "measured" in p.source
