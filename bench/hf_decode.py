"""Generation speed through transformers: KVKitCache against transformers' own DynamicCache.

Question: with a long prompt on the embedded SmolLM2, how long does one generated token take
end to end (the whole model, not only attention) when the KV cache is a `KVKitCache` under
`dense`, `quest` or `lserve` (budget 1/8 of the prompt), against a plain `DynamicCache` in the
same run? And how much of each token is kvkit's own attention (selection, read, decode)?

Each config prefills the same prompt into a fresh cache, then decodes `--new-tokens` greedily,
one timed step at a time; the table gives the median step, how many tokens came out as
DynamicCache's before the first difference (dense: all; a sparse policy may part ways) and
whether the answer holds the passkey. `--rounds` runs every config in turn that many times:
the ratios are taken within a round.

`--phases` adds one more pass per config, not used for the ratios, with timers around what a
decode step calls (kvkit: the store's write, the policy's selection, the attention read, the
eviction; DynamicCache: its `update` and SDPA) and a table of where the step's milliseconds go;
"rest of the model" is the step minus those. The timers cost a few microseconds per call.

    OMP_NUM_THREADS=1 python bench/hf_decode.py --context 8000 --dtype float32
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import RESULTS, markdown_table, write_results  # noqa: E402

from kvkit import evaluate, policies  # noqa: E402

CONFIGS = ("dynamic", "dense", "quest", "lserve")


PHASES = ("write", "select", "attend", "evict")


@contextlib.contextmanager
def phase_timers(totals: dict[str, float]):
    """While active, add the seconds spent in each decode phase to `totals` (keys: PHASES), by
    wrapping the functions the phase calls: kvkit's `PagedKVStore.append_step`, `Policy.select`,
    the decode read (`decode`, `decode_in_place` as the attention module calls them),
    `Policy.evict`; DynamicCache's layer `update` and transformers' SDPA (called through kvkit's
    attention function once a KVKitCache has switched the model to it)."""
    from transformers.cache_utils import DynamicLayer
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from kvkit.attention import paged
    from kvkit.integrations.hf import cache
    from kvkit.policies.base import Policy
    from kvkit.store import PagedKVStore

    def timed(phase, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[phase] = totals.get(phase, 0.0) + time.perf_counter() - start
        return wrapper

    targets = [(PagedKVStore, "append_step", "write"), (Policy, "select", "select"), (Policy, "evict", "evict"),
               (paged, "decode", "attend"), (paged, "decode_in_place", "attend"), (DynamicLayer, "update", "write"),
               (cache, "sdpa_attention_forward", "attend")]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    try:
        for owner, attr, phase in targets:
            setattr(owner, attr, timed(phase, getattr(owner, attr)))
        ALL_ATTENTION_FUNCTIONS["sdpa"] = timed("attend", sdpa)
        yield totals
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa


def run(model, ids: torch.Tensor, name: str, budget: int, new_tokens: int,
        phases: dict[str, float] | None = None) -> dict:
    """Prefill `ids` into a fresh cache of config `name`, then decode greedily, timing each step;
    `phases` (filled by `phase_timers`) is emptied after the prefill, so it sums decode steps."""
    from transformers import DynamicCache

    from kvkit.integrations.hf import KVKitCache
    if name == "dynamic":
        cache = DynamicCache()
    else:
        cache = KVKitCache(model, policies.get(name) if name == "dense" else policies.get(name, budget=budget))
    start = time.perf_counter()
    token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    prefill_s = time.perf_counter() - start  # KVKitCache.decode_seconds counts one-token steps only
    if phases is not None:
        phases.clear()
    tokens, steps = [int(token)], []
    for _ in range(new_tokens):
        start = time.perf_counter()
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - start)
        tokens.append(int(token))
    kvkit_s = None if name == "dynamic" else cache.decode_seconds
    return {"config": name, "budget": None if name in ("dynamic", "dense") else budget,
            "prefill_s": round(prefill_s, 2), "step_ms_p50": round(1000 * statistics.median(steps), 2),
            "step_ms_mean": round(1000 * sum(steps) / len(steps), 2),
            "kvkit_attention_share": None if kvkit_s is None else round(kvkit_s / sum(steps), 3),
            "tokens": tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=8000, help="prompt tokens (about)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="rounds over the configs, interleaved")
    ap.add_argument("--out", default=None, help="results stem (default bench/results/hf_decode_<dtype>)")
    ap.add_argument("--phases", action="store_true", help="one more pass per config with phase timers")
    args = ap.parse_args(argv)
    if args.context < 64 or args.new_tokens < 1 or args.rounds < 1:
        ap.error("--context must be >= 64, --new-tokens and --rounds >= 1")
    torch.set_num_threads(args.threads)
    model, tok = evaluate.load(dtype=getattr(torch, args.dtype))
    key = evaluate.passkey_keys(1)[0]
    ids = evaluate.passkey_prompt(tok, args.context, 0.5, key)
    budget = ids.shape[1] // 8
    runs = []  # every (round, config), in the order run: rounds interleave the configs
    with torch.inference_mode():
        for round_ in range(args.rounds):
            for name in args.configs:
                r = run(model, ids, name, budget, args.new_tokens)
                r["round"] = round_
                r["passkey"] = key in tok.decode(r["tokens"], skip_special_tokens=True)  # the answer holds the key
                runs.append(r)
                print(f"round {round_} {name:8s} prefill {r['prefill_s']:.1f} s, step p50 {r['step_ms_p50']:.1f} ms",
                      flush=True)
        breakdown = []  # where a step goes, from a pass with timers (not used for the ratios)
        for name in args.configs if args.phases else ():
            with phase_timers({}) as totals:
                r = run(model, ids, name, budget, args.new_tokens, totals)
            per_step = {p: round(1000 * totals.get(p, 0.0) / args.new_tokens, 2) for p in PHASES}
            breakdown.append({"config": name, "step_ms_mean": r["step_ms_mean"], **per_step,
                              "rest_ms": round(r["step_ms_mean"] - sum(per_step.values()), 2)})
    for r in runs:  # ratios within a round: both sides saw the same machine
        base = next((b for b in runs if b["config"] == "dynamic" and b["round"] == r["round"]), None)
        if base is not None:
            r["speedup_vs_dynamic"] = round(base["step_ms_p50"] / r["step_ms_p50"], 2)
            same = [a == b for a, b in zip(r["tokens"], base["tokens"])] + [False]
            r["tokens_as_dynamic"] = same.index(False)  # generated alike up to the first difference
    rows = []
    for name in args.configs:
        mine = [r for r in runs if r["config"] == name]
        row = {k: mine[0][k] for k in ("config", "budget", "tokens")}
        row["passkey"] = f"{sum(r['passkey'] for r in mine)}/{len(mine)}"
        row["step_ms_p50"] = round(statistics.median(r["step_ms_p50"] for r in mine), 2)
        row["prefill_s"] = round(statistics.median(r["prefill_s"] for r in mine), 2)
        shares = [r["kvkit_attention_share"] for r in mine if r["kvkit_attention_share"] is not None]
        row["kvkit_attention_share"] = round(statistics.median(shares), 3) if shares else None
        if all("speedup_vs_dynamic" in r for r in mine):
            row["speedup_vs_dynamic"] = round(statistics.median(r["speedup_vs_dynamic"] for r in mine), 2)
            row["speedup_each_round"] = [r["speedup_vs_dynamic"] for r in mine]
            row["tokens_as_dynamic"] = min(r["tokens_as_dynamic"] for r in mine)
        rows.append(row)
    table = markdown_table(
        ["cache", "budget", "prefill s", "ms per token (p50)", "vs DynamicCache", "each round",
         "kvkit attention share", "same tokens as DynamicCache", "passkey"],
        [[r["config"], r["budget"] or "–", f"{r['prefill_s']:.1f}", f"{r['step_ms_p50']:.1f}",
          f"{r['speedup_vs_dynamic']:.2f}x" if "speedup_vs_dynamic" in r else "–",
          " ".join(f"{x:.2f}" for x in r.get("speedup_each_round", [])) or "–",
          "–" if r["kvkit_attention_share"] is None else f"{100 * r['kvkit_attention_share']:.0f}%",
          f"first {r['tokens_as_dynamic']} of {len(r['tokens'])}" if "tokens_as_dynamic" in r else "–",
          r["passkey"]]
         for r in rows])
    table += (f"\n\nSmolLM2-135M-Instruct in {args.dtype}, {ids.shape[1]}-token passkey prompt, "
              f"{args.new_tokens} tokens decoded greedily after the prefill's first (same tokens: up to the first "
              "that differs; passkey: runs whose answer holds the key). ms per token: median wall time of one "
              "decode step (the whole model). kvkit "
              "attention share: KVKitCache's decode seconds (append, selection, attention, eviction) over the "
              "decode wall time. quest (8-token pages) and lserve read layers 0-1 densely. vs DynamicCache: "
              f"the median over {args.rounds} rounds of each round's ratio (rounds run every config in turn); "
              "each round: those ratios.")
    if breakdown:
        table += "\n\nWhere a decode step goes (ms, mean over the steps of one more pass with phase timers):\n\n"
        table += markdown_table(["cache", "step", *PHASES, "rest of the model"],
                                [[b["config"], f"{b['step_ms_mean']:.1f}", *(f"{b[p]:.1f}" for p in PHASES),
                                  f"{b['rest_ms']:.1f}"] for b in breakdown])
        table += ("\n\nwrite: the store's append (DynamicCache: its update, two concatenations); select: the "
                  "policy's page choice; attend: the attention read (DynamicCache: SDPA); evict: the policy's "
                  "eviction; rest: the step minus those (projections, MLPs, norms, sampling, kvkit's glue).")
    name = Path(args.out).name if args.out else f"hf_decode_{args.dtype}"
    write_results(name, {"context_tokens": int(ids.shape[1]), "dtype": args.dtype, "new_tokens": args.new_tokens,
                         "rounds": args.rounds, "rows": rows, "runs": runs, "phases": breakdown}, "generation through transformers: KVKitCache vs DynamicCache", table,
                  Path(args.out).parent if args.out else RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
