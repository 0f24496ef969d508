"""Online expert scheduler: the decisions of each MoE layer call, taken on a modelled clock.

One `Scheduler` serves both the trace-driven simulator (`schedule_trace`) and the real offloaded
model (`kvkit.moe.offload` with `policy="sched"`): the same calls in the same order give the same
decisions, so what the simulator prices is what the real run does.

Parts (each can be switched off, so each is measured alone):

* where a miss runs (`miss`): "load" waits for the link and runs on the fast device; "cpu"
  computes on the slow device where the weights are (Fiddler, arXiv:2402.07033); "auto" splits
  a step's misses between the two so that the step finishes first.
* low-bit copies (`lowbit`, off by default: it changes the model's outputs): a miss may instead
  fetch a `lowbit_bits` copy of the expert, run it once on the fast device and not cache it
  (HOBBIT, arXiv:2411.01433), but only for experts ranked `lowbit_min_rank` or later in the
  token's top-k by gate weight (`kvkit.moe.miss.MissHandler`'s rule and byte count). Per step
  the scheduler tries every split of the misses into full loads, low-bit copies and, where
  `miss` allows it, slow-device work, and keeps the one that ends first (on a tie the one with
  fewer low-bit copies, then fewer loads). With miss="load" that is HOBBIT's load-or-low-bit
  choice, with miss="auto" a three-way one. The ranks come with each call
  (`plan(..., ranks=...)`); a trace gives them by its row order (highest gate first), and one
  whose rows carry no gate order (`meta["gate_ranked"] = False`, or every row sorted by expert
  id) is refused.
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
them arrived (hits, loads, low-bit copies, `other_per_layer_s`; a low-bit copy joins the demand
transfer with its smaller size and then costs a full-precision expert's compute, as
`kvkit.moe.sim.simulate` prices it); the slow device starts at once, after shipping
the activations (one link latency each way). With `miss="load", keep="lru"` this is the timeline
of `kvkit.moe.sim.simulate` on an LRU replay. Counters: `hit_rate` counts demand hits only; the
first use of an expert a background transfer brought is a prefetch hit, reported apart.

Limits: one token per step in the trace driver; a low-bit copy is priced by its bytes over
the link, not by a faster low-bit kernel; its quality cost is reported as a share of the
expert work (`lowbit_share`) at `lowbit_bits`, not measured here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from kvkit.moe.miss import MissHandler
from kvkit.moe.sim import HardwareProfile, expert_seconds
from kvkit.moe.trace import Trace

MISS = ("load", "cpu", "auto")
KEEP = ("lru", "reuse")
REUSE = ("request", "global")

__all__ = ["SchedConfig", "Scheduler", "SchedResult", "schedule_trace", "gate_ranked", "MISS",
           "KEEP", "REUSE"]


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
    lowbit:           offer low-bit copies for misses (changes outputs; off by default).
    lowbit_bits:      bits per weight of a low-bit copy (its bytes: expert_bytes * bits / 16).
    lowbit_min_rank:  0-based rank in the token's top-k from which a low-bit copy is allowed.
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
    lowbit: bool = False
    lowbit_bits: int = 4
    lowbit_min_rank: int = 2

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
        if not 1 <= self.lowbit_bits <= 16 or self.lowbit_min_rank < 0:
            raise ValueError(f"SchedConfig needs lowbit_bits in [1, 16] and lowbit_min_rank >= 0, "
                             f"got {self.lowbit_bits} and {self.lowbit_min_rank}")

    def label(self) -> str:
        """Short name of the configuration, e.g. 'auto+reuse/request+bg+hints+int4@2'."""
        parts = [self.miss, f"{self.keep}/{self.reuse}" if self.keep == "reuse" else self.keep]
        low = f"int{self.lowbit_bits}@{self.lowbit_min_rank}"
        return "+".join(parts + [p for p, on in (("bg", self.background), ("hints", self.hints),
                                                 (low, self.lowbit)) if on])


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
    lowbit: int = 0                     # experts run once from a low-bit copy
    demand_bytes: int = 0               # loads and low-bit copies
    lowbit_bytes: int = 0
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
                # the three shares of the expert work sum to 1; low-bit copies run on the
                # fast device too, but apart from its full-precision work
                "fast_share": (self.demand_hits + self.prefetch_hits + self.loads + self.waits) / a,
                "lowbit_share": self.lowbit / a, "cpu_share": self.cpu / a,
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
        self.hidden_size = hidden_size
        self.cap = min(c.capacity, E)
        self.latency_s = profile.link_latency_s
        self.bytes_s = expert_bytes / profile.link_bytes_per_s
        self.load_s = self.latency_s + self.bytes_s
        self.expert_bytes = expert_bytes
        self.fast_s = expert_seconds(expert_bytes, tokens_per_step, profile.fast_flops,
                                     profile.fast_mem_bytes_per_s)
        # low-bit copies: MissHandler's rank rule and byte count
        self.miss_handler = MissHandler(profile, lowbit_bits=c.lowbit_bits,
                                        lowbit_min_rank=c.lowbit_min_rank,
                                        tokens_per_step=tokens_per_step, hidden_size=hidden_size)
        self.lowbit_bytes = self.miss_handler.lowbit_bytes(expert_bytes)
        self.lowbit_s = self.lowbit_bytes / profile.link_bytes_per_s
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
    def plan(self, layer: int, experts: Sequence[int], request: int = 0,
             ranks: Sequence[int] | None = None
             ) -> tuple[list[tuple[int, str, int]], list[tuple[int, int, int]]]:
        """Decide one layer call. Returns (per needed expert, ascending: (expert, how, evicted
        expert or -1), background transfers started now: (layer, expert, evicted or -1)). `how` is
        "hit", "prefetch" (first use of a background transfer), "wait" (transfer in flight,
        finished as demand), "load" (kept in the fast tier), "stream" (loaded, used once),
        "lowbit" (a low-bit copy, used once) or "cpu".

        `ranks` gives each entry of `experts` its 0-based rank in the token's top-k by gate
        weight (for several tokens, the most important use: the lowest); needed, and only
        read, when the config offers low-bit copies.
        """
        if not 0 <= layer < self.L:
            raise ValueError(f"layer {layer} is outside [0, {self.L})")
        rank_of = self._ranks(experts, ranks)
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
        n_low_ok = 0
        if rank_of is not None:     # low-bit candidates last, less important ones at the end
            missing.sort(key=lambda e: (rank_of[e], e))
            n_low_ok = sum(self.miss_handler.lowbit_allowed(rank_of[e]) for e in missing)
        cands = inflight + missing
        n_hit = len(hows)
        j, n_low = self._split(layer, n_hit, inflight, missing, n_low_ok)
        promoted = {(layer, e) for e in inflight[:j]}
        n_load = max(0, j - len(inflight))
        load_end = now
        if j or n_low:
            load_end, done = self.link.demand(now, promoted, self._miss_seconds(n_load, n_low))
            for l, e in done:
                self.ready[l, e] = True
        n_cpu = len(cands) - j - n_low
        fast_work = (n_hit + j + n_low) * self.fast_s + self.other_s
        fast_end = load_end + fast_work
        cpu_end = now + (self.act_s + n_cpu * self.slow_s if n_cpu else 0.0)
        end = max(fast_end, cpu_end)
        for e in inflight[:j]:
            hows[e] = "wait"
            self.ready[layer, e] = True
        for e in cands[j:len(cands) - n_low]:
            hows[e] = "cpu"
        for e in cands[len(cands) - n_low:]:
            hows[e] = "lowbit"
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
            res.lowbit += n_low
            res.lowbit_bytes += n_low * self.lowbit_bytes
            res.demand_bytes += n_load * self.expert_bytes + n_low * self.lowbit_bytes
            res.stall_seconds += end - now - fast_work
        for e in need:
            if hows[e] in ("prefetch", "wait") and self.fresh[layer, e]:
                res.background_used += counting and self.fresh[layer, e] == 2
                self.fresh[layer, e] = 0
        for target in [t for t in self.pending[layer] if t <= step]:
            del self.pending[layer][target]
        self.last_step_s = end - now
        self.now = end
        if rank_of is not None:
            self.log.append(("ranks", step, layer, tuple(rank_of[e] for e in need)))
        self.log.append(("step", step, layer, tuple(decisions)))
        return decisions, bg

    def _ranks(self, experts: Sequence[int], ranks: Sequence[int] | None
               ) -> dict[int, int] | None:
        """expert -> its lowest rank among `experts`, when the config offers low-bit copies."""
        if not self.config.lowbit:
            return None
        if ranks is None:
            raise ValueError("SchedConfig.lowbit needs each expert's rank in the token's top-k "
                             "by gate weight: pass plan(..., ranks=...)")
        if len(ranks) != len(experts) or min(ranks, default=0) < 0:
            raise ValueError(f"plan: ranks must give a rank >= 0 to each of the {len(experts)} "
                             f"experts, got {list(ranks)}")
        rank_of: dict[int, int] = {}
        for e, r in zip(experts, ranks):
            rank_of[int(e)] = min(int(r), rank_of.get(int(e), int(r)))
        return rank_of

    def _miss_seconds(self, n: int, n_low: int = 0) -> float:
        """Demand loads and low-bit copies of one step: one transfer, one latency."""
        if n == 0 and n_low == 0:
            return 0.0
        return self.latency_s + n * self.bytes_s + n_low * self.lowbit_s

    def _split(self, layer: int, n_hit: int, inflight: list[int], missing: list[int],
               n_low_ok: int = 0) -> tuple[int, int]:
        """How the step's misses are served: of cands = inflight + missing (in that order) the
        first j go over the link in full precision, the last b as low-bit copies (only the last
        `n_low_ok` of missing may), the rest on the slow device. Returns (j, b), the split
        that ends the step first among those `miss` allows ("load": no slow device, "cpu": no
        full loads); on a tie fewer low-bit copies, then fewer loads."""
        n = len(inflight) + len(missing)
        miss = self.config.miss
        rem = [self.link.remaining(layer, e) for e in inflight]
        best, best_end = (0, 0), float("inf")
        for j in range(n + 1) if miss != "cpu" else [0]:
            promoted = {(layer, e) for e in inflight[:j]}
            wait = self.link.preempt_delay(promoted) + sum(rem[:j])
            n_load = max(0, j - len(inflight))
            for b in range(min(n_low_ok, n - j) + 1):
                n_cpu = n - j - b
                if n_cpu and miss == "load":
                    continue
                link = wait + self._miss_seconds(n_load, b) if j or b else 0.0
                fast_end = link + (n_hit + j + b) * self.fast_s + self.other_s
                cpu_end = self.act_s + n_cpu * self.slow_s if n_cpu else 0.0
                end = max(fast_end, cpu_end)
                if end < best_end - 1e-15 or (end <= best_end + 1e-15 and b < best[1]):
                    best, best_end = (j, b), end
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

    With `config.lowbit`, each row's order (highest gate first) gives the ranks.

    Raises:
        ValueError: warm-up leaves no token to count; `config.lowbit` on a trace without gate
            ranks (see `gate_ranked`).
    """
    T, L, K = trace.experts.shape
    if not 0 <= warmup_tokens < T:
        raise ValueError(f"warmup_tokens={warmup_tokens} must be in [0, {T}) for a {T}-token trace")
    ranks: list[int] | None = None
    if config.lowbit:
        ok, why = gate_ranked(trace)
        if not ok:
            raise ValueError(f"SchedConfig.lowbit allows low-bit copies only below rank "
                             f"{config.lowbit_min_rank} of a token's top-k by gate weight, and "
                             f"trace {trace.meta['model']!r} has no gate ranks: {why}. Record "
                             f"each row highest gate first, or set lowbit=False")
        ranks = list(range(K))
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
            sched.plan(l, trace.experts[t, l].tolist(), int(trace.request[t]), ranks)
    return sched.finish(), sched


def gate_ranked(trace: Trace) -> tuple[bool, str]:
    """Whether the order of `trace`'s rows is the gate order the format promises (and why
    not): no when `meta["gate_ranked"]` is False, or when top_k > 1 and every row is sorted
    by expert id (a set written in id order, not a ranking)."""
    if trace.meta.get("gate_ranked", True) is False:
        return False, "its meta says gate_ranked=False"
    if trace.top_k > 1 and trace.num_tokens * trace.num_layers > 1 \
            and bool((np.diff(trace.experts, axis=-1) > 0).all()):
        return False, "every row is sorted by expert id, so the order is not by gate weight"
    return True, "rows in gate order"


def _tokens_ahead(token: int, layer: int, target_token: int, target_layer: int) -> int:
    """`hint`'s tokens_ahead for a target seen from just before step (token, layer)."""
    # hint() counts from the current token's call of target_layer if it has not run yet
    # (target_layer >= layer when the current step has not run), else from the next token's
    return target_token - token - (1 if target_layer < layer else 0)
