"""Per-miss choice between full load, low-bit copy and slow-device compute."""

from __future__ import annotations

import pytest

from kvkit.moe.cache import INF, CacheConfig, replay
from kvkit.moe.miss import MissHandler
from kvkit.moe.sim import PROFILES, HardwareProfile

A100 = PROFILES["a100-pcie4"]
EB = 17_301_504  # one DeepSeek-V2-Lite expert in bf16


def choose(handler: MissHandler, rank: int = 0, next_use: int = INF):
    return handler.choose(layer=0, expert=3, rank=rank, step=10, known_next_use=next_use,
                          layers=26, expert_bytes=EB)


def test_fixed_modes():
    assert choose(MissHandler(A100, mode="load")).how == "load"
    assert choose(MissHandler(A100, mode="cpu")) .bytes_moved == 0
    low = MissHandler(A100, mode="lowbit", lowbit_bits=4, lowbit_min_rank=2)
    assert choose(low, rank=0).how == "load"                    # important experts: full
    assert choose(low, rank=3).bytes_moved == EB // 4           # HOBBIT: int4 copy


def test_auto_loads_what_will_be_reused_and_computes_the_rest_on_cpu():
    auto = MissHandler(A100, mode="auto", lowbit_min_rank=99)
    # batch 1 on A100 + PCIe 4: the CPU reads 17 MB faster than PCIe moves it (Fiddler)
    assert auto.cpu_seconds(EB) < auto.load_seconds(EB)
    assert choose(auto).how == "cpu"
    assert choose(auto, next_use=36).how == "load"              # predicted reuse: cache it


def test_auto_prefers_load_when_cpu_is_slow():
    slow_cpu = HardwareProfile("x", link_bytes_per_s=50e9, link_latency_s=0, fast_flops=1e15,
                               fast_mem_bytes_per_s=3e12, slow_flops=1e10,
                               slow_mem_bytes_per_s=5e9)
    assert choose(MissHandler(slow_cpu, lowbit_min_rank=99)).how == "load"
    assert choose(MissHandler(slow_cpu), rank=4).how == "lowbit"


def test_bypassed_misses_stay_out_of_the_cache(trace):
    cfg = CacheConfig(4)
    res = replay(trace, "lru", cfg, miss_handler=MissHandler(A100, mode="cpu"))
    assert res.hits == 0 and res.bytes_moved == 0 and res.miss_how["cpu"] == res.misses


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "fast"}, "mode must be one of"),
    ({"lowbit_bits": 0}, "lowbit_bits"),
    ({"reuse_prior": 1.5}, "reuse_prior"),
])
def test_miss_handler_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MissHandler(A100, **kwargs)


def test_auto_vetoes_prefetch_of_one_off_experts():
    auto = MissHandler(A100, mode="auto")
    assert not auto.admit_prefetch(step=0, target=5, known_next_use=INF, layers=26,
                                   expert_bytes=EB)
    assert auto.admit_prefetch(step=0, target=5, known_next_use=31, layers=26, expert_bytes=EB)
    assert MissHandler(A100, mode="load").admit_prefetch(step=0, target=5, known_next_use=INF,
                                                         layers=26, expert_bytes=EB)


def test_lookahead_with_auto_misses_moves_fewer_bytes():
    from kvkit.moe.cache import make_policy
    from kvkit.moe.synth import simple_trace

    trace = simple_trace(expert_bytes=EB)
    pred = trace.with_predictions(trace.experts.copy(), 1, "tokens")
    cfg = CacheConfig(4)
    plain = replay(pred, "lookahead", cfg)
    auto = replay(pred, make_policy("lookahead"), cfg, miss_handler=MissHandler(A100))
    assert auto.bytes_moved < plain.bytes_moved and auto.miss_how["cpu"] > 0
