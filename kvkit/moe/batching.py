"""Expert-aware batching: pick the requests of each decode step so they need fewer experts.

In memory-bound MoE decode a step reads (or loads) every distinct expert its tokens route to,
so a batch whose tokens share experts is cheaper. With a pre-gating router (Read-ME,
arXiv:2410.19123) the experts of each queued request's *next* token are known before the step,
so the scheduler can group requests by them. This module compares:

* `fcfs`         - continuous batching in arrival order: the `batch_size` oldest unfinished
                   requests decode together (vLLM's default).
* `expert_aware` - among the `window` oldest unfinished requests, greedily add the request that
                   adds the fewest new experts (summed over layers) to the step; a request not
                   scheduled for `max_wait_steps` consecutive steps is taken first, which bounds
                   its added inter-token latency to `max_wait_steps` steps. `seeds` > 1 retries
                   the greedy fill from other first requests and keeps the smallest union.

Each request's tokens come from a `Trace` (tokens of one request in order). The scheduler sees
`trace.predicted` when present, else the true experts (an exact pre-gating router, which is what
Read-ME's decoupled router is). Step time for latency in seconds: a memory-bound roofline,
`step_fixed_s + distinct_experts * expert_bytes / mem_bytes_per_s`.
Shapes: R requests, L layers, E experts, W window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kvkit.moe.trace import Trace

STRATEGIES = ("fcfs", "expert_aware")

__all__ = ["BatchConfig", "BatchResult", "schedule", "STRATEGIES"]


@dataclass(frozen=True)
class BatchConfig:
    """batch_size tokens per step; window and max_wait_steps only for expert_aware."""

    strategy: str = "expert_aware"
    batch_size: int = 8
    window: int = 16
    max_wait_steps: int = 2
    step_fixed_s: float = 0.0
    mem_bytes_per_s: float = 1.55e12
    seeds: int = 1          # expert_aware: fill attempts from different first requests

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"BatchConfig.strategy must be one of {STRATEGIES}, "
                             f"got {self.strategy!r}")
        if self.batch_size < 1:
            raise ValueError(f"BatchConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.window < self.batch_size:
            raise ValueError(f"BatchConfig.window ({self.window}) must be >= batch_size "
                             f"({self.batch_size}) so a step can be filled")
        if self.max_wait_steps < 0 or self.step_fixed_s < 0 or self.mem_bytes_per_s <= 0 \
                or self.seeds < 1:
            raise ValueError("BatchConfig needs max_wait_steps >= 0, step_fixed_s >= 0, "
                             "mem_bytes_per_s > 0, seeds >= 1")


@dataclass(frozen=True)
class BatchResult:
    strategy: str
    steps: int
    tokens: int
    distinct_per_step: float          # distinct experts per layer per step, mean
    bytes_per_token: float            # expert bytes read per token (all layers)
    completion_steps: np.ndarray      # [R] step at which each request finished
    completion_s: np.ndarray          # [R] modelled seconds at which each request finished
    max_gap_steps: int                # longest wait between two tokens of one request

    def summary(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "steps": self.steps, "tokens": self.tokens,
                "distinct_experts_per_layer_step": round(self.distinct_per_step, 3),
                "bytes_per_token": round(self.bytes_per_token, 1),
                "completion_steps_mean": float(self.completion_steps.mean()),
                "completion_steps_p90": float(np.percentile(self.completion_steps, 90)),
                "completion_s_mean": float(self.completion_s.mean()),
                "completion_s_p90": float(np.percentile(self.completion_s, 90)),
                "max_gap_steps": self.max_gap_steps}


def _request_tokens(trace: Trace) -> list[np.ndarray]:
    """Token indices of each request, requests in order of first arrival."""
    _, first = np.unique(trace.request, return_index=True)
    order = trace.request[np.sort(first)]
    return [np.flatnonzero(trace.request == r) for r in order]


def _fill(chosen: list[int], rest: list[int], cand: np.ndarray, union: np.ndarray,
          batch_size: int) -> tuple[list[int], int]:
    """Greedily add the candidate adding the fewest new experts until the batch is full."""
    chosen, rest, union = list(chosen), list(rest), union.copy()
    while len(chosen) < batch_size and rest:
        added = (cand & ~union).sum((1, 2))                          # [W]
        i = int(np.argmin(added))                # ties: the oldest (first in window order)
        chosen.append(rest[i])
        union |= cand[i]
        cand = np.delete(cand, i, axis=0)
        rest.pop(i)
    return chosen, int(union.sum())


def _greedy(due: list[int], rest: list[int], reqs: list[np.ndarray], pos: np.ndarray,
            onehot: np.ndarray, config: BatchConfig) -> list[int]:
    """Due requests first, then greedy fill; with `seeds` > 1 also try starting the fill from
    each of the `seeds` oldest other requests and keep the smallest union."""
    L, E = onehot.shape[1:]
    union = np.zeros((L, E), dtype=bool)
    for r in due:
        union |= onehot[reqs[r][pos[r]]]
    if not rest or len(due) >= config.batch_size:
        return due[:config.batch_size]
    cand = np.stack([onehot[reqs[r][pos[r]]] for r in rest])             # [W, L, E]
    best, best_size = _fill(due, rest, cand, union, config.batch_size)
    for i in range(1, min(config.seeds, len(rest))):
        keep = [j for j in range(len(rest)) if j != i]
        chosen, size = _fill(due + [rest[i]], [rest[j] for j in keep], cand[keep],
                             union | cand[i], config.batch_size)
        if size < best_size:
            best, best_size = chosen, size
    return best


def schedule(trace: Trace, config: BatchConfig) -> BatchResult:
    """Decode every request of `trace` to completion (all queued at time 0) and measure."""
    E, L = trace.num_experts, trace.num_layers
    seen = trace.predicted if trace.predicted is not None else trace.experts
    onehot_true = np.zeros((trace.num_tokens, L, E), dtype=bool)
    np.put_along_axis(onehot_true, trace.experts, True, axis=-1)
    onehot_seen = np.zeros((trace.num_tokens, L, E + 1), dtype=bool)   # column E: padding -1
    np.put_along_axis(onehot_seen, np.where(seen < 0, E, seen), True, axis=-1)
    onehot_seen = onehot_seen[..., :E]
    reqs = _request_tokens(trace)
    R = len(reqs)
    pos = np.zeros(R, dtype=np.int64)                 # next token of each request
    lengths = np.array([len(r) for r in reqs])
    last_run = np.full(R, -1, dtype=np.int64)
    done_step = np.zeros(R, dtype=np.int64)
    done_s = np.zeros(R)
    step = tokens = distinct_total = max_gap = 0
    clock = 0.0
    unfinished = list(range(R))
    while unfinished:
        if config.strategy == "fcfs":
            chosen = unfinished[:config.batch_size]
        else:
            window = unfinished[:config.window]
            # requests due: waited max_wait_steps since their last token (or since step 0)
            waited = np.array([step - max(last_run[r], -1) - 1 for r in window])
            due = [window[i] for i in np.argsort(-waited, kind="stable")
                   if waited[i] >= config.max_wait_steps][:config.batch_size]
            chosen = _greedy(due, [r for r in window if r not in set(due)], reqs, pos,
                             onehot_seen, config)
        union = np.zeros((L, E), dtype=bool)
        for r in chosen:
            union |= onehot_true[reqs[r][pos[r]]]
        distinct = int(union.sum())
        distinct_total += distinct
        clock += config.step_fixed_s + distinct * trace.expert_bytes / config.mem_bytes_per_s
        for r in chosen:
            if last_run[r] >= 0:
                max_gap = max(max_gap, step - last_run[r])
            last_run[r] = step
            pos[r] += 1
            tokens += 1
            if pos[r] == lengths[r]:
                done_step[r], done_s[r] = step + 1, clock
        unfinished = [r for r in unfinished if pos[r] < lengths[r]]
        step += 1
    return BatchResult(config.strategy, step, tokens, distinct_total / (step * L),
                       distinct_total * trace.expert_bytes / tokens, done_step, done_s, max_gap)
