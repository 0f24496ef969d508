"""Expert cache policies and a trace replay that scores them.

The fast tier (GPU HBM, or RAM in front of a memory-mapped file) holds `capacity` experts, either
per MoE layer (`scope="layer"`) or as one budget shared by all layers (`scope="shared"`). A step
is one layer of one token (`s = token * layers + layer`, see `kvkit.moe.trace`); it needs its
top_k experts resident, and the cache never evicts an expert the current step still needs.

Policies (keep-priority functions; the resident expert with the lowest priority is evicted):

* `lru`       - least recently used.
* `lfu`       - least frequently used with exponential decay (half-life in tokens), the
                frequency counter of MoE-Infinity (arXiv:2401.14361) / EdgeMoE (arXiv:2308.14352).
* `belady`    - evict the expert whose next true use is farthest (Belady 1966). Reads the future:
                the yardstick, not a deployable policy.
* `lookahead` - Belady on *predicted* uses: pre-gating predictions (Read-ME, arXiv:2410.19123;
                ExpertFlow, arXiv:2410.17954) known `lookahead` ahead give each expert a known
                next use; experts with none are evicted first (LRU among them). Predicted
                misses are queued and prefetched nearest-first, at most `prefetch_budget`
                experts per step, and only over an expert whose own known next use is later.
* `score`     - our design: keep-priority = decayed frequency x (1 + recency bonus), i.e. an
                LFU that trusts the recent past more (routing has short-term locality: a token
                shares ~26% of its experts with the previous one, ~15% at lag 16), with the
                lookahead's known next uses on top when predictions exist.

`replay()` runs a trace through one policy and returns hit rate, bytes moved, prefetch accuracy
and a per-step log that `kvkit.moe.sim` turns into stall time. A miss handler
(`kvkit.moe.miss`) may serve a miss without loading the full expert (low-bit copy or slow-device
compute); such misses do not enter the cache.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from kvkit.moe.trace import Trace

INF = np.iinfo(np.int64).max // 4
SCOPES = ("layer", "shared")

__all__ = ["CacheConfig", "LRU", "LFU", "Belady", "Lookahead", "Score", "POLICIES",
           "make_policy", "policy_names", "replay", "ReplayResult", "MissChoice"]


@dataclass(frozen=True)
class CacheConfig:
    """How much fits in the fast tier.

    capacity:       experts per layer (scope="layer") or in total (scope="shared").
    capacity_bytes: alternative to capacity; converted with the trace's expert_bytes.
    warmup_tokens:  tokens replayed before counting (the calibration curves are warm).
    """

    capacity: int | None = None
    scope: str = "layer"
    capacity_bytes: int | None = None
    warmup_tokens: int = 0

    def __post_init__(self) -> None:
        if (self.capacity is None) == (self.capacity_bytes is None):
            raise ValueError("CacheConfig needs exactly one of capacity (experts) or "
                             f"capacity_bytes, got capacity={self.capacity}, "
                             f"capacity_bytes={self.capacity_bytes}")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"CacheConfig.capacity must be >= 1 expert, got {self.capacity}")
        if self.capacity_bytes is not None and self.capacity_bytes < 1:
            raise ValueError(f"CacheConfig.capacity_bytes must be >= 1, got {self.capacity_bytes}")
        if self.scope not in SCOPES:
            raise ValueError(f"CacheConfig.scope must be one of {SCOPES}, got {self.scope!r}")
        if self.warmup_tokens < 0:
            raise ValueError(f"CacheConfig.warmup_tokens must be >= 0, got {self.warmup_tokens}")

    def experts_per_pool(self, expert_bytes: int) -> int:
        if self.capacity is not None:
            return self.capacity
        return int(self.capacity_bytes // expert_bytes)


# -- policies ------------------------------------------------------------------------------
class _State:
    """Per-key arrays of one replay (key = layer * num_experts + expert)."""

    def __init__(self, num_keys: int) -> None:
        self.resident = np.zeros(num_keys, dtype=bool)
        self.last_use = np.full(num_keys, -1, dtype=np.int64)
        self.lfu = np.full(num_keys, -np.inf)        # log decayed count, shifted, see LFU
        self.count = np.zeros(num_keys)              # decayed count at count_step
        self.count_step = np.zeros(num_keys, dtype=np.int64)
        self.next_use = np.full(num_keys, INF, dtype=np.int64)   # true future (belady)
        self.pred_next = np.full(num_keys, INF, dtype=np.int64)  # known predicted next use


class Policy(Protocol):
    name: str
    needs_future: bool
    uses_predictions: bool

    def priority(self, st: _State, keys: slice, step: int) -> np.ndarray: ...


@dataclass(frozen=True)
class LRU:
    """Least recently used."""

    name: str = field(default="lru", init=False)
    needs_future: bool = field(default=False, init=False)
    uses_predictions: bool = field(default=False, init=False)

    def priority(self, st: _State, keys: slice, step: int) -> np.ndarray:
        return st.last_use[keys].astype(np.float64)


@dataclass(frozen=True)
class LFU:
    """Least frequently used; each past use decays by 1/2 every `half_life` tokens
    (MoE-Infinity / EdgeMoE style activation counts). Ties go to the least recent."""

    half_life: float = 64.0
    name: str = field(default="lfu", init=False)
    needs_future: bool = field(default=False, init=False)
    uses_predictions: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if not self.half_life > 0:
            raise ValueError(f"LFU.half_life must be > 0 tokens, got {self.half_life}")

    def priority(self, st: _State, keys: slice, step: int) -> np.ndarray:
        return st.lfu[keys] + st.last_use[keys] * 1e-12


@dataclass(frozen=True)
class Belady:
    """Evict the expert used farthest in the future (needs the whole trace: offline optimum
    of hit rate for a demand-fetch cache, the yardstick)."""

    name: str = field(default="belady", init=False)
    needs_future: bool = field(default=True, init=False)
    uses_predictions: bool = field(default=False, init=False)

    def priority(self, st: _State, keys: slice, step: int) -> np.ndarray:
        return -st.next_use[keys].astype(np.float64)


def _predicted_first(st: _State, keys: slice, fallback: np.ndarray) -> np.ndarray:
    # Experts with a known predicted use rank above all others (nearest use highest);
    # the rest are ordered by the fallback priority (any scale, squashed into (-1, 0)).
    known = st.pred_next[keys] < INF
    squashed = np.arctan(fallback) / math.pi - 0.5          # (-1, 0)
    return np.where(known, 1.0 + 1.0 / (1.0 + st.pred_next[keys]), squashed)


@dataclass(frozen=True)
class Lookahead:
    """Belady on predicted uses + prefetch of predicted misses (Read-ME / ExpertFlow).

    prefetch_budget: experts prefetched per step at most (the transfer budget; 0 = no prefetch).
    prefetch_k:      how many of a step's predictions (best first) may be prefetched.
    fallback:        order of experts without a known use, "lru" or "lfu".
    """

    prefetch_budget: int = 8
    prefetch_k: int | None = None
    fallback: str = "lru"
    half_life: float = 64.0
    name: str = field(default="lookahead", init=False)
    needs_future: bool = field(default=False, init=False)
    uses_predictions: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if self.prefetch_budget < 0:
            raise ValueError(f"Lookahead.prefetch_budget must be >= 0, got {self.prefetch_budget}")
        if self.prefetch_k is not None and self.prefetch_k < 1:
            raise ValueError(f"Lookahead.prefetch_k must be >= 1 or None, got {self.prefetch_k}")
        if self.fallback not in ("lru", "lfu"):
            raise ValueError(f"Lookahead.fallback must be 'lru' or 'lfu', got {self.fallback!r}")

    def priority(self, st: _State, keys: slice, step: int) -> np.ndarray:
        base = st.last_use[keys] - step if self.fallback == "lru" else st.lfu[keys]
        return _predicted_first(st, keys, base.astype(np.float64))


@dataclass(frozen=True)
class Score:
    """Our design: priority = decayed count x (1 + recency_gain * 2^(-age / recency_half_life)),
    ages in tokens. A frequent expert survives a quiet spell; one used a token ago gets a
    temporary boost. Known predicted uses (when the trace has predictions) rank above all."""

    half_life: float = 64.0
    recency_gain: float = 4.0
    recency_half_life: float = 2.0
    prefetch_budget: int = 0
    prefetch_k: int | None = None
    name: str = field(default="score", init=False)
    needs_future: bool = field(default=False, init=False)
    uses_predictions: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if not (self.half_life > 0 and self.recency_half_life > 0 and self.recency_gain >= 0):
            raise ValueError("Score needs half_life > 0, recency_half_life > 0, recency_gain >= 0")

    def priority(self, st: _State, keys: slice, step: int, layers: int = 1) -> np.ndarray:
        age_tokens = (step - st.last_use[keys]) / max(layers, 1)
        recency = 1.0 + self.recency_gain * np.exp2(-age_tokens / self.recency_half_life)
        value = st.lfu[keys] + np.log(recency)
        return _predicted_first(st, keys, value)


POLICIES: dict[str, type] = {"lru": LRU, "lfu": LFU, "belady": Belady, "lookahead": Lookahead,
                             "score": Score}


def policy_names() -> list[str]:
    return sorted(POLICIES)


def make_policy(name: str, **params: Any) -> Policy:
    """Build a policy by name, e.g. `make_policy("lookahead", prefetch_budget=4)`."""
    if name not in POLICIES:
        raise ValueError(f"unknown expert cache policy {name!r}; known: {', '.join(policy_names())}")
    try:
        return POLICIES[name](**params)
    except TypeError as err:
        raise ValueError(f"policy {name!r}: {err}") from err


# -- replay -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MissChoice:
    """What a miss handler decided for one miss: `how` in {"load", "lowbit", "cpu"}, the
    expert bytes it moved over the link."""

    how: str
    bytes_moved: int


@dataclass
class ReplayResult:
    """Counts after warm-up, plus a per-step log for the timing model. S = tokens * layers."""

    policy: str
    capacity: int
    scope: str
    accesses: int = 0
    hits: int = 0
    misses: int = 0
    bytes_moved: int = 0
    prefetch_issued: int = 0
    prefetch_useful: int = 0
    miss_how: dict[str, int] = field(default_factory=lambda: {"load": 0, "lowbit": 0, "cpu": 0})
    counted_tokens: int = 0
    # per-step log over all steps (warm-up included): bytes of demand loads, experts computed on
    # the slow device, and prefetches as (issue step, target step, bytes, key) where
    # key = layer * num_experts + expert
    demand_bytes: np.ndarray | None = None
    cpu_experts: np.ndarray | None = None
    prefetches: list[tuple[int, int, int, int]] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        """Demand hits / accesses: an expert's first use after a prefetch is not counted."""
        return self.hits / max(self.accesses, 1)

    @property
    def prefetch_hit_rate(self) -> float:
        """Accesses served by a prefetched expert's first use / accesses."""
        return self.prefetch_useful / max(self.accesses, 1)

    @property
    def prefetch_accuracy(self) -> float:
        return self.prefetch_useful / self.prefetch_issued if self.prefetch_issued else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_moved / max(self.counted_tokens, 1)

    def summary(self) -> dict[str, Any]:
        return {"policy": self.policy, "capacity": self.capacity, "scope": self.scope,
                "hit_rate": round(self.hit_rate, 4),
                "prefetch_hit_rate": round(self.prefetch_hit_rate, 4),
                "hits": self.hits, "misses": self.misses,
                "bytes_moved": self.bytes_moved, "bytes_per_token": round(self.bytes_per_token, 1),
                "prefetch_issued": self.prefetch_issued, "prefetch_useful": self.prefetch_useful,
                "prefetch_accuracy": round(self.prefetch_accuracy, 4),
                "miss_how": dict(self.miss_how), "tokens": self.counted_tokens}


