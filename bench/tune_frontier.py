"""The quality/memory frontier: `kvkit tune` against the best single policy and the best hand
composition at budgets given as fractions of a bf16 dense store, on passkey, perplexity of a text
not used for tuning, and the long-context tasks of `longctx.py`.

The tuner's measurement runs once; each budget is `check`ed from it (one allocation per passkey
and window weight, checked end to end on the calibration sequences; the JSON lists them). The
baselines are chosen per budget without the tuner's losses, as the configurations that fit and
keep the most:
- single: one registered policy applied uniformly: `streaming` (bf16 pages) at the longest
  window that fits, and group quantization (`gear` rank 0 / int8) at the most bits that fit;
- composition: the hand composition of `bench/compositions` (DuoAttention's shipped head
  pattern, 25% retrieval heads, 4-bit pages) with the longest streaming window that fits.
Bytes are the store's real allocation after each run, against a bf16 dense store holding the
same tokens (also a real allocation).

    python bench/tune_frontier.py --budgets 0.25 0.125 --ctx 2400 --depths 3 --samples 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402
from longctx import haystack_text, kept_tasks, make_samples, run_policy  # noqa: E402

from kvkit import evaluate  # noqa: E402
from kvkit.policies import Policy  # noqa: E402
from kvkit.policies.duo import shipped_pattern  # noqa: E402
from kvkit.tools.tune import CHECK_SCORED, PASSKEY_WEIGHTS, Measurement, build_policy, check, costs, measure  # noqa: E402
from kvkit.tools.tune_alloc import Allocation  # noqa: E402
from kvkit.tools.tune_measure import dense_bytes  # noqa: E402

APACHE = Path(__file__).resolve().parents[1] / "kvkit" / "data" / "apache-2.0.txt"
PPL_TEXTS = {"apache": "kvkit/data/apache-2.0.txt",
             "licenses": "the installed distributions' license texts (each paragraph once)"}


def held_out_text(name: str) -> str:
    """The perplexity text, never the tuning text (Python's language reference): `apache`, the
    Apache-2.0 license (~2.5K tokens), or `licenses`, the installed distributions' license texts
    with each repeated paragraph kept once (tens of thousands of tokens; for contexts past 2K, where
    a repeated license would let dense copy what a compressed cache has dropped)."""
    if name == "apache":
        return APACHE.read_text()
    seen: set[str] = set()
    unique = []
    for para in haystack_text().split("\n\n"):
        key = " ".join(para.split())
        if key and key not in seen:
            seen.add(key)
            unique.append(para)
    return "\n\n".join(unique)


def _uniform(m: Measurement, cost: torch.Tensor, codec: int, windows: list[list[int]]) -> Allocation:
    L, H, _ = m.shape
    measured = m.loss()
    loss = sum(float(measured[i, codec, windows[i][h], h]) for i in range(L) for h in range(H))
    nbytes = sum(float(cost[codec, windows[i][h]]) for i in range(L) for h in range(H))
    return Allocation(codec=(codec,) * L, window=tuple(tuple(r) for r in windows), loss=loss, nbytes=nbytes)


def baselines(m: Measurement, budget: float, ctx: int) -> list[tuple[str, str, Allocation]]:
    """(kind, label, allocation) of the baseline candidates that fit `budget`, chosen without the
    tuner's losses: single = the longest streaming window that fits and the most bits that fit
    on every head; composition = DuoAttention's shipped pattern (25% retrieval heads) over 4-bit
    pages with the longest streaming window that fits (bench/compositions' best, resized)."""
    L, H, D = m.shape
    cost = costs(m, ctx)
    limit = budget * dense_bytes(L, H, D, ctx + 64)
    bf16 = m.codecs.index("bf16")
    out = []
    streams = [(f"streaming w={m.windows[w]}", _uniform(m, cost, bf16, [[w] * H] * L)) for w in range(1, len(m.windows))]
    codecs = [(f"{c} (all heads)", _uniform(m, cost, i, [[0] * H] * L)) for i, c in enumerate(m.codecs) if c != "bf16"]
    retrieval = shipped_pattern().retrieval_heads(0.25)
    q4 = m.codecs.index("q4")
    duo = [(f"duo r=0.25 w={m.windows[w]} q4",
            _uniform(m, cost, q4, [[0 if (layer, h) in retrieval else w for h in range(H)] for layer in range(L)]))
           for w in range(1, len(m.windows))]
    for kind, cands in (("single", streams), ("single", codecs), ("composition", duo)):
        fits = [(name, a) for name, a in cands if a.nbytes <= limit]
        if fits:
            name, a = max(fits, key=lambda t: t[1].nbytes)  # the most memory that fits: the least lossy
            out.append((kind, name, a))
    return out


def evaluate_policy(model: Any, tok: Any, policy: Any, args: argparse.Namespace, samples: list) -> dict[str, Any]:
    pk = evaluate.passkey(model, tok, policy, args.ctx, [i / max(1, args.depths - 1) * 0.8 + 0.1
                                                         for i in range(args.depths)])
    ppl = evaluate.perplexity(model, tok, policy, args.held_out, args.ppl_tokens,
                              context_tokens=args.ppl_context)
    lc = run_policy(model, tok, policy, samples) if samples else {"scores": {}, "kv_bytes": 0}
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    D = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    tokens = max(r.context_tokens for r in pk) + evaluate.PASSKEY_NEW_TOKENS
    kv = max(r.kv_bytes for r in pk)
    return {"passkey": sum(r.correct for r in pk), "passkey_of": len(pk), "perplexity": ppl.perplexity,
            "kv_bytes": kv, "dense_bf16_bytes": dense_bytes(L, H, D, tokens), "ppl_kv_bytes": ppl.kv_bytes,
            "longctx": lc["scores"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125, 0.0625])
    ap.add_argument("--ctx", type=int, default=2400, help="passkey prompt tokens; the budgets hold at this length")
    ap.add_argument("--depths", type=int, default=3)
    ap.add_argument("--ppl-tokens", type=int, default=512,
                    help="decode steps scored (a long decode reads what streaming windows dropped)")
    ap.add_argument("--ppl-context", type=int, default=2048)
    ap.add_argument("--ppl-text", choices=list(PPL_TEXTS), default="apache",
                    help="held-out perplexity text (licenses: long enough for 4K-8K contexts)")
    ap.add_argument("--samples", type=int, default=2, help="long-context samples per task")
    ap.add_argument("--longctx-ctx", type=int, default=2048)
    ap.add_argument("--tasks", nargs="*", default=None, help="long-context tasks (default: all, dropped per dense)")
    ap.add_argument("--methods", nargs="+", default=["tuned", "single", "composition"])
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--page-size", type=int, default=32, help="the tuner's page size (its codecs' key groups span a page)")
    ap.add_argument("--check-scored", type=int, default=CHECK_SCORED, help="decode steps the joint check scores")
    ap.add_argument("--passkey-weights", type=float, nargs="+", default=list(PASSKEY_WEIGHTS),
                    help="the tuner's passkey weights, one candidate allocation each")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="tune_frontier")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.held_out = held_out_text(args.ppl_text)
    model, tok = evaluate.load(None)
    m = measure(model, tok, calib_tokens=args.calib_tokens, page_size=args.page_size)
    from longctx import TASKS
    samples = make_samples(tok, args.longctx_ctx, args.samples, tuple(args.tasks or TASKS)) if args.samples else []
    records: list[dict[str, Any]] = []
    dense = evaluate_policy(model, tok, Policy(name="dense"), args, samples)
    kept, dropped = kept_tasks(dense["longctx"], 0.5)
    samples = [s for s in samples if s.task in kept]
    records.append({"budget": None, "method": "dense", "config": "dense (fp32 pages)", **dense})
    write(args, records, kept, dropped, m)
    for budget in args.budgets:
        checked: dict[str, Any] = {}
        try:
            tuned = check(model, m, budget, args.ctx, passkey_weights=args.passkey_weights, scored=args.check_scored)
            runs = [("tuned", "tuned", tuned.policy, tuned.report["predicted_fraction"])]
            checked = {k: tuned.report[k] for k in ("joint_check", "check_seconds", "check_scored")}
        except ValueError as e:  # below the cheapest choice the tuner offers
            records.append({"budget": budget, "method": "tuned", "config": f"infeasible: {e}"})
            runs = []
        for kind, label, alloc in baselines(m, budget, args.ctx):
            policy = build_policy(alloc, m.codecs, m.windows, m.sink, m.page_size, m.shape[:2], name=kind)
            runs.append((kind, label, policy, alloc.nbytes / dense_bytes(*m.shape, args.ctx + 64)))
        for method, label, policy, predicted in runs:
            if method not in args.methods:
                continue
            res = evaluate_policy(model, tok, policy, args, samples)
            records.append({"budget": budget, "method": method, "config": label, "predicted_fraction": predicted,
                            "policy": policy.to_config(), **res, **(checked if method == "tuned" else {})})
            write(args, records, kept, dropped, m)
    write(args, records, kept, dropped, m)  # a last budget with nothing to run (infeasible) still shows
    return 0


