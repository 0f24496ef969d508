"""The measured-vs-modelled comparison of the offloaded scheduler runs on tiny models, and its
measured fields are real clocks that add up (they are checked for consistency, not for
agreeing with the model)."""

from __future__ import annotations

import json

import pytest
import torch

from kvkit.moe.offload import OffloadConfig
from kvkit.moe.sched import SchedConfig
from kvkit.moe.sim import HardwareProfile, measure_local_profile
from kvkit.moe.stall import measure_vs_model

pytest.importorskip("transformers")

LRU = SchedConfig(2, miss="load", keep="lru", background=False, hints=False)


@pytest.fixture(scope="module")
def local() -> HardwareProfile:
    return measure_local_profile(expert_bytes=1 << 20, repeats=3)


def _check(row: dict) -> None:
    assert row["decisions_equal"]
    assert row["ms_per_token"] > 0 and row["fast_ms"] > 0 and row["plan_ms"] > 0
    assert row["stall_ms"] >= 0 and row["slow_ms"] >= 0
    assert row["expert_path_ms"] == pytest.approx(row["stall_ms"] + row["fast_ms"]
                                                  + row["slow_ms"])
    assert row["stall_ms"] <= row["expert_path_ms"] <= row["ms_per_token"]
    assert row["other_ms"] == pytest.approx(row["ms_per_token"] - row["expert_path_ms"]
                                            - row["plan_ms"]) and row["other_ms"] >= 0
    assert 0 <= row["model_stall_ms"] <= row["model_ms_per_token"]
    assert row["model_compute_ms"] > 0
    assert (row["slow_ms"] > 0) == (row["cpu"] > 0)


@pytest.mark.parametrize("cfg", [LRU, SchedConfig(2)], ids=lambda c: c.label())
def test_mixtral_measured_vs_modelled(moe_builders, local, cfg):
    model = moe_builders["mixtral"]().eval()
    model.set_experts_implementation("eager")
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(4))
    row = measure_vs_model(model, ids, cfg, local, top_k=2, warmup_tokens=2)
    _check(row)
    assert row["tokens"] == 8
    if cfg is LRU:      # on-demand loads after warm-up: the compute thread waited on copies
        assert row["misses"] > 0 and row["stall_ms"] > 0 and row["model_stall_ms"] > 0
        assert row["stall_ratio"] == pytest.approx(row["stall_ms"] / row["model_stall_ms"])


def test_readme_measured_vs_modelled_on_a_recorded_trace(moe_builders, local):
    from kvkit.moe.readme.tracing import record_trace

    moe = moe_builders["readme"]()
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(3))
    trace = record_trace(moe, [ids[0]], router="pregate", predict_k=moe.config.top_k,
                         model_name="tiny", expert_dtype_bytes=4)
    _check(measure_vs_model(moe.model, ids, SchedConfig(1), local, moe.config.top_k, trace))
    fresh = moe_builders["readme"]()
    wrong = record_trace(fresh, [ids[0]], router="pregate", model_name="tiny")   # fp16 bytes
    with pytest.raises(ValueError, match="record the trace with the model's dtype"):
        measure_vs_model(fresh.model, ids, SchedConfig(1), local, 2, wrong)


def test_offload_config_takes_a_measured_profile(local):
    assert OffloadConfig(profile=local).profile is local
    with pytest.raises(ValueError, match="profile"):
        OffloadConfig(profile="local")


def test_bench_writes_rows_with_the_machine(tmp_path, bench_script):
    bench = bench_script("moe_stall")
    out = tmp_path / "stall"
    assert bench.main(["--models", "olmoe", "--tokens", "6", "--warmup", "2", "--repeats", "1",
                       "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["machine"]["cores"] and result["profile"]["name"] == "local"
    assert len(result["rows"]) == 3 and all(r["decisions_equal"] for r in result["rows"])
    assert "stall_ratio" in out.with_suffix(".md").read_text()
