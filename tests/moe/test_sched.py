"""The online scheduler: its LRU baseline is the replay+simulate timeline, its counters keep
prefetches out of the hit rate, a background transfer never costs a demand load more than one
chunk, the composition beats its parts where the cost model says it should, and a low-bit copy
is chosen exactly where a brute-force split of the step says it ends the step first."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kvkit.moe.cache import CacheConfig, replay
from kvkit.moe.sched import SchedConfig, Scheduler, _Link, gate_ranked, schedule_trace
from kvkit.moe.sim import PROFILES, HardwareProfile, simulate
from kvkit.moe.synth import generate, noisy_oracle_predictions, preset, simple_trace
from kvkit.moe.trace import Trace

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


# -- low-bit copies ------------------------------------------------------------------------------
# Round numbers: a 1 MB expert loads in 1 ms, its int4 copy (0.25 MB) in 0.25 ms, the slow device
# computes it in 1 ms (memory bound), the fast device in 1 ps; activations (hidden 1) take 4 ns.
HAND = HardwareProfile("hand", link_bytes_per_s=1e9, link_latency_s=0.0, fast_flops=1e18,
                       fast_mem_bytes_per_s=1e18, slow_flops=1e18, slow_mem_bytes_per_s=1e9)
MB = 10**6


def _hand_step_seconds(hows: dict[int, str]) -> float:
    """One step with every expert missing, priced by hand: one demand transfer (loads at 1 ms,
    int4 copies at 0.25 ms), then the fast device (1 ps each); the slow device in parallel."""
    n_load = sum(h == "load" for h in hows.values())
    n_low = sum(h == "lowbit" for h in hows.values())
    n_cpu = sum(h == "cpu" for h in hows.values())
    fast_end = n_load * 1e-3 + n_low * 0.25e-3 + (n_load + n_low) * 1e-12
    cpu_end = 4e-9 + n_cpu * 1e-3 if n_cpu else 0.0
    return max(fast_end, cpu_end)


def _brute_force(ranks: dict[int, int], allowed: tuple[str, ...], min_rank: int
                 ) -> tuple[float, dict[int, str]]:
    """Every assignment of load / lowbit / cpu to the experts (low-bit only from min_rank)."""
    best = (float("inf"), {})
    experts = sorted(ranks)
    for combo in itertools.product(allowed, repeat=len(experts)):
        hows = dict(zip(experts, combo))
        if any(h == "lowbit" and ranks[e] < min_rank for e, h in hows.items()):
            continue
        t = _hand_step_seconds(hows)
        if t < best[0] - 1e-15:
            best = (t, hows)
    return best


@pytest.mark.parametrize("miss,allowed", [("auto", ("load", "lowbit", "cpu")),
                                          ("load", ("load", "lowbit")),
                                          ("cpu", ("lowbit", "cpu"))])
def test_lowbit_step_is_the_brute_force_fastest_split(miss, allowed):
    cfg = SchedConfig(4, miss=miss, keep="lru", background=False, hints=False, lowbit=True,
                      lowbit_min_rank=1)
    sched = Scheduler(cfg, 1, 8, MB, HAND, hidden_size=1)
    decisions, _ = sched.plan(0, [5, 3, 6], ranks=[0, 1, 2])
    want_s, want_hows = _brute_force({5: 0, 3: 1, 6: 2}, allowed, 1)
    got = {e: ("load" if how == "stream" else how) for e, how, _ in decisions}
    assert got == want_hows
    assert sched.now == pytest.approx(want_s, rel=1e-12)
    # by hand: the rank-0 expert cannot go low-bit; both others go low-bit in one transfer
    assert got[3] == got[6] == "lowbit" and got[5] == ("load" if miss == "load" else "cpu")
    assert sched.now == pytest.approx({"load": 1.5e-3 + 3e-12}.get(miss, 1e-3 + 4e-9), rel=1e-12)
    res = sched.finish()
    assert res.lowbit == 2 and res.lowbit_bytes == 2 * MB // 4
    assert res.demand_bytes == 2 * MB // 4 + (MB if miss == "load" else 0)
    s = res.summary()
    assert s["lowbit_share"] == pytest.approx(2 / 3)
    assert s["fast_share"] + s["lowbit_share"] + s["cpu_share"] == pytest.approx(1.0)


def test_lowbit_off_or_below_min_rank_changes_nothing():
    """Without the choice (or with no expert ranked low enough) the step is the load/cpu split."""
    times = []
    for kw in ({}, {"lowbit": True, "lowbit_min_rank": 3}):
        sched = Scheduler(SchedConfig(4, keep="lru", background=False, hints=False, **kw), 1, 8,
                          MB, HAND, hidden_size=1)
        decisions, _ = sched.plan(0, [5, 3, 6], ranks=[0, 1, 2])
        assert all(how != "lowbit" for _, how, _ in decisions)
        times.append(sched.now)
    want_s, _ = _brute_force({5: 0, 3: 1, 6: 2}, ("load", "cpu"), 99)
    assert times == [pytest.approx(want_s, rel=1e-12)] * 2
    assert want_s > 1.9e-3      # the low-bit split above takes 1 ms


def test_lowbit_copies_are_used_once_not_cached():
    cfg = SchedConfig(4, miss="load", keep="lru", background=False, hints=False, lowbit=True,
                      lowbit_min_rank=1)
    sched = Scheduler(cfg, 1, 8, MB, HAND, hidden_size=1)
    sched.plan(0, [5, 3], ranks=[0, 1])
    assert sched.resident[0].nonzero()[0].tolist() == [5]
    decisions, _ = sched.plan(0, [5, 3], ranks=[0, 1])
    assert decisions == [(3, "lowbit", -1), (5, "hit", -1)]


def test_lowbit_in_a_trace_gains_time_and_respects_ranks():
    trace = generate(preset("deepseek-v2-lite"), 300, seed=3, num_layers=6)
    warm = 100
    low = dict(lowbit=True, lowbit_bits=4, lowbit_min_rank=2)

    def run(**kw):
        return schedule_trace(trace, SchedConfig(16, **kw), A100, warmup_tokens=warm)

    lru, lru_low = run(**LRU)[0], run(**LRU, **low)[0]
    hybrid = run(hints=False)[0]
    hybrid_low, sched = run(hints=False, **low)
    assert lru_low.seconds < lru.seconds and hybrid_low.seconds < hybrid.seconds
    assert 0 < hybrid_low.summary()["lowbit_share"] < 1
    ranks = {e[1]: dict(zip(sorted(trace.experts[divmod(e[1], 6)]), e[3]))
             for e in sched.log if e[0] == "ranks"}
    low_ranks = [ranks[e[1]][x] for e in sched.log if e[0] == "step"
                 for x, how, _ in e[3] if how == "lowbit"]
    assert low_ranks and min(low_ranks) >= 2
    # the ranks logged are the row positions of the trace (highest gate first)
    t, l = 150, 3
    row = trace.experts[t, l].tolist()
    assert ranks[t * 6 + l] == {e: row.index(e) for e in row}


def test_lowbit_plan_is_independent_of_expert_order(trace):
    cfg = SchedConfig(4, lowbit=True, lowbit_min_rank=1)
    a = Scheduler(cfg, trace.num_layers, trace.num_experts, 10**7, A100)
    b = Scheduler(cfg, trace.num_layers, trace.num_experts, 10**7, A100)
    for t in range(30):
        for l in range(trace.num_layers):
            row = trace.experts[t, l].tolist()
            ranks = list(range(len(row)))
            assert a.plan(l, row, ranks=ranks) == b.plan(l, row[::-1], ranks=ranks[::-1])
    assert a.finish().lowbit > 0


def test_lowbit_refuses_without_gate_ranks(trace):
    cfg = SchedConfig(4, lowbit=True)
    with pytest.raises(ValueError, match="needs each expert's rank"):
        Scheduler(cfg, 3, 16, 1000, A100).plan(0, [0, 1])
    with pytest.raises(ValueError, match="rank >= 0 to each"):
        Scheduler(cfg, 3, 16, 1000, A100).plan(0, [0, 1], ranks=[0])
    by_id = Trace(np.sort(trace.experts, axis=-1), trace.request, meta=trace.meta)
    with pytest.raises(ValueError, match="no gate ranks: every row is sorted by expert id"):
        schedule_trace(by_id, cfg, A100)
    flagged = Trace(trace.experts, trace.request, meta={**trace.meta, "gate_ranked": False})
    with pytest.raises(ValueError, match="no gate ranks: its meta says gate_ranked=False"):
        schedule_trace(flagged, cfg, A100)
    assert gate_ranked(trace) == (True, "rows in gate order")
    schedule_trace(by_id, SchedConfig(4), A100)     # without low-bit copies ranks are not read


@pytest.mark.parametrize("kwargs", [{"lowbit_bits": 0}, {"lowbit_bits": 17},
                                    {"lowbit_min_rank": -1}])
def test_lowbit_config_errors(kwargs):
    with pytest.raises(ValueError, match="lowbit_bits in"):
        SchedConfig(2, lowbit=True, **kwargs)
