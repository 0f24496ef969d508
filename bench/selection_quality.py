"""Passkey retrieval through the page/token selection policies on the embedded SmolLM2.

Question: do quest / lserve / tidal keep the needle at 1/8 and 1/4 of the context as their
per-KV-head token budget? Dense in the same run.

Selectors act only at decode: the prefill of every policy here is the same dense prefill. So
each (context, depth) is prefilled once per page size through a KVKitCache (quest uses
8-token pages, the others 16), and each policy then decodes greedily on a `fork` of that
sequence (the policy swapped in) — the prompt, key, number of new
tokens and the check are those of `kvkit.evaluate.passkey` (same seed, same depths). With
`--evaluate` every row goes through `kvkit.evaluate.passkey` itself instead (one prefill per
policy and depth: 7x the prefill work, ~130 s per 2.4K sample on the shared 2-core machine).

    OMP_NUM_THREADS=1 python bench/selection_quality.py --ctx 2400 4800 7500 --samples 12

Writes bench/results/selection_quality.json and .md; with --merge, rows for other contexts
already in the JSON are kept (so contexts can be run one at a time, or side by side with
--out to separate files and merged afterwards).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import RESULTS, markdown_table, write_results  # noqa: E402

from kvkit import evaluate, policies  # noqa: E402

METHOD = ("one dense prefill per (context, depth, page size); each policy decodes on a fork of it (prompt, key, "
          "8 new tokens and check as in kvkit.evaluate.passkey). With --evaluate: kvkit.evaluate.passkey per row.")
POLICIES = ("dense", "quest", "lserve", "tidal")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, nargs="+", default=[2400])
    ap.add_argument("--samples", type=int, default=6, help="depths per context, spread evenly, ends excluded")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--page-size", type=int, default=None, help="tokens per page (default: each policy's own, else 16)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "selection_quality"))
    ap.add_argument("--merge", action="store_true", help="keep rows of other contexts already in --out")
    ap.add_argument("--evaluate", action="store_true", help="run each row through kvkit.evaluate.passkey")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = evaluate.load()
    depths = [(i + 0.5) / args.samples for i in range(args.samples)]
    out = Path(args.out)
    rows = []
    if args.merge and out.with_suffix(".json").exists():
        rows = [r for r in json.loads(out.with_suffix(".json").read_text())["rows"] if r["context"] not in args.ctx]
    for ctx in args.ctx:
        configs = [(name, frac) for name in args.policies for frac in ([None] if name == "dense" else args.fractions)]
        built = {}
        for name, frac in configs:
            budget = None if frac is None else int(ctx * frac)
            built[(name, frac)] = policies.get(name) if budget is None else policies.get(name, budget=budget)
        if args.evaluate:
            results = {c: evaluate.passkey(model, tok, built[c], ctx, depths, page_size=args.page_size, progress=False)
                       for c in configs}
        else:
            results = shared_prefill(model, tok, built, configs, ctx, depths, args.page_size)
        for name, frac in configs:
            res = results[(name, frac)]
            hits = sum(r.correct for r in res)
            rows.append({"context": ctx, "context_tokens": res[0].context_tokens, "policy": name,
                         "page_size": built[(name, frac)].resolve_page_size(args.page_size),
                         "budget_fraction": frac, "budget": None if frac is None else int(ctx * frac),
                         "passkey": f"{hits}/{len(res)}", "hits": hits, "samples": len(res),
                         "policy_config": built[(name, frac)].to_config(),
                         "decode_attention_ms_per_token": round(sum(r.decode_ms_per_token for r in res) / len(res), 2),
                         "answers": [{"depth": r.depth, "key": r.key, "answer": r.answer, "correct": r.correct}
                                     for r in res]})
            print(f"ctx {ctx} {name:6s} fraction {frac}: {rows[-1]['passkey']}", flush=True)
        write(out, rows)
    return 0


@torch.inference_mode()
def shared_prefill(model, tok, built: dict, configs: list, ctx: int, depths: list[float],
                   page_size: int | None) -> dict:
    """Per depth and page size: one dense prefill, then each policy with that page size
    (`policy.resolve_page_size(page_size)`) decodes 8 tokens greedily on a fork."""
    from kvkit.integrations.hf import KVKitCache
    results: dict = {c: [] for c in configs}
    by_size: dict[int, list] = {}
    for c in configs:
        by_size.setdefault(built[c].resolve_page_size(page_size), []).append(c)
    for depth, key in zip(depths, evaluate.passkey_keys(len(depths))):  # as kvkit.evaluate.passkey
        ids = evaluate.passkey_prompt(tok, ctx, depth, key)
        for size, group in sorted(by_size.items()):
            cache = KVKitCache(model, policies.get("quest"), page_size=size)  # a store with key bounds
            start = time.perf_counter()
            first = model(ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            prefill_s = time.perf_counter() - start
            root = cache.seqs[0]
            for c in group:
                child = cache.store.fork(root)
                cache.seqs, cache.policy, cache.decode_seconds = [child], built[c], 0.0
                new = [first]
                for _ in range(7):  # evaluate.passkey generates 8 tokens: 1 from the prefill, 7 decoded
                    new.append(model(new[-1], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True))
                answer = tok.decode(torch.cat(new, 1)[0], skip_special_tokens=True)
                results[c].append(evaluate.PasskeyResult(
                    policy=built[c].name, context_tokens=int(ids.shape[1]), depth=depth, key=key,
                    answer=answer.strip(), correct=key in answer, kv_bytes=cache.store.nbytes(),
                    kv_bytes_dense_equivalent=cache.store.stats().nbytes_dense_equivalent,
                    decode_ms_per_token=1000 * cache.decode_seconds / 7))
                cache.store.free(child)
                cache.seqs = [root]
            print(f"  ctx {ctx} depth {depth:.2f} key {key} page {size}: prefill {prefill_s:.0f} s | " +
                  " ".join(f"{n}{'' if f is None else f'@{f:g}'}:{'Y' if results[(n, f)][-1].correct else 'n'}"
                           for n, f in group), flush=True)
    return results


def write(out: Path, rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: (r["context"], POLICIES.index(r["policy"]), r["budget"] or 0))
    table = markdown_table(
        ["context", "policy", "page", "budget (tokens/KV head)", "passkey", "decode attention ms/token"],
        [[r["context_tokens"], r["policy"], r["page_size"],
          "–" if r["budget"] is None else f"{r['budget']} ({r['budget_fraction']:g})", r["passkey"],
          r["decode_attention_ms_per_token"]] for r in rows])
    table += ("\n\nMethod: " + METHOD + "\nDefaults: quest reads dense in layers 0-1 with 8-token pages, sink 4 + "
              "window 32 tokens from the budget, GQA bound reduced by max; lserve (16-token pages) groups 4 pages, keeps "
              "2x budget at level 1, reuses for 4 steps; tidal selects in layers 2 and 14 (full attention there), "
              "dense before layer 2. Decode ms/token is the mean wall time of KVKitCache's decode steps (float32; "
              "append, selection, attention and eviction), not a speed measure: see bench/results/speed.md.")
    write_results(out.name, {"method": METHOD, "model": "SmolLM2-135M-Instruct (float32, transformers, KVKitCache)",
                             "rows": rows}, "passkey retrieval through page/token selection, SmolLM2-135M float32",
                  table, out.parent)


if __name__ == "__main__":
    raise SystemExit(main())
