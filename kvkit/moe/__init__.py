"""kvkit.moe: the MoE expert scheduler, beside the KV core (it shares only `kvkit.metrics`).

When an MoE model's experts do not all fit in fast memory, four questions arise, one module each:

* `trace`    - the routing record everything else reads: experts [tokens, layers, top_k],
               request ids, optional pre-gating predictions and how far ahead they are known.
* `cache`    - which experts stay in the fast tier: lru, lfu, belady (offline optimum), lookahead
               (pre-gating predictions: Belady on predicted uses + prefetch), score; `replay()`
               scores a policy on a trace.
* `miss`     - what a miss costs and how to serve it: full load, low-bit copy (HOBBIT), or
               compute on the slow device (Fiddler), chosen per miss by a cost model.
* `batching` - which requests decode together so a step needs fewer experts (Read-ME).
* `sim`      - hardware profiles and a timeline model turning a replay into stall and latency
               (MoE-Lens style); `synth` - synthetic traces calibrated to published routing.
* `sched`    - the online scheduler: per layer call, hits / loads / CPU compute / low-bit
               copies of misses and background transfers into idle link time, on a modelled
               clock; the same decisions in `schedule_trace` (simulation) and in
               `offload(..., policy="sched")`. `sched_compare` - its standard rows, ranked by time.
* `predict`  - predictors fitted on part of a trace: per-request frequency, a learned one.
* `offload`  - the real thing: `offload(model, OffloadConfig(...))` runs a transformers MoE (or
               the Read-ME model of `kvkit.moe.readme`) with experts in a slow tier, a fast-tier
               cache and background prefetch, with outputs identical to the original.
* `stall`    - one offloaded run's measured stall and time per token against the simulator's,
               on the same decisions and profile.
* `cli`      - `kvkit moe replay | sim | schedule` (`register_cli(subparsers)`).
"""

from kvkit.moe.cache import CacheConfig, make_policy, policy_names, replay
from kvkit.moe.offload import OffloadConfig, offload  # the function shadows the module name
from kvkit.moe.trace import Trace, TraceError, load_csv_trace, load_trace, save_trace

__all__ = ["Trace", "TraceError", "save_trace", "load_trace", "load_csv_trace", "CacheConfig",
           "make_policy", "policy_names", "replay", "OffloadConfig", "offload"]
