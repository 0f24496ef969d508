"""vLLM's own KV cache accounting, read in-process: how big the pool is, how vLLM grouped the
layers, how many requests it says fit, and how many actually ran at once.

Needs the engine core in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`); it reads vLLM's
scheduler and block pool, private surfaces pinned in tests/integrations/vllm/test_contract.py.

    watch = KVAccounting(llm)      # before generate()
    llm.generate(...)
    print(watch.report())
"""

from __future__ import annotations

from typing import Any


class KVAccounting:
    """Pool size, the spec type of each KV cache group, the concurrency vLLM advertises at
    max_model_len, and, sampled after every `schedule()` call, the peak of running requests and
    of blocks in use; the requests vLLM preempted (freed to recompute later)."""

    def __init__(self, llm) -> None:
        from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

        core = llm.llm_engine.engine_core.engine_core  # InprocClient -> EngineCore
        self.scheduler = sched = core.scheduler
        self.pool = sched.kv_cache_manager.block_pool
        self.config = sched.kv_cache_config
        self.max_concurrency = get_max_concurrency_for_kv_cache_config(core.vllm_config, self.config)
        self.peak_running = self.peak_used = 0
        schedule = sched.schedule

        def watched(*args, **kwargs):
            out = schedule(*args, **kwargs)
            self.peak_running = max(self.peak_running, len(sched.running))
            self.peak_used = max(self.peak_used, self.pool.num_gpu_blocks - self.pool.get_num_free_blocks())
            return out

        sched.schedule = watched
        self.preemptions = 0
        preempt = sched._preempt_request

        def counted(*args, **kwargs):
            self.preemptions += 1
            return preempt(*args, **kwargs)

        sched._preempt_request = counted

    def report(self) -> dict[str, Any]:
        return {"num_blocks": self.pool.num_gpu_blocks,
                "groups": [type(g.kv_cache_spec).__name__ for g in self.config.kv_cache_groups],
                "group_layers": [list(g.layer_names) for g in self.config.kv_cache_groups],
                "max_concurrency": self.max_concurrency,
                "peak_running": self.peak_running, "peak_used_blocks": self.peak_used,
                "free_blocks_after": self.pool.get_num_free_blocks(), "preemptions": self.preemptions}
