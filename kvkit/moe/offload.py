"""Run a real MoE model with its experts offloaded: a slow tier holds every expert, a fast-tier
cache holds `capacity` experts per layer, and a background thread prefetches the experts that a
lookahead predicts (EdgeMoE arXiv:2308.14352, MoE-Infinity arXiv:2401.14361, Read-ME
arXiv:2410.19123, ExpertFlow arXiv:2410.17954).

    handle = kvkit.moe.offload(model, OffloadConfig(capacity=4, policy="lookahead"))
    model.generate(...)            # same tokens as before offloading
    handle.stats()                 # hits, misses, prefetches, bytes moved, seconds measured
    handle.close()

Slow tiers: `file`, a safetensors file read through a memory map (the CPU case: weights stay on
disk / in the page cache, the fast tier is RAM); `host`, CPU tensors (pinned when the fast tier is
a GPU). The fast tier per layer is preallocated slots [capacity, ...] on the model's device.

Supported experts (found by duck typing, nothing is patched globally):

* transformers 5 fused experts (`MixtralExperts`, `Qwen2MoeExperts`, `OlmoeExperts`, ...):
  parameters `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], called as
  `experts(hidden, top_k_index, top_k_weights)` from a block whose `gate` is the router. The
  module is replaced by `OffloadedExperts`, which runs the same eager loop (same ops, same order,
  so outputs are bitwise identical). Lookahead: the router of layer l+d applied to layer l's
  input (routers read a slowly changing residual stream; a hint only, routing is unchanged).
* Read-ME MLPs (`kvkit.moe.readme.model.ReadMEMLP`): what offload needs from it is stacked
  `w_gate`/`w_up` [E, m, H] and `w_down` [E, H, m], the compute entry `experts_forward(x, idx)`,
  and, in `pregate` mode, `pending` [N, k] set on every layer before the backbone runs (the
  pre-gating router). Each later layer's `pending` is the exact lookahead; offload prefetches
  it while earlier layers compute. Oracle routing reads every expert and is refused.

Low-bit copies (policy "sched" with `SchedConfig.lowbit`): where the scheduler serves a miss
from a low-bit copy, the expert's weights are quantized per output row to `lowbit_bits`
(symmetric round to nearest, `lowbit_roundtrip`), dequantized to their dtype on the fast device
and used for that call only. The ranks the scheduler needs come from the call: transformers
experts rank by `top_k_weights`, Read-ME by the column of `idx` (its routers' top-k order); for
several tokens an expert takes its most important (lowest) rank. Limits: the copy is made from
the slow tier's full weights at use time (no packed low-bit copy is stored), so the real run
shows the quality cost and the decisions, not the modelled link saving.

Measured seconds (`stats()`, real clocks around the real work): `stall_s`, the compute thread
waiting on expert transfers (a demand copy, a low-bit round trip, an in-flight background copy
it needs or whose slot it reuses); `fast_s` / `slow_s`, expert compute from the fast-tier slots
/ from the slow tier's weights (policy "sched"'s "cpu" misses); `plan_s`, the scheduler's own
decisions. The rest of a forward (attention, routers, bookkeeping) is not timed here. On a
GPU these host clocks see kernel launches and waits, not asynchronous kernel time.

Shapes: N tokens, H hidden, E experts, C capacity (slots per layer).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from kvkit.moe.sched import SchedConfig, Scheduler
from kvkit.moe.sim import PROFILES, HardwareProfile, get_profile

logger = logging.getLogger(__name__)

POLICIES = ("lru", "lookahead", "sched")
TIERS = ("auto", "file", "host")

__all__ = ["OffloadConfig", "OffloadHandle", "OffloadedExperts", "offload", "lowbit_roundtrip",
           "POLICIES", "TIERS"]


def lowbit_roundtrip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """`weight` [..., D] quantized to `bits`-bit signed integers with one scale per row (the
    last dim: an output channel of `x @ w.T`), symmetric round to nearest, and dequantized
    back to its dtype. The error of each entry is at most half its row's scale."""
    if not 1 <= bits <= 16:
        raise ValueError(f"lowbit_roundtrip: bits must be in [1, 16], got {bits}")
    w = weight.float()
    qmax = max(2 ** (bits - 1) - 1, 1)      # 1 bit: {-1, 0, 1} x scale
    scale = w.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / qmax
    q = torch.round(w / scale).clamp(-qmax, qmax)
    return (q * scale).to(weight.dtype)


