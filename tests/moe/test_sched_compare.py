"""The scheduler's standard rows: the low-bit rows appear only when asked for, and every row
reports the low-bit share beside the other tiers."""

from __future__ import annotations

import pytest

from kvkit.moe.sched_compare import compare_schedules, standard_configs
from kvkit.moe.sim import PROFILES
from kvkit.moe.synth import generate, preset


def test_standard_configs_add_lowbit_rows_only_when_asked():
    plain = standard_configs(8)
    low = standard_configs(8, lowbit=True, lowbit_bits=2, lowbit_min_rank=3)
    assert [label for label, _ in low[:len(plain)]] == [label for label, _ in plain]
    assert not any(cfg.lowbit for _, cfg in plain)
    extra = low[len(plain):]
    assert [label for label, _ in extra] == ["lru + int2 copies", "hybrid + int2 copies"]
    assert all(cfg.lowbit and cfg.lowbit_bits == 2 and cfg.lowbit_min_rank == 3
               for _, cfg in extra)
    assert extra[0][1].miss == "load" and extra[0][1].keep == "lru"


def test_compare_schedules_reports_lowbit_share_fastest_first():
    trace = generate(preset("deepseek-v2-lite"), 120, seed=3, num_layers=4)
    variants = [(label, trace, cfg) for label, cfg in standard_configs(16, lowbit=True)]
    rows = compare_schedules(variants, PROFILES["a100-pcie4"], warmup_tokens=40)
    times = [r["ms_per_token"] for r in rows]
    assert times == sorted(times) and len(rows) == len(variants)
    for r in rows:
        assert r["fast_share"] + r["lowbit_share"] + r["cpu_share"] == pytest.approx(1, abs=2e-4)
        assert (r["lowbit_bits"] == 4) == r["config"].endswith("int4 copies")
        assert (r["lowbit_share"] > 0) <= (r["lowbit_bits"] is not None)
    by = {r["config"]: r for r in rows}
    assert by["lru + int4 copies"]["lowbit_share"] > 0
    assert by["lru + int4 copies"]["ms_per_token"] < by["lru (on-demand loads)"]["ms_per_token"]
