"""What to do when a needed expert is not in the fast tier, decided per miss.

Three ways to serve a miss:

* `load`   - wait for the full-precision copy over the link and cache it (plain offloading,
             EdgeMoE arXiv:2308.14352, MoE-Infinity arXiv:2401.14361).
* `lowbit` - fetch a low-precision copy (int4/int2) instead and use it once, not cached
             (HOBBIT, arXiv:2411.01433: less important experts tolerate low precision).
* `cpu`    - compute the expert where its weights already are, shipping only activations
             (Fiddler, arXiv:2402.07033).

`MissHandler(mode="auto")` picks per miss with a cost model: the stall each option adds on
`profile`, minus the future misses a cached full copy saves (certain when the expert has a known
predicted use ahead, else `reuse_prior`); `lowbit` is allowed only for experts ranked
`lowbit_min_rank` or later in the token's top-k (by gate weight), which bounds the quality cost.
In auto mode it also vetoes prefetches of predicted experts with no known reuse when the slow
device serves them faster than the link can load them (`admit_prefetch`).
Fixed modes `load`, `lowbit`, `cpu` reproduce the single-strategy systems.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvkit.moe.cache import INF, MissChoice
from kvkit.moe.sim import HardwareProfile, expert_seconds

MODES = ("load", "lowbit", "cpu", "auto")

__all__ = ["MissHandler", "MODES"]


@dataclass(frozen=True)
class MissHandler:
    """Per-miss choice between load / lowbit / cpu.

    profile:         hardware speeds (kvkit.moe.sim.PROFILES or measure_local_profile()).
    mode:            "auto" (cost model), or always "load", "lowbit" (HOBBIT rule), "cpu".
    lowbit_bits:     bits per weight of the low-precision copy (16 = full bf16).
    lowbit_min_rank: 0-based rank in the top-k from which low precision is allowed.
    reuse_prior:     probability a loaded expert is hit again before eviction when no
                     prediction says so (roughly the LRU hit rate at this capacity).
    horizon_steps:   a known predicted use within this many steps counts as a sure reuse.
    tokens_per_step: tokens each expert is applied to (batch size of a decode step).
    hidden_size:     activations shipped for cpu compute: 2 x tokens x hidden x 2 bytes.
    """

    profile: HardwareProfile
    mode: str = "auto"
    lowbit_bits: int = 4
    lowbit_min_rank: int = 2
    reuse_prior: float = 0.3
    horizon_steps: int = 1 << 20
    tokens_per_step: int = 1
    hidden_size: int = 2048

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"MissHandler.mode must be one of {MODES}, got {self.mode!r}")
        if not 1 <= self.lowbit_bits <= 16:
            raise ValueError(f"MissHandler.lowbit_bits must be in [1, 16], got {self.lowbit_bits}")
        if not 0.0 <= self.reuse_prior <= 1.0:
            raise ValueError(f"MissHandler.reuse_prior must be in [0, 1], got {self.reuse_prior}")
        if self.lowbit_min_rank < 0 or self.tokens_per_step < 1 or self.hidden_size < 1:
            raise ValueError("MissHandler needs lowbit_min_rank >= 0, tokens_per_step >= 1, "
                             "hidden_size >= 1")

    # costs in seconds of stall for one miss
    def load_seconds(self, expert_bytes: int) -> float:
        return self.profile.transfer_seconds(expert_bytes)

    def lowbit_bytes(self, expert_bytes: int) -> int:
        return int(expert_bytes * self.lowbit_bits / 16)

    def lowbit_allowed(self, rank: int) -> bool:
        """Whether the expert at 0-based `rank` in a token's top-k (by gate weight) may be
        served by a low-bit copy (HOBBIT's rule: only the less important ones)."""
        return rank >= self.lowbit_min_rank

    def cpu_seconds(self, expert_bytes: int) -> float:
        act = 2 * self.tokens_per_step * self.hidden_size * 2
        return self.profile.transfer_seconds(act) + expert_seconds(
            expert_bytes, self.tokens_per_step, self.profile.slow_flops,
            self.profile.slow_mem_bytes_per_s)

    def admit_prefetch(self, *, step: int, target: int, known_next_use: int, layers: int,
                       expert_bytes: int) -> bool:
        """Whether the cache should prefetch a predicted expert for step `target` (auto mode):
        yes if it has a known later use (it pays for its slot) or if computing it on the slow
        device would cost more than loading it; otherwise let the miss be served on the slow
        device and keep the link free."""
        if self.mode != "auto":
            return True
        if known_next_use < INF and known_next_use - target <= self.horizon_steps:
            return True
        return self.cpu_seconds(expert_bytes) >= self.load_seconds(expert_bytes)

    def choose(self, *, layer: int, expert: int, rank: int, step: int, known_next_use: int,
               layers: int, expert_bytes: int) -> MissChoice:
        """Decide one miss (called by `kvkit.moe.cache.replay`)."""
        low_ok = self.lowbit_allowed(rank)
        if self.mode == "load":
            return MissChoice("load", expert_bytes)
        if self.mode == "cpu":
            return MissChoice("cpu", 0)
        if self.mode == "lowbit":
            return MissChoice("lowbit", self.lowbit_bytes(expert_bytes)) if low_ok \
                else MissChoice("load", expert_bytes)
        t_load = self.load_seconds(expert_bytes)
        sure = known_next_use < INF and known_next_use - step <= self.horizon_steps
        reuse = 1.0 if sure else self.reuse_prior
        costs = {"load": t_load - reuse * t_load, "cpu": self.cpu_seconds(expert_bytes)}
        if low_ok:
            costs["lowbit"] = self.profile.transfer_seconds(self.lowbit_bytes(expert_bytes))
        how = min(costs, key=lambda k: (costs[k], k != "load"))
        moved = {"load": expert_bytes, "cpu": 0,
                 "lowbit": self.lowbit_bytes(expert_bytes)}[how]
        return MissChoice(how, moved)