@dataclass(frozen=True)
class OffloadConfig:
    """capacity: fast-tier experts per MoE layer. policy: "lru" (on-demand loads, LRU eviction),
    "lookahead" (evict experts not predicted first, prefetch predicted ones in the
    background) or "sched" (every decision by `kvkit.moe.sched.Scheduler` built from `sched`,
    default `SchedConfig(capacity)`, on the modelled clock of `profile`, so a trace of this run
    replayed by `schedule_trace` takes the same decisions; "cpu" misses are computed from the
    slow tier's weights where they are, "lowbit" ones from `lowbit_roundtrip` copies of them).
    profile: a name in `kvkit.moe.sim.PROFILES` or a `HardwareProfile` (e.g.
    `measure_local_profile()`). slow_tier: "file" (mmap'd safetensors), "host" (CPU tensors) or
    "auto" (file on CPU, host on CUDA). path: the safetensors file (default: a temporary file,
    deleted on close). predict_distance: layers ahead the router-based predictor looks (transformers
    models; Read-ME models use their pre-gating router for all later layers)."""

    capacity: int = 4
    policy: str = "lookahead"
    slow_tier: str = "auto"
    path: str | None = None
    predict_distance: int = 1
    record_metrics: bool = True
    sched: SchedConfig | None = None
    profile: str | HardwareProfile = "a100-pcie4"

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"OffloadConfig.capacity must be >= 1 expert per layer, "
                             f"got {self.capacity}")
        if self.policy not in POLICIES:
            raise ValueError(f"OffloadConfig.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.slow_tier not in TIERS:
            raise ValueError(f"OffloadConfig.slow_tier must be one of {TIERS}, "
                             f"got {self.slow_tier!r}")
        if not isinstance(self.profile, HardwareProfile) and self.profile not in PROFILES:
            raise ValueError(f"OffloadConfig.profile must be one of {sorted(PROFILES)}, "
                             f"got {self.profile!r}")
        if self.sched is not None and self.sched.capacity != self.capacity:
            raise ValueError(f"OffloadConfig.sched.capacity={self.sched.capacity} differs from "
                             f"capacity={self.capacity}; give the same number")
        if self.predict_distance < 1:
            raise ValueError(f"OffloadConfig.predict_distance must be >= 1, "
                             f"got {self.predict_distance}")


# -- slow tier --------------------------------------------------------------------------------
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F64": torch.float64}


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _mmap_safetensors(path: Path) -> tuple[np.memmap, dict[str, torch.Tensor]]:
    """Tensors that view a memory map of a safetensors file (nothing read until used)."""
    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    mm = np.memmap(path, dtype=np.uint8, mode="c")   # copy-on-write: never written
    base = 8 + n
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise NotImplementedError(f"offload: dtype {info['dtype']} of {key} unsupported; "
                                      f"use one of {sorted(_ST_DTYPES)}")
        lo, hi = info["data_offsets"]
        raw = torch.from_numpy(mm[base + lo: base + hi])
        out[key] = raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return mm, out


class _Layer:
    """Fast-tier slots of one MoE layer and which expert each holds."""

    def __init__(self, index: int, slow: dict[str, torch.Tensor], capacity: int,
                 device: torch.device) -> None:
        self.index = index
        self.slow = slow                                   # name -> [E, ...] (slow tier)
        self.num_experts = next(iter(slow.values())).shape[0]
        self.capacity = min(capacity, self.num_experts)
        self.slots = {k: torch.empty((self.capacity, *v.shape[1:]), dtype=v.dtype, device=device)
                      for k, v in slow.items()}
        self.slot_of: dict[int, int] = {}
        self.expert_in: list[int | None] = [None] * self.capacity
        self.lru: OrderedDict[int, None] = OrderedDict()   # slots, least recent first
        self.loading: dict[int, Future] = {}               # slot -> copy in flight
        self.prefetched: set[int] = set()                  # slots filled by prefetch, unused
        self.predicted: set[int] = set()                   # experts predicted for next call
        self.expert_bytes = sum(v[0].numel() * v.element_size() for v in slow.values())

        # CUDA: copies run on a side stream (overlapping compute) and are synchronised before
        # the future completes. Not exercised on this CPU-only machine.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def weights(self, slot: int) -> dict[str, torch.Tensor]:
        """The fast-tier copy of the expert in `slot`, by parameter name."""
        return {name: t[slot] for name, t in self.slots.items()}

    def copy_in(self, slot: int, expert: int) -> None:
        if self.stream is None:
            for name, dst in self.slots.items():
                dst[slot].copy_(self.slow[name][expert])
            return
        with torch.cuda.stream(self.stream):
            for name, dst in self.slots.items():
                dst[slot].copy_(self.slow[name][expert], non_blocking=True)
        self.stream.synchronize()


class _Runtime:
    """All layers' caches, the prefetch thread and the counters."""

    def __init__(self, config: OffloadConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        self.layers: list[_Layer] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvkit-prefetch") \
            if config.policy in ("lookahead", "sched") else None
        self.lock = threading.Lock()
        self.sched: Scheduler | None = None
        self.reset_stats()

    def reset_stats(self) -> None:
        self.counts = {"hits": 0, "misses": 0, "prefetch_issued": 0, "prefetch_useful": 0,
                       "cpu": 0, "lowbit": 0, "bytes_moved": 0, "stall_s": 0.0, "calls": 0,
                       "fast_s": 0.0, "slow_s": 0.0, "plan_s": 0.0}
        self.slow_now: set[int] = set()      # experts of the current call computed where slow

    def start_scheduler(self, hidden_size: int) -> None:
        """Build the scheduler once the layers are known (policy "sched")."""
        c, first = self.config, self.layers[0]
        profile = c.profile if isinstance(c.profile, HardwareProfile) else get_profile(c.profile)
        self.sched = Scheduler(c.sched or SchedConfig(c.capacity), len(self.layers),
                               first.num_experts, first.expert_bytes, profile, hidden_size)

    def hint(self, layer: _Layer, experts: list[int]) -> None:
        """A predictor named `experts` for the next call of `layer`."""
        if self.sched is not None:
            self.sched.hint(layer.index, experts)
        else:
            self.prefetch(layer, experts)

    @property
    def wants_ranks(self) -> bool:
        """Whether `weights_for` needs the experts' gate ranks (low-bit copies are offered)."""
        return self.sched is not None and self.sched.config.lowbit

    def weights_for(self, layer: _Layer, experts: list[int], ranks: list[int] | None = None
                    ) -> Callable[[int], dict[str, torch.Tensor]]:
        """Make `experts` computable; returns expert -> its weights by parameter name. `ranks`:
        each expert's lowest rank in its tokens' top-k by gate weight (when `wants_ranks`)."""
        if self.sched is not None:
            return self._run_plan(layer, experts, ranks).__getitem__
        self.slow_now = set()
        if len(experts) <= layer.capacity:
            slots = self.ensure(layer, experts)
            return lambda e: layer.weights(slots[e])
        # more experts than slots (long prefill): stream them one by one
        return lambda e: layer.weights(self.ensure(layer, [e])[e])

    def computed(self, expert: int, seconds: float) -> None:
        """`expert` of the current call took `seconds` of compute (fast or slow tier)."""
        self.counts["slow_s" if expert in self.slow_now else "fast_s"] += seconds

    def _wait(self, fut: Future | None) -> None:
        """Wait for a copy; the time it was still running counts as stall."""
        if fut is None:
            return
        if fut.done():
            fut.result()
            return
        t0 = time.perf_counter()
        fut.result()
        self.counts["stall_s"] += time.perf_counter() - t0

    def _slot_for(self, layer: _Layer, victim: int) -> int:
        """The slot the scheduler frees: the victim's (its copy finished), else a free one."""
        if victim < 0:
            return next(s for s in range(layer.capacity) if layer.expert_in[s] is None)
        slot = layer.slot_of[victim]
        self._wait(layer.loading.pop(slot, None))
        return slot

    def _run_plan(self, layer: _Layer, experts: list[int], ranks: list[int] | None
                  ) -> dict[int, dict[str, torch.Tensor]]:
        """Carry out the scheduler's decisions for one call of `layer`."""
        assert self.sched is not None and self.pool is not None
        t0 = time.perf_counter()
        decisions, background = self.sched.plan(layer.index, experts, ranks=ranks)
        self.counts["plan_s"] += time.perf_counter() - t0
        self.slow_now = {e for e, how, _ in decisions if how == "cpu"}
        for l, e, victim in background:
            target = self.layers[l]
            slot = self._slot_for(target, victim)
            self._assign(target, slot, e)
            target.prefetched.add(slot)
            target.loading[slot] = self.pool.submit(target.copy_in, slot, e)
            self.counts["prefetch_issued"] += 1
            self.counts["bytes_moved"] += target.expert_bytes
        out = {}
        for e, how, victim in decisions:
            if how in ("hit", "prefetch", "wait"):
                slot = layer.slot_of[e]
                self._wait(layer.loading.pop(slot, None))
                layer.prefetched.discard(slot)
                self.counts["hits" if how == "hit" else "prefetch_useful"] += 1
                out[e] = layer.weights(slot)
                continue
            self.counts["misses"] += 1
            if how == "cpu":     # computed where the slow tier keeps the weights
                self.counts["cpu"] += 1
                out[e] = {k: v[e] for k, v in layer.slow.items()}
                continue
            if how == "load":
                slot = self._slot_for(layer, victim)
                self._assign(layer, slot, e)
            t0 = time.perf_counter()
            if how == "load":
                layer.copy_in(slot, e)
                out[e] = layer.weights(slot)
            elif how == "stream":
                out[e] = {k: v[e].to(self.device, copy=True) for k, v in layer.slow.items()}
            else:                # "lowbit": used once, never cached
                bits = self.sched.config.lowbit_bits
                out[e] = {k: lowbit_roundtrip(v[e], bits).to(self.device)
                          for k, v in layer.slow.items()}
                self.counts["lowbit"] += 1
            self.counts["stall_s"] += time.perf_counter() - t0
            self.counts["bytes_moved"] += self.sched.lowbit_bytes if how == "lowbit" \
                else layer.expert_bytes
        return out

    # victim: a slot not needed now, not in flight; unpredicted ones first, then LRU
    def _victim(self, layer: _Layer, protect: set[int]) -> int | None:
        for slot in [s for s, f in layer.loading.items() if f.done()]:
            layer.loading.pop(slot).result()       # finished copies free their slot (or raise)
        free = [s for s in range(layer.capacity) if layer.expert_in[s] is None]
        if free:
            return free[0]
        best = None
        for slot in layer.lru:                         # least recent first
            e = layer.expert_in[slot]
            if e in protect or slot in layer.loading:
                continue
            if self.config.policy == "lookahead" and e in layer.predicted:
                best = slot if best is None else best
                continue
            return slot
        return best

    def _assign(self, layer: _Layer, slot: int, expert: int) -> None:
        old = layer.expert_in[slot]
        if old is not None:
            del layer.slot_of[old]
        layer.prefetched.discard(slot)
        layer.expert_in[slot] = expert
        layer.slot_of[expert] = slot
        layer.lru[slot] = None
        layer.lru.move_to_end(slot)

    def prefetch(self, layer: _Layer, experts: list[int]) -> None:
        """Start background copies of predicted experts (main thread does all bookkeeping)."""
        if self.pool is None:
            return
        layer.predicted = set(experts)
        for e in experts:
            if e in layer.slot_of:
                continue
            slot = self._victim(layer, layer.predicted)
            if slot is None:
                return
            self._assign(layer, slot, e)
            layer.lru.move_to_end(slot, last=False)   # not used yet: do not look recent
            layer.prefetched.add(slot)
            layer.loading[slot] = self.pool.submit(layer.copy_in, slot, e)
            self.counts["prefetch_issued"] += 1
            self.counts["bytes_moved"] += layer.expert_bytes

    def ensure(self, layer: _Layer, experts: list[int]) -> dict[int, int]:
        """Make `experts` resident (waiting or loading as needed): expert -> slot."""
        t0 = time.perf_counter()
        need = set(experts)
        assert len(need) <= layer.capacity, "callers stream experts that do not fit"
        stalled = False
        for e in experts:
            slot = layer.slot_of.get(e)
            if slot is not None:
                fut = layer.loading.pop(slot, None)
                if fut is not None:
                    stalled = stalled or not fut.done()
                    fut.result()
                if slot in layer.prefetched:     # first use of a prefetch: not a demand hit
                    self.counts["prefetch_useful"] += 1
                    layer.prefetched.discard(slot)
                else:
                    self.counts["hits"] += 1
            else:
                slot = self._victim(layer, need)
                while slot is None:          # every other slot is in flight: wait for one
                    s, fut = next(iter(layer.loading.items()))
                    fut.result()
                    layer.loading.pop(s)
                    slot = self._victim(layer, need)
                self._assign(layer, slot, e)
                layer.copy_in(slot, e)
                stalled = True
                self.counts["misses"] += 1
                self.counts["bytes_moved"] += layer.expert_bytes
            layer.lru.move_to_end(slot)
        layer.predicted = set()
        if stalled:
            self.counts["stall_s"] += time.perf_counter() - t0
        return {e: layer.slot_of[e] for e in need}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


# -- transformers fused experts ----------------------------------------------------------------
class OffloadedExperts(nn.Module):
    """Drop-in for a transformers 5 `*Experts` module whose weights live in a slow tier."""

    def __init__(self, original: nn.Module, layer: _Layer, runtime: _Runtime,
                 predictors: list[tuple[Callable[[torch.Tensor], torch.Tensor], _Layer]]) -> None:
        super().__init__()
        self.num_experts = original.num_experts
        self.act_fn = original.act_fn
        self.has_bias = getattr(original, "has_bias", False)
        self._layer, self._runtime, self._predictors = layer, runtime, predictors

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        rt, layer = self._runtime, self._layer
        with torch.no_grad():   # lookahead: later layers' routers on this input
            for route, later in self._predictors:
                rt.hint(later, torch.unique(route(hidden_states)).tolist())
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        hit = [int(e) for e in expert_hit[:, 0].tolist() if e != self.num_experts]
        ranks = None
        if rt.wants_ranks:          # rank of each slot by gate weight; an expert's lowest
            with torch.no_grad():
                order = top_k_weights.argsort(dim=-1, descending=True, stable=True)
                rank = order.argsort(dim=-1)                              # [N, k]
                ranks = [int(rank[top_k_index == e].min()) for e in hit]
        weights = rt.weights_for(layer, hit, ranks)
        for expert_idx in hit:
            w = weights(expert_idx)
            t0 = time.perf_counter()
            gate_up, down = w["gate_up_proj"], w["down_proj"]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx].to(gate_up.device)   # a "cpu" miss runs there
            gate, up = nn.functional.linear(current_state, gate_up).chunk(2, dim=-1)
            current_hidden_states = self.act_fn(gate) * up
            current_hidden_states = nn.functional.linear(current_hidden_states, down)
            current_hidden_states = current_hidden_states.to(hidden_states.device) \
                * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
            rt.computed(expert_idx, time.perf_counter() - t0)
        return final_hidden_states


def _is_hf_experts(m: nn.Module) -> bool:
    gu, dp = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(dp, torch.Tensor) and gu.dim() == 3 \
        and dp.dim() == 3 and hasattr(m, "num_experts") and not getattr(m, "has_bias", False)


def _is_readme_mlp(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("w_gate", "w_up", "w_down", "experts_forward", "pending"))


# -- Read-ME MLPs ------------------------------------------------------------------------------
def _readme_experts_forward(mlp: nn.Module, layer: _Layer, runtime: _Runtime,
                            later: list[tuple[nn.Module, _Layer]]) -> Callable:
    """Same computation as ReadMEMLP.experts_forward, weights from the fast-tier slots."""

    def experts_forward(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if mlp.mode == "oracle":
            raise NotImplementedError("offloaded Read-ME: oracle routing reads every expert; "
                                      "use set_router('pregate') or 'layer'")
        if mlp.mode == "pregate":           # exact lookahead: later layers already routed
            for other, other_layer in later:
                if other.pending is not None:
                    runtime.hint(other_layer, torch.unique(other.pending).tolist())
        n, k = idx.shape
        if mlp.shared.numel():
            out = (mlp.act_fn(x @ mlp.s_gate.T) * (x @ mlp.s_up.T)) @ mlp.s_down.T
        else:
            out = x.new_zeros(x.shape)
        flat = idx.reshape(-1)  # [N*k]
        order = flat.argsort(stable=True)
        tokens = torch.arange(n, device=x.device).repeat_interleave(k)[order]
        counts = torch.bincount(flat, minlength=mlp.num_experts).tolist()
        used = [e for e, c in enumerate(counts) if c]
        ranks = None
        if runtime.wants_ranks:     # idx columns are the router's top-k order
            col = torch.arange(k, device=idx.device).expand(n, k)
            ranks = [int(col[idx == e].min()) for e in used]
        weights = runtime.weights_for(layer, used, ranks)
        lo = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            w = weights(e)
            t0 = time.perf_counter()
            t = tokens[lo:lo + c]
            lo += c
            xe = x[t].to(w["w_gate"].device)      # a "cpu" miss runs where its weights are
            h = mlp.act_fn(xe @ w["w_gate"].T) * (xe @ w["w_up"].T)
            out = out.index_add(0, t, (h @ w["w_down"].T).to(out.device))
            runtime.computed(e, time.perf_counter() - t0)
        return out

    return experts_forward


# -- entry point -------------------------------------------------------------------------------
class OffloadHandle:
    """What `offload()` returns: counters, and `close()` to stop the prefetch thread and remove
    a temporary slow-tier file."""

    def __init__(self, runtime: _Runtime, path: Path | None, temp: bool, kind: str,
                 mmap: Any) -> None:
        self._rt, self.path, self._temp, self.kind, self._mmap = runtime, path, temp, kind, mmap
        self._reported = dict(runtime.counts)

    @property
    def scheduler(self) -> Scheduler | None:
        """The scheduler of policy "sched" (its `log` holds every decision), else None."""
        return self._rt.sched

    @property
    def num_layers(self) -> int:
        return len(self._rt.layers)

    def stats(self) -> dict[str, Any]:
        c = dict(self._rt.counts)
        acc = c["hits"] + c["prefetch_useful"] + c["misses"]
        c.update(hit_rate=c["hits"] / acc if acc else 0.0, layers=self.num_layers,
                 capacity=self._rt.config.capacity, policy=self._rt.config.policy,
                 kind=self.kind, fast_tier_bytes=self.fast_tier_bytes())
        return c

    def fast_tier_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for l in self._rt.layers for t in l.slots.values())

    def reset_stats(self) -> None:
        self._rt.reset_stats()
        self._reported = dict(self._rt.counts)

    def record_metrics(self) -> None:
        """Send the counters since the last call to kvkit.metrics (if available)."""
        from kvkit.moe.cache import record_metrics

        c, r = self._rt.counts, self._reported
        record_metrics(f"offload-{self._rt.config.policy}", c["hits"] - r["hits"],
                       c["misses"] - r["misses"], c["bytes_moved"] - r["bytes_moved"],
                       c["prefetch_issued"] - r["prefetch_issued"],
                       c["prefetch_useful"] - r["prefetch_useful"])
        self._reported = dict(c)

    def close(self) -> None:
        self._rt.close()
        if self._rt.config.record_metrics:
            self.record_metrics()
        self._mmap = None
        if self._temp and self.path is not None and self.path.exists():
            try:
                os.unlink(self.path)
            except OSError:
                logger.warning("could not remove %s", self.path)

    def __enter__(self) -> "OffloadHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def offload(model: nn.Module, config: OffloadConfig | None = None) -> OffloadHandle:
    """Move every MoE layer's experts of `model` to a slow tier behind a fast-tier cache.

    The model is changed in place (its expert parameters are replaced; they live only in the
    slow tier afterwards) and keeps computing the same outputs.

    Raises:
        NotImplementedError: no supported MoE experts found in `model`.
    """
    config = config or OffloadConfig()
    device = _device_of(model)
    tier = config.slow_tier if config.slow_tier != "auto" else (
        "host" if device.type == "cuda" else "file")
    hf = [(name, m) for name, m in model.named_modules() if _is_hf_experts(m)]
    readme = [(name, m) for name, m in model.named_modules() if _is_readme_mlp(m)]
    if not hf and not readme:
        raise NotImplementedError(
            "offload: no supported MoE experts in this model; supported are transformers 5 "
            "fused experts (gate_up_proj/down_proj [E, ...], e.g. Mixtral, Qwen2-MoE, OLMoE) "
            "and kvkit.moe.readme ReadMEMLP modules")
    found = hf if hf else readme
    params = ("gate_up_proj", "down_proj") if hf else ("w_gate", "w_up", "w_down")
    tensors = {f"{i}.{p}": getattr(m, p).data for i, (_, m) in enumerate(found) for p in params}
    mm, path, temp = None, None, False
    if tier == "file":
        if config.path is None:
            fd, name = tempfile.mkstemp(prefix="kvkit-experts-", suffix=".safetensors")
            os.close(fd)
            path, temp = Path(name), True
        else:
            path = Path(config.path)
        _write_safetensors(path, tensors)
        mm, slow = _mmap_safetensors(path)
    else:
        pin = device.type == "cuda"
        slow = {k: (v.cpu().pin_memory() if pin else v.detach().cpu().clone())
                for k, v in tensors.items()}
    del tensors
    rt = _Runtime(config, device)
    for i in range(len(found)):
        rt.layers.append(_Layer(i, {p: slow[f"{i}.{p}"] for p in params}, config.capacity, device))
    if config.policy == "sched":
        rt.start_scheduler(hidden_size=int(getattr(found[0][1], params[0]).shape[-1]))
    modules = dict(model.named_modules())
    for i, (name, m) in enumerate(found):
        if hf:
            parent = modules[name.rsplit(".", 1)[0]] if "." in name else model
            preds = []
            for d in range(1, config.predict_distance + 1):
                if i + d < len(found):
                    later_name = found[i + d][0]
                    later_parent = modules[later_name.rsplit(".", 1)[0]]
                    gate = getattr(later_parent, "gate", None)
                    if callable(gate):
                        preds.append((lambda h, g=gate: g(h)[2], rt.layers[i + d]))
            new = OffloadedExperts(m, rt.layers[i], rt, preds if config.policy != "lru"
                                   else [])
            setattr(parent, name.rsplit(".", 1)[-1], new)
        else:
            later = [(found[j][1], rt.layers[j]) for j in range(i + 1, len(found))] \
                if config.policy != "lru" else []
            m.experts_forward = _readme_experts_forward(m, rt.layers[i], rt, later)
            for p in params:    # free the fast-tier copies: the slow tier has them
                setattr(m, p, nn.Parameter(torch.empty(0, device=device), requires_grad=False))
    kind = "transformers-experts" if hf else "readme"
    logger.info("kvkit.moe.offload: %d %s layers -> %s tier, %d experts/layer cached (%s)",
                len(found), kind, tier, config.capacity, config.policy)
    return OffloadHandle(rt, path, temp, kind, mm)
