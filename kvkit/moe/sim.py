"""Performance model and trace-driven simulator (MoE-Lens style, arXiv:2504.09345).

A `HardwareProfile` gives the speeds that matter for expert offloading: the link from the slow
tier (host RAM / disk) to the fast tier (GPU HBM / RAM), the fast device's FLOP/s and memory
bandwidth, and the slow device's (for Fiddler-style compute of missed experts). `simulate()`
walks the per-step log of a `kvkit.moe.cache.replay(..., record=True)` on one timeline:

    step s starts when step s-1 ends; prefetches issued at s enter one FIFO link queue;
    demand loads of s queue behind them; s waits for its demand loads and for the
    prefetches of the experts it needs (stall); then it computes:
    max(fast experts + `other_per_layer_s`, slow-device experts).

Shapes: S = tokens * layers steps. Times in seconds, bandwidths in bytes/s, rates in FLOP/s.
Profiles other than `local` are nominal datasheet values (named in `source`), not measurements.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kvkit.moe.cache import CacheConfig, ReplayResult
from kvkit.moe.trace import Trace

__all__ = ["HardwareProfile", "PROFILES", "get_profile", "measure_local_profile", "simulate",
           "SimResult", "expert_seconds", "compare_policies"]


@dataclass(frozen=True)
class HardwareProfile:
    """Speeds of one machine. `link` moves expert weights from the slow to the fast tier."""

    name: str
    link_bytes_per_s: float
    link_latency_s: float
    fast_flops: float
    fast_mem_bytes_per_s: float
    slow_flops: float
    slow_mem_bytes_per_s: float
    source: str = ""

    def __post_init__(self) -> None:
        for f in ("link_bytes_per_s", "fast_flops", "fast_mem_bytes_per_s", "slow_flops",
                  "slow_mem_bytes_per_s"):
            if not getattr(self, f) > 0:
                raise ValueError(f"HardwareProfile.{f} must be > 0, got {getattr(self, f)}")
        if self.link_latency_s < 0:
            raise ValueError(f"HardwareProfile.link_latency_s must be >= 0, "
                             f"got {self.link_latency_s}")

    def transfer_seconds(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else self.link_latency_s + nbytes / self.link_bytes_per_s


PROFILES: dict[str, HardwareProfile] = {
    "a100-pcie4": HardwareProfile(
        "a100-pcie4", link_bytes_per_s=25e9, link_latency_s=10e-6, fast_flops=312e12,
        fast_mem_bytes_per_s=1.55e12, slow_flops=2e12, slow_mem_bytes_per_s=150e9,
        source="datasheet: A100-40GB bf16 dense, PCIe 4.0 x16 ~25 GB/s effective, "
               "2-socket server CPU"),
    "h100-pcie5": HardwareProfile(
        "h100-pcie5", link_bytes_per_s=50e9, link_latency_s=10e-6, fast_flops=756e12,
        fast_mem_bytes_per_s=2.0e12, slow_flops=4e12, slow_mem_bytes_per_s=300e9,
        source="datasheet: H100 PCIe bf16 dense, PCIe 5.0 x16 ~50 GB/s effective, "
               "2-socket DDR5 server CPU"),
    "rtx4090-pcie4": HardwareProfile(
        "rtx4090-pcie4", link_bytes_per_s=25e9, link_latency_s=10e-6, fast_flops=165e12,
        fast_mem_bytes_per_s=1.0e12, slow_flops=1e12, slow_mem_bytes_per_s=60e9,
        source="datasheet: RTX 4090 bf16 tensor, PCIe 4.0, desktop DDR5 CPU (HOBBIT/Fiddler "
               "class machine)"),
}


def expert_seconds(nbytes: int, tokens: int, flops: float, mem_bytes_per_s: float,
                   dtype_bytes: int = 2) -> float:
    """Roofline time of one expert (weights `nbytes`) applied to `tokens` tokens."""
    params = nbytes / dtype_bytes
    return max(2.0 * params * tokens / flops, nbytes / mem_bytes_per_s)


def _median_seconds(fn: Any, repeats: int) -> float:
    """Median wall-clock of `fn()` over `repeats` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_local_profile(expert_bytes: int = 8 << 20, repeats: int = 5) -> HardwareProfile:
    """Measure this machine: fast tier = torch on RAM, slow tier = a memory-mapped file
    (link = `copy_` out of a file mapping that is in the page cache into a preallocated tensor,
    as `kvkit.moe.offload` copies an expert into its slot: the best case of a warm mmap; its
    latency = the same copy of 64 bytes), memory bandwidth = `copy_` between two preallocated
    tensors (read + write), compute = torch matmul on the current thread count. Each is the
    median of `repeats` after one untimed call. Slow and fast compute are the same CPU here."""
    import os
    import tempfile

    import torch

    n = int((expert_bytes // 4) ** 0.5)
    a, b = torch.randn(64, n), torch.randn(n, n)
    flops = 2 * 64 * n * n / _median_seconds(lambda: a @ b, repeats)
    src, dst = torch.randn(expert_bytes // 4), torch.empty(expert_bytes // 4)
    mem_bw = 2 * expert_bytes / _median_seconds(lambda: dst.copy_(src), repeats)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "expert.bin")
        np.random.default_rng(0).standard_normal(expert_bytes // 8).tofile(path)
        mm = np.memmap(path, dtype=np.float64, mode="c")   # copy-on-write: never written
        slow = torch.from_numpy(mm)
        fast = torch.empty_like(slow)
        link_bw = expert_bytes / _median_seconds(lambda: fast.copy_(slow), repeats)
        latency = _median_seconds(lambda: fast[:8].copy_(slow[:8]), max(repeats, 20))
        del slow, mm
    return HardwareProfile("local", link_bytes_per_s=link_bw, link_latency_s=latency,
                           fast_flops=flops, fast_mem_bytes_per_s=mem_bw, slow_flops=flops,
                           slow_mem_bytes_per_s=mem_bw,
                           source=f"measured on this machine ({torch.get_num_threads()} threads)")


def get_profile(name: str) -> HardwareProfile:
    if name == "local":
        return measure_local_profile()
    if name not in PROFILES:
        raise ValueError(f"unknown hardware profile {name!r}; known: "
                         f"{', '.join(sorted(PROFILES) + ['local'])}")
    return PROFILES[name]


@dataclass(frozen=True)
class SimResult:
    tokens: int
    seconds: float
    stall_seconds: float
    compute_seconds: float

    @property
    def seconds_per_token(self) -> float:
        return self.seconds / max(self.tokens, 1)

    @property
    def stall_per_token(self) -> float:
        return self.stall_seconds / max(self.tokens, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ms_per_token=1e3 * self.seconds_per_token,
                 stall_ms_per_token=1e3 * self.stall_per_token, tokens_per_s=self.tokens_per_s)
        return d


def simulate(trace: Trace, result: ReplayResult, profile: HardwareProfile,
             other_per_layer_s: float = 0.0, tokens_per_step: int = 1,
             warmup_tokens: int = 0) -> SimResult:
    """Price a recorded replay on `profile` (see the module docstring for the timeline).

    `other_per_layer_s` is the non-expert work of a layer (attention, shared experts), which
    also hides prefetches. `tokens_per_step` is the batch each expert is applied to.

    Raises:
        ValueError: the replay was not recorded (`replay(..., record=True)`).
    """
    if result.demand_bytes is None or result.cpu_experts is None:
        raise ValueError("simulate needs replay(..., record=True)")
    T, L, K = trace.experts.shape
    ebytes = trace.expert_bytes
    t_fast = expert_seconds(ebytes, tokens_per_step, profile.fast_flops,
                            profile.fast_mem_bytes_per_s)
    t_slow = expert_seconds(ebytes, tokens_per_step, profile.slow_flops,
                            profile.slow_mem_bytes_per_s)
    by_issue: dict[int, list[tuple[int, int, int]]] = {}
    for issue, target, nbytes, key in result.prefetches:
        by_issue.setdefault(issue, []).append((target, nbytes, key))
    ready: dict[tuple[int, int], float] = {}
    now = link_free = 0.0
    stall = compute = 0.0
    start_step = warmup_tokens * L
    t_begin = 0.0
    for s in range(T * L):
        if s == start_step:
            t_begin, stall, compute = now, 0.0, 0.0
        for target, nbytes, key in by_issue.get(s, ()):
            link_free = max(link_free, now) + profile.transfer_seconds(nbytes)
            ready[(target, key)] = link_free
        wait_until = now
        dem = int(result.demand_bytes[s])
        if dem:
            link_free = max(link_free, now) + profile.transfer_seconds(dem)
            wait_until = link_free
        t, l = divmod(s, L)
        for e in trace.experts[t, l]:
            arrival = ready.pop((s, l * trace.num_experts + int(e)), None)
            if arrival is not None and arrival > wait_until:
                wait_until = arrival
        n_cpu = int(result.cpu_experts[s])
        work = max((K - n_cpu) * t_fast + other_per_layer_s, n_cpu * t_slow)
        stall += wait_until - now
        compute += work
        now = wait_until + work
        if s % L == L - 1:  # drop prefetches whose target passed without use
            for key in [k for k in ready if k[0] <= s]:
                del ready[key]
    tokens = T - warmup_tokens
    return SimResult(tokens=tokens, seconds=now - t_begin, stall_seconds=stall,
                     compute_seconds=compute)


def compare_policies(trace: Trace, policies: list[str], config: CacheConfig,
                     profile: HardwareProfile, miss_handler: Any | None = None,
                     other_per_layer_s: float = 0.0, policy_params: dict[str, dict] | None = None,
                     record_metrics: bool = True) -> list[dict[str, Any]]:
    """Replay `trace` through each policy (plus `lru` and `belady` as yardsticks, in the same
    run) and price it on `profile`. One row per policy: hit rate, gap to Belady, bytes per token
    and its ratio to LRU, prefetch accuracy, modelled ms and stall ms per token.

    `miss_handler` applies to every policy except the yardsticks' own rows.
    """
    from kvkit.moe.cache import make_policy, record_replay_metrics, replay

    params = policy_params or {}
    names = list(dict.fromkeys(["lru", "belady", *policies]))
    results = {}
    for name in names:
        pol = make_policy(name, **params.get(name, {}))
        handler = None if name in ("lru", "belady") else miss_handler
        res = replay(trace, pol, config, miss_handler=handler, record=True)
        if record_metrics:
            record_replay_metrics(res)
        results[name] = (res, simulate(trace, res, profile, other_per_layer_s,
                                       warmup_tokens=config.warmup_tokens))
    lru_res, lru_sim = results["lru"]
    belady = results["belady"][0].hit_rate
    rows = []
    for name in names:
        res, sim = results[name]
        gap = belady - lru_res.hit_rate
        rows.append({
            "policy": name, "capacity": res.capacity, "scope": res.scope,
            "hit_rate": round(res.hit_rate, 4),
            "prefetch_hit_rate": round(res.prefetch_hit_rate, 4),
            "gap_to_belady": round(belady - res.hit_rate, 4),
            "lru_belady_gap_closed": round((res.hit_rate - lru_res.hit_rate) / gap, 3)
            if gap > 0 else None,
            "bytes_per_token": round(res.bytes_per_token),
            "bytes_vs_lru": round(lru_res.bytes_moved / res.bytes_moved, 3)
            if res.bytes_moved else float("inf"),
            "prefetch_accuracy": round(res.prefetch_accuracy, 3),
            "miss_load_lowbit_cpu": "/".join(str(res.miss_how[k]) for k in ("load", "lowbit", "cpu")),
            "ms_per_token": round(1e3 * sim.seconds_per_token, 3),
            "stall_ms_per_token": round(1e3 * sim.stall_per_token, 3),
            "speedup_vs_lru": round(lru_sim.seconds / sim.seconds, 3) if sim.seconds else None,
        })
    return rows
