"""The real offloaded run and the simulator take the same scheduler decisions: a routing trace of
the model, replayed by `schedule_trace`, gives the decision sequence the offloaded model logged
while computing outputs identical to the original (or, where it serves misses from low-bit
copies, outputs close to it that differ exactly when a low-bit copy ran)."""

from __future__ import annotations

import pytest
import torch

from kvkit.moe.offload import OffloadConfig, offload
from kvkit.moe.sched import SchedConfig, schedule_trace
from kvkit.moe.sim import get_profile
from kvkit.moe.stall import decisions, decode_timed, trace_from_log

transformers = pytest.importorskip("transformers")

CONFIGS = [SchedConfig(2), SchedConfig(1, hints=False), SchedConfig(2, miss="load"),
           SchedConfig(3, miss="load", keep="lru", background=False)]
# low-bit copies (the tiny models route top-2 or top-3: rank 1 onwards may go low-bit)
LOWBIT = [SchedConfig(2, lowbit=True, lowbit_min_rank=1),
          SchedConfig(2, miss="load", keep="lru", background=False, hints=False, lowbit=True,
                      lowbit_min_rank=1)]


def _check_outputs(want: torch.Tensor, got: torch.Tensor, cfg: SchedConfig, hows: list[str]
                   ) -> None:
    """Identical without low-bit copies; with them, different once one ran, and close."""
    if not cfg.lowbit:
        assert torch.equal(want, got)
        return
    assert "lowbit" in hows
    assert not torch.equal(want, got)
    rel = (got - want).norm() / want.norm()
    assert rel < 0.05, rel


def _decode(model, ids: torch.Tensor) -> torch.Tensor:
    """Feed ids one token at a time (one scheduler step per layer per token); logits [T, V]."""
    return decode_timed(model, ids)[0]


def _profile_mixed():
    return get_profile("a100-pcie4")


@pytest.mark.parametrize("cfg", CONFIGS + LOWBIT, ids=lambda c: c.label() + f"@{c.capacity}")
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
    _, sim = schedule_trace(trace, cfg, _profile_mixed(), hidden_size=32)
    assert decisions(real.log) == decisions(sim.log)
    assert len(decisions(sim.log)) >= 12 * 3
    assert real.finish().seconds == pytest.approx(sim.finish().seconds)
    hows = [h for e in decisions(sim.log) if e[0] == "step" for _, h, _ in e[3]]
    _check_outputs(want, got, cfg, hows)
    assert stats["hits"] + stats["prefetch_useful"] + stats["misses"] == len(hows) == 12 * 3 * 2
    assert stats["hits"] == hows.count("hit") and stats["cpu"] == hows.count("cpu")
    assert stats["lowbit"] == hows.count("lowbit") == real.finish().lowbit
    assert stats["prefetch_issued"] == sum(e[0] == "bg" for e in sim.log)
    if not cfg.lowbit:
        assert ("cpu" in hows) == (cfg.miss != "load")
    assert ("hit" in hows) and ("load" in hows or "cpu" in hows)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe"])
@pytest.mark.parametrize("cfg", CONFIGS[:3] + LOWBIT[:1],
                         ids=lambda c: c.label() + f"@{c.capacity}")
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
        stats = handle.stats()
    trace = trace_from_log(real.log, real.L, real.E, real.expert_bytes, ref.config.num_experts_per_tok)
    _, sim = schedule_trace(trace, cfg, _profile_mixed(), hidden_size=64)
    assert decisions(real.log) == decisions(sim.log)
    hows = [h for e in decisions(sim.log) if e[0] == "step" for _, h, _ in e[3]]
    _check_outputs(want, got, cfg, hows)
    assert stats["lowbit"] == hows.count("lowbit")


def test_lowbit_ranks_follow_the_gate_weights(moe_builders):
    """The real path ranks a transformers expert by its token's gate weight, not by the column
    it comes in: with the router's columns reversed, the low-bit copies it serves are still
    never a token's top expert."""
    from kvkit.moe.offload import OffloadedExperts

    model = moe_builders["olmoe"]().eval()
    model.set_experts_implementation("eager")
    cfg = SchedConfig(2, miss="load", keep="lru", background=False, hints=False, lowbit=True,
                      lowbit_min_rank=1)
    tops: list[int] = []

    def reverse(mod, args):      # same (expert, weight) pairs, top expert in the last column
        hidden, index, weights = args
        return hidden, index.flip(-1), weights.flip(-1)

    def record(mod, args):
        _, index, weights = args
        tops.append(int(index[0, weights[0].argmax()]))

    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(5))
    with offload(model, OffloadConfig(capacity=2, policy="sched", sched=cfg,
                                      slow_tier="host")) as handle:
        for m in model.modules():
            if isinstance(m, OffloadedExperts):
                m.register_forward_pre_hook(reverse)
                m.register_forward_pre_hook(record)
        _decode(model, ids)
        steps = [e for e in handle.scheduler.log if e[0] == "step"]
    assert len(steps) == len(tops) == 6 * 2
    low = [(top, e) for top, s in zip(tops, steps) for e, how, _ in s[3] if how == "lowbit"]
    assert low and all(e != top for top, e in low)


def test_lowbit_roundtrip_is_per_row_and_bounded():
    from kvkit.moe.offload import lowbit_roundtrip

    w = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) \
        * torch.tensor([1.0, 10.0, 0.1, 100.0, 0.0])[:, None]
    q4, q8 = lowbit_roundtrip(w, 4), lowbit_roundtrip(w, 8)
    scale = w.abs().amax(-1, keepdim=True) / 7
    assert ((q4 - w).abs() <= scale / 2 + 1e-6 * scale).all()
    assert all(len(torch.unique(row)) <= 15 for row in q4)      # levels -7..7 per row
    assert torch.equal(q4[4], torch.zeros(64))
    assert (q8 - w).norm() < (q4 - w).norm() / 8 and not torch.equal(q4, w)
    assert lowbit_roundtrip(w.bfloat16(), 4).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bits must be in"):
        lowbit_roundtrip(w, 0)
