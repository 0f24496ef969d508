"""The real offloaded run and the simulator take the same scheduler decisions: a routing trace of
the model, replayed by `schedule_trace`, gives the decision sequence the offloaded model logged
while computing outputs identical to the original."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvkit.moe.offload import OffloadConfig, offload
from kvkit.moe.sched import SchedConfig, schedule_trace
from kvkit.moe.sim import get_profile
from kvkit.moe.trace import Trace

transformers = pytest.importorskip("transformers")

CONFIGS = [SchedConfig(2), SchedConfig(1, hints=False), SchedConfig(2, miss="load"),
           SchedConfig(3, miss="load", keep="lru", background=False)]


def _decode(model, ids: torch.Tensor) -> torch.Tensor:
    """Feed ids one token at a time (one scheduler step per layer per token); logits [T, V]."""
    past, out = None, []
    with torch.no_grad():
        for i in range(ids.shape[1]):
            step = model(ids[:, i:i + 1], past_key_values=past, use_cache=True)
            past = step.past_key_values
            out.append(step.logits[0, -1])
    return torch.stack(out)


def _decisions(log: list[tuple]) -> list[tuple]:
    return [entry for entry in log if entry[0] != "hint"]


def _profile_mixed():
    return get_profile("a100-pcie4")


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label() + f"@{c.capacity}")
def test_readme_offloaded_decisions_match_simulator(moe_builders, cfg):
    from kvkit.moe.readme.tracing import record_trace

    moe = moe_builders["readme"]()
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    want = _decode(moe.model, ids)
    trace = record_trace(moe, [ids[0]], router="pregate", predict_k=moe.config.top_k,
                         model_name="tiny", expert_dtype_bytes=4)
    with offload(moe.model, OffloadConfig(capacity=cfg.capacity, policy="sched", sched=cfg,
                                          slow_tier="host")) as handle:
        got = _decode(moe.model, ids)
        real = handle.scheduler
        stats = handle.stats()
    assert torch.equal(want, got)
    _, sim = schedule_trace(trace, cfg, _profile_mixed(), hidden_size=32)
    assert _decisions(real.log) == _decisions(sim.log)
    assert len(_decisions(sim.log)) >= 12 * 3
    assert real.finish().seconds == pytest.approx(sim.finish().seconds)
    hows = [h for e in _decisions(sim.log) if e[0] == "step" for _, h, _ in e[3]]
    assert stats["hits"] + stats["prefetch_useful"] + stats["misses"] == len(hows) == 12 * 3 * 2
    assert stats["hits"] == hows.count("hit") and stats["cpu"] == hows.count("cpu")
    assert stats["prefetch_issued"] == sum(e[0] == "bg" for e in sim.log)
    assert ("cpu" in hows) == (cfg.miss != "load")
    assert ("hit" in hows) and ("load" in hows or "cpu" in hows)


def _trace_from_log(log: list[tuple], layers: int, num_experts: int, expert_bytes: int,
                    top_k: int) -> Trace:
    """The routing and the layer-ahead hints a real run logged, as a trace."""
    steps = [e for e in log if e[0] == "step"]
    tokens = len(steps) // layers
    experts = np.array([[e for e, _, _ in s[3]] for s in steps]).reshape(tokens, layers, top_k)
    pred = np.full((tokens, layers, top_k), -1)
    for _, target, layer, hinted in (e for e in log if e[0] == "hint"):
        t = target // layers
        if t < tokens:
            pred[t, layer, :len(hinted)] = hinted
    meta = {"num_experts": num_experts, "top_k": top_k, "expert_bytes": expert_bytes,
            "model": "tiny"}
    return Trace(experts, np.zeros(tokens, dtype=np.int64), pred, 1, meta, "layers")


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe"])
@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: c.label() + f"@{c.capacity}")
def test_transformers_offloaded_decisions_match_simulator(moe_builders, name, cfg):
    build = moe_builders[name]
    torch.manual_seed(0)
    ref = build().eval()
    ref.set_experts_implementation("eager")
    model = build().eval()
    model.load_state_dict(ref.state_dict())
    model.set_experts_implementation("eager")
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(4))
    want = _decode(ref, ids)
    with offload(model, OffloadConfig(capacity=cfg.capacity, policy="sched", sched=cfg,
                                      slow_tier="host")) as handle:
        got = _decode(model, ids)
        real = handle.scheduler
    assert torch.equal(want, got)
    trace = _trace_from_log(real.log, real.L, real.E, real.expert_bytes, ref.config.num_experts_per_tok)
    _, sim = schedule_trace(trace, cfg, _profile_mixed(), hidden_size=64)
    assert _decisions(real.log) == _decisions(sim.log)