def _next_use_steps(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, L, K] -> step of the next use of the same (layer, expert) after this token (INF)."""
    tokens, layers, _ = experts.shape
    out = np.empty(experts.shape, dtype=np.int64)
    seen = np.full((layers, num_experts), INF, dtype=np.int64)
    rows = np.arange(layers)[:, None]
    for t in range(tokens - 1, -1, -1):
        out[t] = seen[rows, experts[t]]
        seen[rows, experts[t]] = t * layers + rows
    return out


def replay(trace: Trace, policy: Policy | str, config: CacheConfig,
           miss_handler: Any | None = None, record: bool = False) -> ReplayResult:
    """Replay `trace` through `policy` with the fast tier sized by `config`.

    A hit is a needed expert resident when its step runs and not brought there by a prefetch
    it has not used yet (that first use is a prefetch hit, `prefetch_useful`). Bytes moved
    count every full load (demand or prefetch) plus what the miss handler moved.
    `miss_handler.choose(...)` (see `kvkit.moe.miss`) is asked on each miss when given.
    `record=True` fills the per-step log used by `kvkit.moe.sim.simulate`.

    Raises:
        ValueError: capacity cannot hold one step's experts, or the policy needs predictions
            the trace lacks.
    """
    pol = make_policy(policy) if isinstance(policy, str) else policy
    tokens, layers, top_k = trace.experts.shape
    num_experts, ebytes = trace.num_experts, trace.expert_bytes
    cap = config.experts_per_pool(ebytes)
    if cap < top_k:
        raise ValueError(f"cache capacity {cap} experts cannot hold one step's top_k={top_k} "
                         f"experts; give at least {top_k} ({top_k * ebytes} bytes)")
    if config.warmup_tokens >= tokens:
        raise ValueError(f"warmup_tokens={config.warmup_tokens} leaves nothing of a "
                         f"{tokens}-token trace to count")
    use_pred = pol.uses_predictions and trace.predicted is not None
    if pol.name == "lookahead" and trace.predicted is None:
        raise ValueError("policy 'lookahead' needs trace.predicted (pre-gating predictions); "
                         "add them, e.g. kvkit.moe.synth.cooccurrence_predictions(trace)")
    res = ReplayResult(pol.name, cap, config.scope)
    st = _State(layers * num_experts)
    per_layer = config.scope == "layer"
    pools = [slice(l * num_experts, (l + 1) * num_experts) for l in range(layers)] \
        if per_layer else [slice(0, layers * num_experts)]
    occupancy = [0] * len(pools)
    next_use = _next_use_steps(trace.experts, num_experts) if pol.needs_future else None
    decay = math.log(0.5) / (getattr(pol, "half_life", 64.0) * layers)   # per step, log
    is_score = isinstance(pol, Score)
    prefetch_budget = getattr(pol, "prefetch_budget", 0) if use_pred else 0
    prefetch_k = getattr(pol, "prefetch_k", None)
    prefetched = np.zeros(layers * num_experts, dtype=np.int8)  # 1 issued, 2 issued+counted
    total_steps = tokens * layers
    if record:
        res.demand_bytes = np.zeros(total_steps, dtype=np.int64)
        res.cpu_experts = np.zeros(total_steps, dtype=np.int64)
    warm_step = config.warmup_tokens * layers

    # predictions as key lists per target step, ordered by the step they become known
    pred_keys: list[list[int]] = []
    pred_queue: deque[tuple[int, int]] = deque()
    to_fetch: deque[int] = deque()       # target steps with predictions not yet prefetched
    admit = getattr(miss_handler, "admit_prefetch", None)
    known: list[deque[int]] = []
    if use_pred:
        assert trace.predicted is not None
        pk = trace.predicted[:, :, :prefetch_k] if prefetch_k else trace.predicted
        offs = (np.arange(layers) * num_experts)[None, :, None]
        keys_arr = np.where(pk >= 0, pk + offs, -1).reshape(total_steps, -1)
        pred_keys = [[int(k) for k in row if k >= 0] for row in keys_arr]
        t_idx, l_idx = np.divmod(np.arange(total_steps), layers)
        avail = trace.available_step(t_idx, l_idx)
        order = np.lexsort((np.arange(total_steps), avail))
        pred_queue = deque(zip(avail[order].tolist(), order.tolist()))
        known = [deque() for _ in range(layers * num_experts)]

    def priority(pool: slice, step: int) -> np.ndarray:
        if is_score:
            return pol.priority(st, pool, step, layers)  # type: ignore[call-arg]
        return pol.priority(st, pool, step)

    def evict_one(pool_id: int, step: int, protect: set[int],
                  must_beat: int | None = None) -> bool:
        pool = pools[pool_id]
        pri = priority(pool, step)
        cand = st.resident[pool].copy()
        for k in protect:
            if pool.start <= k < pool.stop:
                cand[k - pool.start] = False
        if must_beat is not None:  # prefetch: only evict experts whose known use is later
            cand &= st.pred_next[pool] > must_beat
        if not cand.any():
            return False
        victim = pool.start + int(np.argmin(np.where(cand, pri, np.inf)))
        st.resident[victim] = False
        prefetched[victim] = 0
        occupancy[pool_id] -= 1
        return True

    def touch(key: int, step: int) -> None:
        st.last_use[key] = step
        c = st.count[key] * math.exp(decay * (step - st.count_step[key])) + 1.0
        st.count[key], st.count_step[key] = c, step
        st.lfu[key] = math.log(c) - decay * step   # comparable across keys at any later step

    for t in range(tokens):
        for l in range(layers):
            s = t * layers + l
            counting = s >= warm_step
            pool_id = l if per_layer else 0
            needed = [l * num_experts + int(e) for e in trace.experts[t, l]]
            need_set = set(needed)
            # 1. predictions that become known now are recorded and queued for prefetch;
            #    then up to `prefetch_budget` queued predicted misses are fetched, nearest first
            while pred_queue and pred_queue[0][0] <= s:
                _, u = pred_queue.popleft()
                for k in pred_keys[u]:
                    if not known[k]:
                        st.pred_next[k] = u
                    known[k].append(u)
                if prefetch_budget and u > s:
                    to_fetch.append(u)
            budget = prefetch_budget
            while to_fetch and budget > 0:
                u = to_fetch[0]
                if u <= s:
                    to_fetch.popleft()
                    continue
                u_pool = (u % layers) if per_layer else 0
                protect = set(pred_keys[u]) | (need_set if u_pool == pool_id else set())
                for k in pred_keys[u]:
                    if budget <= 0:
                        break
                    if st.resident[k]:
                        continue
                    if admit is not None and not admit(
                            step=s, target=u, layers=layers, expert_bytes=ebytes,
                            known_next_use=next((v for v in known[k] if v > u), INF)):
                        continue      # the miss handler will serve it (e.g. on the CPU)
                    if occupancy[u_pool] >= cap and not evict_one(u_pool, s, protect, u):
                        break
                    st.resident[k] = True
                    occupancy[u_pool] += 1
                    prefetched[k] = 2 if counting else 1
                    budget -= 1
                    if counting:
                        res.prefetch_issued += 1
                        res.bytes_moved += ebytes
                    if record:
                        res.prefetches.append((s, u, ebytes, k))
                else:
                    to_fetch.popleft()     # every predicted expert of u handled
                    continue
                if budget <= 0 and all(st.resident[k] for k in pred_keys[u]):
                    to_fetch.popleft()
                if budget > 0:             # stopped for want of a victim: give up on u
                    to_fetch.popleft()
            # 2. serve this step
            for rank, k in enumerate(needed):
                hit = bool(st.resident[k])
                if counting:
                    res.accesses += 1
                if hit:
                    if counting:        # the first use of a prefetch is not a demand hit
                        if prefetched[k] == 2:
                            res.prefetch_useful += 1
                        else:
                            res.hits += 1
                    prefetched[k] = 0
                else:
                    how, moved = "load", ebytes
                    if miss_handler is not None:
                        q = known[k] if use_pred else ()
                        # the next known use after this step (this step's own entry is first)
                        nxt = next((u for u in q if u > s), INF)
                        choice = miss_handler.choose(layer=l, expert=k - l * num_experts,
                                                     rank=rank, step=s, known_next_use=nxt,
                                                     layers=layers, expert_bytes=ebytes)
                        how, moved = choice.how, choice.bytes_moved
                    if how == "load":
                        if occupancy[pool_id] >= cap:
                            ok = evict_one(pool_id, s, need_set)
                            assert ok, "capacity >= top_k guarantees a victim"
                        st.resident[k] = True
                        occupancy[pool_id] += 1
                        prefetched[k] = 0
                    if counting:
                        res.misses += 1
                        res.bytes_moved += moved
                        res.miss_how[how] += 1
                    if record:
                        assert res.demand_bytes is not None and res.cpu_experts is not None
                        if how == "cpu":
                            res.cpu_experts[s] += 1
                        res.demand_bytes[s] += moved
                touch(k, s)
                if next_use is not None:
                    st.next_use[k] = next_use[t, l, rank]
            # 3. consume the predictions for this step
            if use_pred:
                for k in pred_keys[s]:
                    q = known[k]
                    if q and q[0] == s:
                        q.popleft()
                    st.pred_next[k] = q[0] if q else INF
        if t >= config.warmup_tokens:
            res.counted_tokens += 1
    return res


def record_metrics(policy: str, hits: int, misses: int, bytes_moved: int,
                   prefetch_issued: int = 0, prefetch_useful: int = 0) -> bool:
    """Forward counters to `kvkit.metrics.record_expert_cache`; False when metrics are not
    available (kvkit.metrics missing or prometheus-client not installed)."""
    try:
        from kvkit.metrics import record_expert_cache
    except ImportError:
        return False
    try:
        record_expert_cache(policy, hits=hits, misses=misses, bytes_moved=bytes_moved,
                            prefetch_issued=prefetch_issued, prefetch_useful=prefetch_useful)
    except ImportError:  # metrics module present, prometheus_client absent
        return False
    return True


def record_replay_metrics(result: ReplayResult) -> bool:
    """`record_metrics` for a replay's counters."""
    return record_metrics(result.policy, result.hits, result.misses, result.bytes_moved,
                          result.prefetch_issued, result.prefetch_useful)
