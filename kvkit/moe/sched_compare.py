"""The scheduler's standard rows and their ranking by modelled time per token.

`standard_configs` lists the configurations of `kvkit.moe.sched.SchedConfig` that need no
predictions: the two baselines (LRU with on-demand loads, every miss on the CPU), each part
alone, and their composition; with `lowbit=True` also the low-bit copy choice alone (on the LRU
baseline) and in the composition. `compare_schedules` runs (label, trace, config) triples
through `schedule_trace` and returns one row each, fastest first. Used by `kvkit moe schedule`
and bench/moe_sched.py.

Limits: the low-bit rows change the model's outputs (their `lowbit_share` of the expert work
runs on `lowbit_bits`-bit weights); ranking them beside the lossless rows is a time ranking
only.
"""

from __future__ import annotations

from typing import Any

from kvkit.moe.sched import SchedConfig, schedule_trace
from kvkit.moe.sim import HardwareProfile
from kvkit.moe.trace import Trace

__all__ = ["standard_configs", "compare_schedules"]


def standard_configs(capacity: int, lowbit: bool = False, lowbit_bits: int = 4,
                     lowbit_min_rank: int = 2) -> list[tuple[str, SchedConfig]]:
    """The rows without predictions: the two baselines, each part alone, their composition;
    with `lowbit`, also low-bit copies on the LRU baseline and in the composition."""
    no = dict(background=False, hints=False)
    rows = [
        ("lru (on-demand loads)", SchedConfig(capacity, miss="load", keep="lru", **no)),
        ("all-cpu misses", SchedConfig(capacity, miss="cpu", keep="lru", **no)),
        ("cpu misses + keep by reuse", SchedConfig(capacity, **no)),
        ("warm cache, loads only", SchedConfig(capacity, miss="load", hints=False)),
        ("hybrid: cpu misses + warm cache", SchedConfig(capacity, hints=False)),
        ("hybrid, global frequency", SchedConfig(capacity, reuse="global", hints=False)),
    ]
    if lowbit:
        low = dict(lowbit=True, lowbit_bits=lowbit_bits, lowbit_min_rank=lowbit_min_rank)
        rows += [
            (f"lru + int{lowbit_bits} copies", SchedConfig(capacity, miss="load", keep="lru",
                                                           **no, **low)),
            (f"hybrid + int{lowbit_bits} copies", SchedConfig(capacity, hints=False, **low)),
        ]
    return rows


def compare_schedules(variants: list[tuple[str, Trace, SchedConfig]], profile: HardwareProfile,
                      warmup_tokens: int = 0, hidden_size: int = 2048) -> list[dict[str, Any]]:
    """Run each (label, trace, config) and return one row each, fastest first: modelled time and
    stall per token, demand hit rate, prefetch hit rate, share of expert work per tier (full
    precision on the fast device, low-bit copies, slow device), bytes moved (all and in the
    background), the background transfers' accuracy, and the low-bit copies' bits (None when
    the row has none)."""
    rows = []
    for label, trace, cfg in variants:
        s = schedule_trace(trace, cfg, profile, warmup_tokens, hidden_size)[0].summary()
        acc = s["background_accuracy"]
        rows.append({"config": label, "scheduler": cfg.label(), "capacity": cfg.capacity,
                     "ms_per_token": round(s["ms_per_token"], 4),
                     "stall_ms_per_token": round(s["stall_ms_per_token"], 4),
                     "hit_rate": round(s["hit_rate"], 4),
                     "prefetch_hit_rate": round(s["prefetch_hit_rate"], 4),
                     "fast_share": round(s["fast_share"], 4),
                     "lowbit_share": round(s["lowbit_share"], 4),
                     "cpu_share": round(s["cpu_share"], 4),
                     "MB_per_token": round(s["bytes_per_token"] / 1e6, 3),
                     "background_MB_per_token": round(s["background_bytes_per_token"] / 1e6, 3),
                     "background_accuracy": None if acc is None else round(acc, 3),
                     "hint_confidence": cfg.hint_confidence if cfg.hints else None,
                     "lowbit_bits": cfg.lowbit_bits if cfg.lowbit else None})
    return sorted(rows, key=lambda r: r["ms_per_token"])
