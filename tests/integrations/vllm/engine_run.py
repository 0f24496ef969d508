"""Run one real vLLM engine (in-process) and print a JSON report; the tests start it as a script.

    python engine_run.py '{"policy": "dense", "prompts": ["..."], "max_tokens": 8}'

`policy` null runs stock vLLM (kvkit's plugin not registered). Started from a temporary folder,
never the checkout root (FACTS.md: `triton_kernels/` would shadow OpenAI's package), with
VLLM_ENABLE_V1_MULTIPROCESSING=0 so the engine core lives in this process and its kvkit metrics
and backend classes can be read back. Where kvkit runs, the attention goes through
`engine_check.CheckedBackend` (this folder, on sys.path as the script's own), which counts the
paths every layer call took and, with `"check": true`, compares vLLM's reads with kvkit's
reference on a float32 shadow of the K/V.
"""

from __future__ import annotations

import json
import os
import sys


def attention_classes(model) -> list[tuple[str, str]]:
    """The (backend, impl) class names of the model's attention layers (run in each worker):
    kvkit's own classes under the test-side ones of engine_check.py, else vLLM's."""
    def name(cls: type) -> str:
        return next((c for c in cls.__mro__ if c.__module__.startswith("kvkit.")), cls).__name__

    found = set()
    for mod in model.modules():
        if type(mod).__name__ == "Attention" and hasattr(mod, "impl"):
            found.add((name(mod.attn_backend), name(type(mod.impl))))
    return sorted(found)


def kv_bytes(model) -> dict[str, int]:
    """Bytes really allocated (run in each worker): vLLM's KV pool (the storage under the layers'
    cache views, counted once) and kvkit's page summaries (bounds, boxes)."""
    pools, kvkit = {}, 0
    for mod in model.modules():
        if type(mod).__name__ != "Attention" or not hasattr(mod, "impl"):
            continue
        for cache in mod.kv_cache if isinstance(mod.kv_cache, (list, tuple)) else [mod.kv_cache]:
            storage = cache.untyped_storage()
            pools[storage.data_ptr()] = storage.nbytes()
        kvkit += sum(t.nbytes for t in (getattr(mod.impl, "bounds", None), getattr(mod.impl, "boxes", None))
                     if t is not None)
    return {"pool": sum(pools.values()), "kvkit": kvkit}


def main(args: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    kvkit_on = args.get("policy") is not None or bool(args.get("additional_config"))
    if args.get("policy") is not None:
        os.environ["KVKIT_POLICY"] = (args["policy"] if isinstance(args["policy"], str)
                                      else json.dumps(args["policy"]))
    if kvkit_on:
        from vllm.plugins import load_general_plugins

        import engine_check

        load_general_plugins()  # kvkit's register(), as vLLM runs it, once per process
        engine_check.install(check=bool(args.get("check")))  # then CPU_ATTN -> CheckedBackend
    from vllm import LLM, SamplingParams

    from kvkit import metrics
    from kvkit.integrations.vllm.accounting import KVAccounting
    from kvkit.models import smollm2

    parallel = {}
    if args.get("tensor_parallel_size", 1) > 1:  # one worker process per rank; no core pinning
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # (more ranks than this box has cores)
        parallel = {"tensor_parallel_size": args["tensor_parallel_size"], "distributed_executor_backend": "mp"}
    llm = LLM(model=str(smollm2()), dtype="bfloat16", enforce_eager=True,
              max_model_len=args.get("max_model_len", 1024), block_size=args.get("block_size", 128),
              kv_cache_memory_bytes=args.get("kv_cache_memory_bytes", 64 << 20),
              max_num_seqs=args.get("max_num_seqs", 8),
              max_num_batched_tokens=args.get("max_num_batched_tokens", 2048),
              enable_prefix_caching=args.get("enable_prefix_caching", False), seed=0,
              additional_config=args.get("additional_config") or {},
              kv_cache_dtype=args.get("kv_cache_dtype", "auto"),
              kv_transfer_config=args.get("kv_transfer_config"), **parallel)
    extra_args = args.get("extra_args") or [None] * len(args["prompts"])  # per request, e.g. kvkit_budget
    params = [SamplingParams(temperature=0.0, max_tokens=args.get("max_tokens", 8), extra_args=extra)
              for extra in extra_args]
    kv = KVAccounting(llm)
    rounds = []  # the prompts again once the previous round finished: its freed blocks are reused
    for _ in range(args.get("rounds", 1)):
        outs = llm.generate(args["prompts"], params, use_tqdm=False)
        rounds.append([list(o.outputs[0].token_ids) for o in outs])

    report = {
        "tokens": rounds[-1],
        "rounds": rounds,
        "text": [o.outputs[0].text for o in outs],
        "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
        "attention": [list(x) for x in llm.apply_model(attention_classes)[0]],
        "metrics": {},
        "kv": kv.report(),
        "bytes": llm.apply_model(kv_bytes)[0],
    }
    for line in metrics.exposition().decode().splitlines():
        if line.startswith(("kvkit_pages_read_total", "kvkit_pages_dense_total",
                            "kvkit_bytes_read_total", "kvkit_evicted_tokens_total")):
            name, value = line.rsplit(" ", 1)
            report["metrics"][name] = float(value)
    if kvkit_on:
        report["usage"] = dict(engine_check.USAGE)
        report["checks"] = engine_check.CHECKS
    connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
    if connector is not None:  # kvkit's eviction connector: blocks the scheduler freed
        from kvkit.integrations.vllm.eviction import STATE
        report["eviction"] = {"freed_blocks": connector.freed_blocks, "evicted_blocks": STATE.evicted_total}
    return report


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print("KVKIT_REPORT " + json.dumps(result), flush=True)
