"""Measured against modelled time of the offloaded scheduler: one real run, one simulation.

`measure_vs_model` offloads a model with `policy="sched"` on a given `HardwareProfile`, decodes
token ids one at a time (one scheduler step per layer per token) and times each forward; it then
replays the run's routing (a trace recorded beforehand, or the one its decision log gives) with
`schedule_trace` on the same profile, checks that the decisions are the same, and returns the
measured seconds per token (`stats()` of `kvkit.moe.offload`: stall, expert compute per tier,
the scheduler's own time, the rest of the forward) beside the modelled ones and their ratios.

What the two sides count: the modelled clock has no non-expert work (`other_per_layer_s=0`,
as in the real run's scheduler, so that both take the same decisions); its time per token is
the expert path (stall + expert compute), and its stall includes waiting for the slow device.
The measured stall is the compute thread waiting on transfers only; slow-tier expert compute is
measured apart (`slow_ms`), on the same thread as the fast tier's.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from kvkit.moe.offload import OffloadConfig, offload
from kvkit.moe.sched import SchedConfig, schedule_trace
from kvkit.moe.sim import HardwareProfile
from kvkit.moe.trace import Trace

__all__ = ["trace_from_log", "decode_timed", "measure_vs_model", "decisions"]


def decisions(log: list[tuple]) -> list[tuple]:
    """A scheduler log without its hints: the decisions two runs must share."""
    return [entry for entry in log if entry[0] != "hint"]


def trace_from_log(log: list[tuple], layers: int, num_experts: int, expert_bytes: int,
                   top_k: int) -> Trace:
    """The routing (in gate order where the run logged ranks) and the layer-ahead hints a real
    run with one token per step logged, as a trace."""
    steps = [e for e in log if e[0] == "step"]
    ranks = {e[1]: e[3] for e in log if e[0] == "ranks"}
    tokens = len(steps) // layers
    rows = []
    for s in steps:
        row = [e for e, _, _ in s[3]]
        if s[1] in ranks:       # one token per step: the ranks are a permutation of the top-k
            if sorted(ranks[s[1]]) != list(range(top_k)):
                raise ValueError(f"step {s[1]}: ranks {ranks[s[1]]} are not a top-{top_k} order")
            row = [e for _, e in sorted(zip(ranks[s[1]], row))]
        rows.append(row)
    experts = np.array(rows).reshape(tokens, layers, top_k)
    pred = np.full((tokens, layers, top_k), -1)
    for _, target, layer, hinted in (e for e in log if e[0] == "hint"):
        t = target // layers
        if t < tokens:
            pred[t, layer, :len(hinted)] = hinted
    meta = {"num_experts": num_experts, "top_k": top_k, "expert_bytes": expert_bytes,
            "model": "tiny"}
    return Trace(experts, np.zeros(tokens, dtype=np.int64), pred, 1, meta, "layers")


@torch.no_grad()
def decode_timed(model: nn.Module, ids: torch.Tensor,
                 before: Callable[[int], None] | None = None) -> tuple[torch.Tensor, list[float]]:
    """Feed ids [1, T] one token at a time with a KV cache, calling `before(i)` (untimed)
    ahead of token i; (logits [T, V], seconds per forward)."""
    past, out, secs = None, [], []
    for i in range(ids.shape[1]):
        if before is not None:
            before(i)
        t0 = time.perf_counter()
        step = model(ids[:, i:i + 1], past_key_values=past, use_cache=True)
        secs.append(time.perf_counter() - t0)
        past = step.past_key_values
        out.append(step.logits[0, -1])
    return torch.stack(out), secs


def measure_vs_model(model: nn.Module, ids: torch.Tensor, config: SchedConfig,
                     profile: HardwareProfile, top_k: int, trace: Trace | None = None,
                     warmup_tokens: int = 2, slow_tier: str = "file") -> dict[str, Any]:
    """Offload `model` (changed in place) with `config` on `profile`, decode `ids` [1, T], and
    compare the tokens after `warmup_tokens` with `schedule_trace` on `trace` (default: the
    run's own log; give a recorded trace where hints come earlier than one layer ahead, e.g.
    Read-ME's pre-gating router). Times in ms per token.

    Raises:
        ValueError: warm-up leaves no token; the trace's expert size differs from the model's.
        RuntimeError: the simulation took other decisions than the real run.
    """
    T = ids.shape[1]
    if not 0 <= warmup_tokens < T:
        raise ValueError(f"warmup_tokens={warmup_tokens} must be in [0, {T})")
    cfg = OffloadConfig(capacity=config.capacity, policy="sched", sched=config, profile=profile,
                        slow_tier=slow_tier, record_metrics=False)
    with offload(model, cfg) as handle:
        real = handle.scheduler
        if trace is not None and trace.expert_bytes != real.expert_bytes:
            raise ValueError(f"trace experts are {trace.expert_bytes} bytes, the model's "
                             f"{real.expert_bytes}: record the trace with the model's dtype")
        _, secs = decode_timed(model, ids, lambda i: i == warmup_tokens and handle.reset_stats())
        stats = handle.stats()
    warm, secs = secs[:warmup_tokens], secs[warmup_tokens:]
    if trace is None:
        trace = trace_from_log(real.log, real.L, real.E, real.expert_bytes, top_k)
    sim, sched = schedule_trace(trace, config, profile, warmup_tokens, real.hidden_size)
    if decisions(sched.log) != decisions(real.log):
        raise RuntimeError("the simulator took other decisions than the real run")
    n = T - warmup_tokens
    ms = {k: 1e3 * stats[k] / n for k in ("stall_s", "fast_s", "slow_s", "plan_s")}
    total = 1e3 * sum(secs) / n
    expert = ms["stall_s"] + ms["fast_s"] + ms["slow_s"]
    model_ms, model_stall = 1e3 * sim.seconds / n, 1e3 * sim.stall_seconds / n
    return {
        "scheduler": config.label(), "capacity": config.capacity, "tokens": n,
        "hits": stats["hits"], "misses": stats["misses"], "cpu": stats["cpu"],
        "prefetch_issued": stats["prefetch_issued"],
        "ms_per_token": total, "stall_ms": ms["stall_s"], "fast_ms": ms["fast_s"],
        "slow_ms": ms["slow_s"], "plan_ms": ms["plan_s"],
        "other_ms": total - expert - ms["plan_s"], "expert_path_ms": expert,
        "model_ms_per_token": model_ms, "model_stall_ms": model_stall,
        "model_compute_ms": model_ms - model_stall,
        "stall_ratio": ms["stall_s"] / model_stall if model_stall > 0 else None,
        "expert_path_ratio": expert / model_ms if model_ms > 0 else None,
        "time_ratio": total / model_ms if model_ms > 0 else None,
        "warmup_ms_per_token": 1e3 * sum(warm) / max(len(warm), 1),
        "decisions_equal": True,
    }
