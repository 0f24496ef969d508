"""Online expert scheduler: the decisions of each MoE layer call, taken on a modelled clock.

One `Scheduler` serves both the trace-driven simulator (`schedule_trace`) and the real offloaded
model (`kvkit.moe.offload` with `policy="sched"`): the same calls in the same order give the same
decisions, so what the simulator prices is what the real run does.

Parts (each can be switched off, so each is measured alone):

* where a miss runs (`miss`): "load" waits for the link and runs on the fast device; "cpu"
  computes on the slow device where the weights are (Fiddler, arXiv:2402.07033); "auto" splits
  a step's misses between the two so that the step finishes first.
* what stays in the fast tier (`keep`): "lru" (last use), or "reuse": the predicted chance that
  the expert is used at its layer's next call - a per-request (or global) decayed frequency
  (`reuse`), raised to `hint_confidence` for experts a predictor names for that call.
* background transfers (`background`): while the link has less work queued than the last step
  took (it would otherwise idle during this one), bring in the missing expert whose predicted
  chance of use beats that of the resident it evicts by `min_gain`. Demand loads preempt them at
  `chunk_bytes` granularity, so a wrong transfer delays a demand load by at most one chunk.
* hints (`hints`): the experts of a layer's next call named ahead of time (the Read-ME
  pre-gating router, a layer-ahead predictor) via `hint()`.

Clock, per step (one layer of one token): the step starts when the previous one ends; its
demand loads form one transfer after the chunk in flight; the fast device runs after all of
them arrived (hits, loads, `other_per_layer_s`); the slow device starts at once, after shipping
the activations (one link latency each way). With `miss="load", keep="lru"` this is the timeline
of `kvkit.moe.sim.simulate` on an LRU replay. Counters: `hit_rate` counts demand hits only; the
first use of an expert a background transfer brought is a prefetch hit, reported apart.

Limits: one token per step in the trace driver; low-bit copies are not among the choices.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from kvkit.moe.sim import HardwareProfile, expert_seconds
from kvkit.moe.trace import Trace

MISS = ("load", "cpu", "auto")
KEEP = ("lru", "reuse")
REUSE = ("request", "global")

__all__ = ["SchedConfig", "Scheduler", "SchedResult", "schedule_trace", "standard_configs",
           "compare_schedules", "MISS", "KEEP", "REUSE"]


@dataclass(frozen=True)
class SchedConfig:
    """One configuration of the scheduler (see the module docstring for each part).

    capacity:         fast-tier experts per layer (may be below top_k: the rest stream or run
                      on the slow device).
    reuse_half_life:  tokens after which a use counts half in the frequency estimate.
    global_half_life: the same for the cross-request prior a new request starts from.
    active_tokens:    a request stays in the reuse estimate this many tokens after its last one.
    min_gain:         predicted-use margin a background transfer must win by.
    hint_confidence:  chance of use given to an expert a hint names.
    """

    capacity: int
    miss: str = "auto"
    keep: str = "reuse"
    reuse: str = "request"
    background: bool = True
    hints: bool = True
    hint_confidence: float = 1.0
    reuse_half_life: float = 16.0
    global_half_life: float = 256.0
    active_tokens: int = 64
    min_gain: float = 0.05
    chunk_bytes: int = 1 << 21

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"SchedConfig.capacity must be >= 1 expert, got {self.capacity}")
        for name, allowed in (("miss", MISS), ("keep", KEEP), ("reuse", REUSE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"SchedConfig.{name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if self.background and self.keep != "reuse":
            raise ValueError("SchedConfig.background needs keep='reuse' (a transfer is admitted "
                             "by predicted use); set background=False for keep='lru'")
        if not (self.reuse_half_life > 0 and self.global_half_life > 0 and self.chunk_bytes > 0
                and self.active_tokens >= 1 and 0 <= self.hint_confidence <= 1
                and self.min_gain >= 0):
            raise ValueError("SchedConfig needs half-lives > 0, chunk_bytes > 0, "
                             "active_tokens >= 1, hint_confidence in [0, 1], min_gain >= 0")

    def label(self) -> str:
        """Short name of the configuration, e.g. 'auto+reuse/request+bg+hints'."""
        parts = [self.miss, f"{self.keep}/{self.reuse}" if self.keep == "reuse" else self.keep]
        return "+".join(parts + [p for p, on in (("bg", self.background),
                                                 ("hints", self.hints)) if on])


@dataclass
class SchedResult:
    """Counters of a run after warm-up. Times in seconds; a step is one layer of one token."""

    config: dict[str, Any]
    tokens: int = 0
    seconds: float = 0.0
    stall_seconds: float = 0.0          # fast device idle: waiting for the link or the CPU
    accesses: int = 0
    demand_hits: int = 0
    prefetch_hits: int = 0              # first use of an expert a background transfer brought
    loads: int = 0                      # demand loads over the link (kept or streamed)
    waits: int = 0                      # background transfer in flight, promoted to demand
    cpu: int = 0                        # experts computed on the slow device
    demand_bytes: int = 0
    background_bytes: int = 0
    background_issued: int = 0
    background_used: int = 0            # brought experts used at least once before eviction

    @property
    def hit_rate(self) -> float:
        return self.demand_hits / max(self.accesses, 1)

    def summary(self) -> dict[str, Any]:
        n, a = max(self.tokens, 1), max(self.accesses, 1)
        return {"ms_per_token": 1e3 * self.seconds / n,
                "stall_ms_per_token": 1e3 * self.stall_seconds / n,
                "hit_rate": self.hit_rate, "prefetch_hit_rate": self.prefetch_hits / a,
                "fast_share": (self.demand_hits + self.prefetch_hits + self.loads + self.waits) / a,
                "cpu_share": self.cpu / a,
                "bytes_per_token": (self.demand_bytes + self.background_bytes) / n,
                "demand_bytes_per_token": self.demand_bytes / n,
                "background_bytes_per_token": self.background_bytes / n,
                "background_accuracy": self.background_used / self.background_issued
                if self.background_issued else None}


class _Link:
    """The slow->fast link: a FIFO of background transfers that demand loads preempt."""

    def __init__(self, chunk_s: float) -> None:
        self.t = 0.0
        self.chunk_s = chunk_s
        self.queue: deque[list] = deque()        # [layer, expert, remaining_s, total_s]

    def advance(self, t: float) -> list[tuple[int, int]]:
        """Run background transfers up to time t; return the (layer, expert) that arrived."""
        done = []
        while self.queue and self.t < t:
            item = self.queue[0]
            if self.t + item[2] <= t:
                self.t += item[2]
                done.append((item[0], item[1]))
                self.queue.popleft()
            else:
                item[2] -= t - self.t
                self.t = t
        self.t = max(self.t, t)
        return done

    def backlog(self) -> float:
        return sum(item[2] for item in self.queue)

    def remaining(self, layer: int, expert: int) -> float:
        return next(i[2] for i in self.queue if i[0] == layer and i[1] == expert)

    def preempt_delay(self, promoted: set[tuple[int, int]]) -> float:
        """Time until the chunk in flight ends (0 if none is in flight or it is promoted)."""
        if not self.queue:
            return 0.0
        head = self.queue[0]
        if head[2] >= head[3] or (head[0], head[1]) in promoted:
            return 0.0
        return min(head[2], head[2] % self.chunk_s)

    def demand(self, now: float, promoted: set[tuple[int, int]], seconds: float
               ) -> tuple[float, list[tuple[int, int]]]:
        """A demand transfer of `seconds` plus the promoted background items, started after the
        chunk in flight; returns its end and the background items that finished first."""
        delay = self.preempt_delay(promoted)
        done = []
        if delay:
            self.queue[0][2] -= delay
            if self.queue[0][2] <= 0:
                head = self.queue.popleft()
                done.append((head[0], head[1]))
        extra = sum(i[2] for i in self.queue if (i[0], i[1]) in promoted)
        self.queue = deque(i for i in self.queue if (i[0], i[1]) not in promoted)
        self.t = now + delay + extra + seconds
        return self.t, done


class Scheduler:
    """Decides, per layer call, which needed experts are hits, loads, waits or CPU work and
    which background transfers start; keeps the modelled clock and the counters.

    Call `hint(layer, experts)` when a predictor names a later call's experts, then
    `plan(layer, experts, request)` for each layer call in execution order. Decisions are
    logged in `log` (one tuple per step and per background transfer) and also returned.
    """

    def __init__(self, config: SchedConfig, num_layers: int, num_experts: int,
                 expert_bytes: int, profile: HardwareProfile, hidden_size: int = 2048,
                 tokens_per_step: int = 1, other_per_layer_s: float = 0.0,
                 warmup_tokens: int = 0) -> None:
        if min(num_layers, num_experts, expert_bytes, hidden_size, tokens_per_step) < 1:
            raise ValueError("Scheduler needs num_layers, num_experts, expert_bytes, hidden_size "
                             "and tokens_per_step >= 1")
        c, L, E = config, num_layers, num_experts
        self.config, self.L, self.E = c, L, E
        self.cap = min(c.capacity, E)
        self.latency_s = profile.link_latency_s
        self.bytes_s = expert_bytes / profile.link_bytes_per_s
        self.load_s = self.latency_s + self.bytes_s
        self.expert_bytes = expert_bytes
        self.fast_s = expert_seconds(expert_bytes, tokens_per_step, profile.fast_flops,
                                     profile.fast_mem_bytes_per_s)
        self.slow_s = expert_seconds(expert_bytes, tokens_per_step, profile.slow_flops,
                                     profile.slow_mem_bytes_per_s)
        # activations to the slow device and back: one transfer each way
        self.act_s = 2 * profile.transfer_seconds(tokens_per_step * hidden_size * 2)
        self.other_s = other_per_layer_s
        self.link = _Link(c.chunk_bytes / profile.link_bytes_per_s)
        self.resident = np.zeros((L, E), dtype=bool)
        self.ready = np.zeros((L, E), dtype=bool)
        # brought in the background and not used yet: 1 issued in warm-up, 2 issued counting
        self.fresh = np.zeros((L, E), dtype=np.int8)
        self.last_use = np.full((L, E), -1.0)
        self.rate = 1.0 - 0.5 ** (1.0 / c.reuse_half_life)
        self.glob_rate = 1.0 - 0.5 ** (1.0 / c.global_half_life)
        prior = 1.0 / E
        self.glob = np.full((L, E), prior)               # slow prior across requests
        self.fast_glob = np.full((L, E), prior)          # reuse="global": one estimate for all
        self.freq: dict[int, np.ndarray] = {}
        self.seen: dict[int, int] = {}
        self.p = np.full((L, E), prior)                  # predicted chance of use, next call
        self.pending: list[dict[int, set[int]]] = [{} for _ in range(L)]  # target step -> set
        self.now = 0.0
        self.last_step_s = 0.0
        self.token, self.layer = -1, L
        self.warm_token = warmup_tokens
        self.log: list[tuple] = []
        self.result = SchedResult(asdict(c))
        self._t_begin = 0.0

    # -- predictions ---------------------------------------------------------------------
    def hint(self, layer: int, experts: Sequence[int], tokens_ahead: int = 0) -> None:
        """A predictor names `experts` for the call of `layer` in token current + tokens_ahead
        (the current token's call if that layer has not run yet this token, else the next)."""
        if not self.config.hints:
            return
        token = max(self.token, 0) + tokens_ahead + (1 if layer <= self.layer < self.L
                                                      and self.token >= 0 else 0)
        target = token * self.L + layer
        self.pending[layer][target] = {int(e) for e in experts}
        self.log.append(("hint", target, layer, tuple(sorted(self.pending[layer][target]))))

    def _values(self, layer: int | None = None) -> np.ndarray:
        """Keep value of every (layer, expert) [L, E], or of one layer's experts [E]: the last
        use (keep="lru") or the predicted chance of use; hinted experts rank first."""
        lru = self.config.keep == "lru"
        base = self.last_use if lru else self.p
        v = (base if layer is None else base[layer]).copy()
        for l in range(self.L) if layer is None else [layer]:
            row = v[l] if layer is None else v
            for experts in self.pending[l].values():
                idx = list(experts)
                row[idx] = row[idx] + 1e12 if lru else np.maximum(row[idx],
                                                                  self.config.hint_confidence)
        return v

    # -- one layer call --------------------------------------------------------------------
    def plan(self, layer: int, experts: Sequence[int], request: int = 0
             ) -> tuple[list[tuple[int, str, int]], list[tuple[int, int, int]]]:
        """Decide one layer call. Returns (per needed expert, ascending: (expert, how, evicted
        expert or -1), background transfers started now: (layer, expert, evicted or -1)). `how` is
        "hit", "prefetch" (first use of a background transfer), "wait" (transfer in flight,
        finished as demand), "load" (kept in the fast tier), "stream" (loaded, used once) or
        "cpu"."""
        if not 0 <= layer < self.L:
            raise ValueError(f"layer {layer} is outside [0, {self.L})")
        if layer <= self.layer or self.token < 0:
            self._begin_token(request)
        self.layer = layer
        step = self.token * self.L + layer
        counting = self.token >= self.warm_token
        c, res, now = self.config, self.result, self.now
        for l, e in self.link.advance(now):
            self.ready[l, e] = True
        need = sorted({int(e) for e in experts})   # order-free: same decisions for any order
        bg = self._background(layer, set(need), step) if c.background else []
        hows: dict[int, str] = {}
        inflight, missing = [], []
        for e in need:
            if self.ready[layer, e]:
                hows[e] = "prefetch" if self.fresh[layer, e] else "hit"
            elif self.resident[layer, e]:
                inflight.append(e)
            else:
                missing.append(e)
        inflight.sort(key=lambda e: self.link.remaining(layer, e))
        cands = inflight + missing
        n_hit = len(hows)
        j = self._split(layer, n_hit, inflight, missing)
        promoted = {(layer, e) for e in inflight[:j]}
        n_load = max(0, j - len(inflight))
        load_end = now
        if j:
            load_end, done = self.link.demand(now, promoted, self._miss_seconds(n_load))
            for l, e in done:
                self.ready[l, e] = True
        n_cpu = len(cands) - j
        fast_work = (n_hit + j) * self.fast_s + self.other_s
        fast_end = load_end + fast_work
        cpu_end = now + (self.act_s + n_cpu * self.slow_s if n_cpu else 0.0)
        end = max(fast_end, cpu_end)
        for e in inflight[:j]:
            hows[e] = "wait"
            self.ready[layer, e] = True
        for e in cands[j:]:
            hows[e] = "cpu"
        self._touch(layer, need, step, request)
        decisions = []
        for e in need:
            victim = -1
            if e in missing[:n_load]:
                victim = self._admit(layer, e, set(need))
                hows[e] = "load" if victim != -2 else "stream"
                victim = max(victim, -1)
            decisions.append((e, hows[e], victim))
        if counting:
            res.accesses += len(need)
            res.demand_hits += sum(h == "hit" for h in hows.values())
            res.prefetch_hits += sum(h == "prefetch" for h in hows.values())
            res.waits += sum(h == "wait" for h in hows.values())
            res.loads += n_load
            res.cpu += n_cpu
            res.demand_bytes += n_load * self.expert_bytes
            res.stall_seconds += end - now - fast_work
        for e in need:
            if hows[e] in ("prefetch", "wait") and self.fresh[layer, e]:
                res.background_used += counting and self.fresh[layer, e] == 2
                self.fresh[layer, e] = 0
        for target in [t for t in self.pending[layer] if t <= step]:
            del self.pending[layer][target]
        self.last_step_s = end - now
        self.now = end
        self.log.append(("step", step, layer, tuple(decisions)))
        return decisions, bg

    def _miss_seconds(self, n: int) -> float:
        """Demand loads of one step: one transfer, one latency."""
        return 0.0 if n == 0 else self.latency_s + n * self.bytes_s

    def _split(self, layer: int, n_hit: int, inflight: list[int], missing: list[int]) -> int:
        """How many of inflight + missing (in that order) go over the link; the rest run on
        the slow device. "load" takes all, "cpu" none, "auto" the count that ends first."""
        n = len(inflight) + len(missing)
        if self.config.miss == "load" or n == 0:
            return n
        if self.config.miss == "cpu":
            return 0
        best, best_end = 0, float("inf")
        rem = [self.link.remaining(layer, e) for e in inflight]
        for j in range(n + 1):
            promoted = {(layer, e) for e in inflight[:j]}
            link = 0.0
            if j:
                link = self.link.preempt_delay(promoted) + sum(rem[:j]) \
                    + self._miss_seconds(max(0, j - len(inflight)))
            fast_end = link + (n_hit + j) * self.fast_s + self.other_s
            cpu_end = self.act_s + (n - j) * self.slow_s if n - j else 0.0
            end = max(fast_end, cpu_end)
            if end < best_end - 1e-15:
                best, best_end = j, end
        return best

    def _victim(self, layer: int, protect: set[int], values: np.ndarray) -> int:
        """Resident, arrived, unprotected expert of lowest value; -1 if the layer has a free
        slot; -2 if there is none to evict."""
        if int(self.resident[layer].sum()) < self.cap:
            return -1
        cand = self.ready[layer].copy()
        cand[list(protect)] = False
        if not cand.any():
            return -2
        return int(np.argmin(np.where(cand, values, np.inf)))

    def _evict(self, layer: int, e: int) -> None:
        self.resident[layer, e] = self.ready[layer, e] = False
        self.fresh[layer, e] = 0

    def _admit(self, layer: int, e: int, protect: set[int]) -> int:
        """Keep a demand-loaded expert if it is worth at least its victim; returns the victim,
        -1 (free slot) or -2 (not kept: streamed)."""
        values = self._values(layer)
        victim = self._victim(layer, protect, values)
        if victim == -2 or (victim >= 0 and values[e] < values[victim]):
            return -2
        if victim >= 0:
            self._evict(layer, victim)
        self.resident[layer, e] = self.ready[layer, e] = True
        return victim

    def _background(self, layer: int, need: set[int], step: int) -> list[tuple[int, int, int]]:
        """Start background transfers while the link would otherwise idle this step."""
        started: list[tuple[int, int, int]] = []
        backlog = self.link.backlog()
        rows = np.arange(self.L)
        while backlog <= self.last_step_s:
            v = self._values()
            cand = np.where(self.resident, -np.inf, v)
            best_e = cand.argmax(1)
            evictable = self.ready.copy()
            evictable[layer, list(need)] = False
            vv = np.where(evictable, v, np.inf)
            victims = vv.argmin(1)
            free = self.resident.sum(1) < self.cap
            gains = cand[rows, best_e] - np.where(free, 0.0, vv[rows, victims])
            victims = np.where(free, -1, victims)
            l = int(gains.argmax())
            if not gains[l] > self.config.min_gain:
                break
            e, victim = int(best_e[l]), int(victims[l])
            if victim >= 0:
                self._evict(l, victim)
            self.resident[l, e] = True
            self.fresh[l, e] = 2 if self.token >= self.warm_token else 1
            self.link.queue.append([l, e, self.load_s, self.load_s])
            backlog += self.load_s
            started.append((l, e, victim))
            self.log.append(("bg", step, l, e, victim))
            if self.token >= self.warm_token:
                self.result.background_issued += 1
                self.result.background_bytes += self.expert_bytes
        return started

    # -- reuse estimates -------------------------------------------------------------------
    def _begin_token(self, request: int) -> None:
        self.token += 1
        if self.token == self.warm_token:
            self._t_begin = self.now
        if self.token >= self.warm_token:
            self.result.tokens += 1
        if request not in self.freq:
            self.freq[request] = self.glob.copy()
        self.seen[request] = self.token
        for r in [r for r, t in self.seen.items() if self.token - t > self.config.active_tokens]:
            del self.seen[r], self.freq[r]
        self._refresh_p(range(self.L))

    def _refresh_p(self, layers: Any) -> None:
        if self.config.reuse == "global":
            self.p[layers] = self.fast_glob[layers]
            return
        for l in layers:
            self.p[l] = np.mean([f[l] for f in self.freq.values()], axis=0)

    def _touch(self, layer: int, need: list[int], step: int, request: int) -> None:
        used = np.zeros(self.E)
        used[need] = 1.0
        self.last_use[layer, need] = step
        f = self.freq[request]
        f[layer] += self.rate * (used - f[layer])
        self.glob[layer] += self.glob_rate * (used - self.glob[layer])
        self.fast_glob[layer] += self.rate * (used - self.fast_glob[layer])
        self._refresh_p([layer])

    def finish(self) -> SchedResult:
        """The counters, with the time since warm-up."""
        self.result.seconds = self.now - self._t_begin
        return self.result


def schedule_trace(trace: Trace, config: SchedConfig, profile: HardwareProfile,
                   warmup_tokens: int = 0, hidden_size: int = 2048,
                   other_per_layer_s: float = 0.0) -> tuple[SchedResult, Scheduler]:
    """Run `trace` through a `Scheduler`: each token's predictions become hints at the step
    `trace.available_step` gives (hints for the step about to run are dropped: its experts are
    known then anyway), then each layer is planned in execution order.

    Raises:
        ValueError: warm-up leaves no token to count.
    """
    T, L, _ = trace.experts.shape
    if not 0 <= warmup_tokens < T:
        raise ValueError(f"warmup_tokens={warmup_tokens} must be in [0, {T}) for a {T}-token trace")
    sched = Scheduler(config, L, trace.num_experts, trace.expert_bytes, profile, hidden_size,
                      other_per_layer_s=other_per_layer_s, warmup_tokens=warmup_tokens)
    queue: deque[tuple[int, int]] = deque()
    if trace.predicted is not None and config.hints:
        t_idx, l_idx = np.divmod(np.arange(T * L), L)
        avail = trace.available_step(t_idx, l_idx)
        order = np.lexsort((np.arange(T * L), avail))
        queue = deque(zip(avail[order].tolist(), order.tolist()))
    for t in range(T):
        for l in range(L):
            s = t * L + l
            while queue and queue[0][0] <= s:
                _, u = queue.popleft()
                if u > s:
                    tu, lu = divmod(u, L)
                    row = trace.predicted[tu, lu]
                    sched.hint(lu, row[row >= 0].tolist(), _tokens_ahead(t, l, tu, lu))
            sched.plan(l, trace.experts[t, l].tolist(), int(trace.request[t]))
    return sched.finish(), sched


def _tokens_ahead(token: int, layer: int, target_token: int, target_layer: int) -> int:
    """`hint`'s tokens_ahead for a target seen from just before step (token, layer)."""
    # hint() counts from the current token's call of target_layer if it has not run yet
    # (target_layer >= layer when the current step has not run), else from the next token's
    return target_token - token - (1 if target_layer < layer else 0)


def standard_configs(capacity: int) -> list[tuple[str, SchedConfig]]:
    """The rows without predictions: the two baselines, each part alone, their composition."""
    no = dict(background=False, hints=False)
    return [
        ("lru (on-demand loads)", SchedConfig(capacity, miss="load", keep="lru", **no)),
        ("all-cpu misses", SchedConfig(capacity, miss="cpu", keep="lru", **no)),
        ("cpu misses + keep by reuse", SchedConfig(capacity, **no)),
        ("warm cache, loads only", SchedConfig(capacity, miss="load", hints=False)),
        ("hybrid: cpu misses + warm cache", SchedConfig(capacity, hints=False)),
        ("hybrid, global frequency", SchedConfig(capacity, reuse="global", hints=False)),
    ]


def compare_schedules(variants: list[tuple[str, Trace, SchedConfig]], profile: HardwareProfile,
                      warmup_tokens: int = 0, hidden_size: int = 2048) -> list[dict[str, Any]]:
    """Run each (label, trace, config) and return one row each, fastest first: modelled time and
    stall per token, demand hit rate, prefetch hit rate, share of expert work per tier, bytes
    moved (all and in the background) and the background transfers' accuracy."""
    rows = []
    for label, trace, cfg in variants:
        s = schedule_trace(trace, cfg, profile, warmup_tokens, hidden_size)[0].summary()
        acc = s["background_accuracy"]
        rows.append({"config": label, "scheduler": cfg.label(), "capacity": cfg.capacity,
                     "ms_per_token": round(s["ms_per_token"], 4),
                     "stall_ms_per_token": round(s["stall_ms_per_token"], 4),
                     "hit_rate": round(s["hit_rate"], 4),
                     "prefetch_hit_rate": round(s["prefetch_hit_rate"], 4),
                     "fast_share": round(s["fast_share"], 4), "cpu_share": round(s["cpu_share"], 4),
                     "MB_per_token": round(s["bytes_per_token"] / 1e6, 3),
                     "background_MB_per_token": round(s["background_bytes_per_token"] / 1e6, 3),
                     "background_accuracy": None if acc is None else round(acc, 3),
                     "hint_confidence": cfg.hint_confidence if cfg.hints else None})
    return sorted(rows, key=lambda r: r["ms_per_token"])
