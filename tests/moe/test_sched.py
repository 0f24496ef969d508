"""The online scheduler: its LRU baseline is the replay+simulate timeline, its counters keep
prefetches out of the hit rate, a background transfer never costs a demand load more than one
chunk, and the composition beats its parts where the cost model says it should."""

from __future__ import annotations

import pytest

from kvkit.moe.cache import CacheConfig, replay
from kvkit.moe.sched import SchedConfig, Scheduler, _Link, schedule_trace
from kvkit.moe.sim import PROFILES, HardwareProfile, simulate
from kvkit.moe.synth import generate, noisy_oracle_predictions, preset, simple_trace

A100 = PROFILES["a100-pcie4"]
LRU = dict(miss="load", keep="lru", background=False, hints=False)


@pytest.mark.parametrize("cap", [2, 4, 8])
def test_lru_on_demand_reproduces_replay_and_simulate(cap):
    trace = simple_trace(tokens=200, layers=3, num_experts=16, top_k=2, expert_bytes=10**7)
    old = replay(trace, "lru", CacheConfig(cap, warmup_tokens=20), record=True)
    old_sim = simulate(trace, old, A100, warmup_tokens=20)
    res, _ = schedule_trace(trace, SchedConfig(cap, **LRU), A100, warmup_tokens=20)
    assert res.hit_rate == pytest.approx(old.hit_rate)
    assert res.demand_bytes == old.bytes_moved
    assert res.seconds == pytest.approx(old_sim.seconds, rel=1e-9)
    assert res.stall_seconds == pytest.approx(old_sim.stall_seconds, rel=1e-6)


def test_all_cpu_time_is_activations_plus_experts(trace):
    res, sched = schedule_trace(trace, SchedConfig(4, miss="cpu", keep="lru", background=False,
                                                   hints=False), A100)
    steps = trace.num_tokens * trace.num_layers
    assert res.cpu == res.accesses and res.hit_rate == 0 and res.demand_bytes == 0
    assert res.seconds == pytest.approx(steps * (sched.act_s + trace.top_k * sched.slow_s))


def test_hit_rate_counts_demand_hits_only():
    trace = noisy_oracle_predictions(simple_trace(tokens=150, expert_bytes=10**6), 1.0, 0)
    res, _ = schedule_trace(trace, SchedConfig(3, miss="load", hint_confidence=1.0), A100)
    assert res.prefetch_hits > 0
    served = res.demand_hits + res.prefetch_hits + res.loads + res.waits + res.cpu
    assert served == res.accesses
    assert res.hit_rate == pytest.approx(res.demand_hits / res.accesses)
    assert res.summary()["prefetch_hit_rate"] == pytest.approx(res.prefetch_hits / res.accesses)
    warm, _ = schedule_trace(trace, SchedConfig(3, miss="load"), A100, warmup_tokens=75)
    assert 0 < warm.background_used <= warm.background_issued   # warm-up issues not counted


def test_demand_load_waits_at_most_one_chunk_behind_a_background_transfer():
    link = _Link(chunk_s=1.0)
    link.queue.append([0, 5, 10.0, 10.0])        # a 10 s background transfer
    assert link.advance(3.4) == []               # 3.4 s in: 0.6 s left of its 4th chunk
    end, done = link.demand(3.4, set(), 2.0)
    assert end == pytest.approx(3.4 + 0.6 + 2.0) and done == []
    assert link.queue[0][2] == pytest.approx(6.0)   # it resumes after the demand load
    assert link.advance(end + 6.0) == [(0, 5)]


def test_background_only_into_idle_link_time(trace):
    sched = Scheduler(SchedConfig(4), trace.num_layers, trace.num_experts, 10**7, A100)
    for t in range(40):
        for l in range(trace.num_layers):
            before = sched.last_step_s
            _, started = sched.plan(l, trace.experts[t, l].tolist())
            # transfers start only while the link has at most the last step's work queued,
            # so after a start the queue exceeds it by less than one transfer
            if started:
                assert sched.link.backlog() <= before + sched.load_s + 1e-12
    assert sched.result.background_issued > 0


def test_hybrid_beats_each_part_on_a_calibrated_trace():
    trace = generate(preset("deepseek-v2-lite"), 300, seed=3, num_layers=6)
    warm = 100

    def ms(**kw):
        return schedule_trace(trace, SchedConfig(16, **kw), A100, warmup_tokens=warm)[0].seconds

    hybrid = ms(hints=False)
    parts = {"lru": ms(**LRU), "all-cpu": ms(miss="cpu", keep="lru", background=False,
                                             hints=False),
             "cpu + keep": ms(background=False, hints=False), "loads + bg": ms(miss="load",
                                                                                hints=False)}
    assert all(hybrid < t for t in parts.values()), (hybrid, parts)


def test_plan_is_independent_of_expert_order(trace):
    a = Scheduler(SchedConfig(4), trace.num_layers, trace.num_experts, 10**7, A100)
    b = Scheduler(SchedConfig(4), trace.num_layers, trace.num_experts, 10**7, A100)
    for t in range(30):
        for l in range(trace.num_layers):
            row = trace.experts[t, l].tolist()
            assert a.plan(l, row) == b.plan(l, row[::-1])


def test_slow_link_makes_auto_compute_on_cpu_and_fast_link_load():
    slow = HardwareProfile("s", 1e6, 0.0, 1e15, 1e15, 1e12, 1e12)
    fast = HardwareProfile("f", 1e15, 0.0, 1e15, 1e15, 1e6, 1e6)
    trace = simple_trace(tokens=50, expert_bytes=10**6)
    on_slow, _ = schedule_trace(trace, SchedConfig(4, background=False), slow)
    on_fast, _ = schedule_trace(trace, SchedConfig(4, background=False), fast)
    assert on_slow.loads == 0 and on_slow.cpu > 0
    assert on_fast.cpu == 0 and on_fast.loads > 0


@pytest.mark.parametrize("kwargs,match", [
    ({"capacity": 0}, "capacity"), ({"capacity": 2, "miss": "gpu"}, "miss"),
    ({"capacity": 2, "keep": "lfu"}, "keep"), ({"capacity": 2, "reuse": "x"}, "reuse"),
    ({"capacity": 2, "keep": "lru"}, "background needs keep='reuse'"),
    ({"capacity": 2, "hint_confidence": 2.0}, "hint_confidence")])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SchedConfig(**kwargs)


def test_bad_calls(trace):
    sched = Scheduler(SchedConfig(4), 3, 16, 1000, A100)
    with pytest.raises(ValueError, match="layer 3 is outside"):
        sched.plan(3, [0, 1])
    with pytest.raises(ValueError, match="warmup_tokens"):
        schedule_trace(trace, SchedConfig(4), A100, warmup_tokens=trace.num_tokens)