def write(args: argparse.Namespace, records: list[dict[str, Any]], kept: list[str], dropped: dict[str, str],
          m: Measurement) -> None:
    def lc_mean(r: dict[str, Any]) -> float:
        lc = [r["longctx"].get(t, float("nan")) for t in kept]
        return sum(lc) / len(lc) if lc else float("nan")

    dense = records[0]
    rows = []
    for r in records:
        if "perplexity" not in r:
            rows.append([r["budget"], r["method"], r["config"], *["–"] * 6])
            continue
        rows.append([r["budget"] if r["budget"] is not None else "–", r["method"], r["config"],
                     f"{r['kv_bytes'] / r['dense_bf16_bytes']:.3f}x", f"{r['passkey']}/{r['passkey_of']}",
                     f"{r['perplexity']:.3f}", f"{100 * (r['perplexity'] / dense['perplexity'] - 1):+.1f}%",
                     f"{100 * lc_mean(r):.0f}", f"{100 * (lc_mean(r) - lc_mean(dense)):+.0f}"])
    header = ["budget", "method", "config", "KV vs bf16 dense", f"passkey @{args.ctx}", "ppl (held out)",
              "vs dense", "long-ctx mean", "vs dense (points)"]
    note = (f"\n\nLong-context tasks kept (dense >= 0.5 at {args.longctx_ctx} tokens, {args.samples} samples each): "
            f"{', '.join(kept) or 'none'}; dropped: {', '.join(f'{t} ({w})' for t, w in dropped.items()) or 'none'}. "
            f"Perplexity: last {args.ppl_tokens} tokens of {PPL_TEXTS[args.ppl_text]} at {args.ppl_context} "
            "tokens (not the tuning text). KV bytes: the store's real allocation after the passkey runs, against a "
            "bf16 dense store of the same tokens; dense runs its fp32 pages (2x).")
    payload = {"ctx": args.ctx, "ppl_text": args.ppl_text, "ppl_context": args.ppl_context, "budgets": args.budgets,
               "measure": m.info, "kept_tasks": kept, "dropped_tasks": dropped,
               "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]}
    write_results(args.name, json.loads(json.dumps(payload, default=str)),
                  f"tune frontier (passkey x{args.depths} @{args.ctx}, budgets vs bf16 dense)", markdown_table(header, rows) + note)


if __name__ == "__main__":
    sys.exit(main())
