"""Does a policy lose information? Passkey accuracy over a context x depth grid and perplexity
of real text (read one token at a time through the policy's cache), with resident KV bytes and
peak process memory, for a list of policies against dense in the same run.

The model runs in bf16 unless `--dtype float32` is given. Resident bytes are quoted against a
tight bf16 copy of every K and V the perplexity run appended (`StoreStats.nbytes_dense_equivalent`,
what a bf16 dense store would need), as `kvkit demo` and bench/summary.py quote them.

    python bench/quality.py --policies dense streaming:window=256 int8 --contexts 2400 --depths 6
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402

from kvkit import evaluate, policies  # noqa: E402
from kvkit.cli import DEFAULT_TEXT, depths, parse_params  # noqa: E402


def parse_policy(spec: str):
    """`name`, `name:k=v,k=v`, a JSON policy file (`*.json`) or the tuned policy of a budget in a
    tune_frontier result (`tune_frontier_4800.json:0.125`) -> Policy (labelled with the spec)."""
    from kvkit.policies import Policy

    if spec.endswith(".json"):
        return spec, Policy.from_file(spec)
    path, _, budget = spec.rpartition(":")
    if path.endswith(".json"):
        rows = json.loads(Path(path).read_text())["rows"]
        tuned = [r for r in rows if r["method"] == "tuned" and r["budget"] == float(budget) and "policy" in r]
        if not tuned:
            raise SystemExit(f"{path} has no tuned policy at budget {budget}")
        return spec, Policy.from_config(tuned[0]["policy"])
    name, _, rest = spec.partition(":")
    params = parse_params([p for p in rest.split(",") if p])
    return spec, policies.get(name, **params)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", default=["dense", "streaming:window=256", "int8"])
    ap.add_argument("--contexts", type=int, nargs="*", default=[2400], help="passkey contexts (none: no passkey)")
    ap.add_argument("--depths", type=int, default=6)
    ap.add_argument("--ppl-file", default=str(DEFAULT_TEXT),
                    help="perplexity text file, or `licenses`: tune_frontier.py's held-out license texts")
    ap.add_argument("--ppl-tokens", type=int, default=256)
    ap.add_argument("--ppl-context", type=int, default=2048)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--name", default="quality", help="results file stem under bench/results/")
    args = ap.parse_args(argv)
    if args.policies[0].split(":")[0] != "dense":
        args.policies.insert(0, "dense")  # ratios are against dense from the same run
    model, tok = evaluate.load(args.model, getattr(torch, args.dtype))
    if args.ppl_file == "licenses":
        from tune_frontier import held_out_text
        text = held_out_text("licenses")
    else:
        text = Path(args.ppl_file).read_text(errors="replace")
    rows, records = [], []
    dense = {}
    for spec, policy in map(parse_policy, args.policies):
        row = {"policy": spec}
        for ctx in args.contexts:
            res = evaluate.passkey(model, tok, policy, ctx, depths(args.depths))
            row[f"passkey_{ctx}"] = f"{sum(r.correct for r in res)}/{len(res)}"
            row[f"kv_bytes_{ctx}"] = max(r.kv_bytes for r in res)
        ppl = evaluate.perplexity(model, tok, policy, text, args.ppl_tokens, context_tokens=args.ppl_context)
        row["perplexity"] = round(ppl.perplexity, 4)
        row["ppl_kv_bytes"] = ppl.kv_bytes
        row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        dense = dense or row
        row["ppl_vs_dense"] = round(row["perplexity"] / dense["perplexity"], 4)
        row["kv_bytes_vs_dense"] = round(row["ppl_kv_bytes"] / dense["ppl_kv_bytes"], 4)
        row["kv_bytes_vs_bf16_dense"] = round(row["ppl_kv_bytes"] / ppl.kv_bytes_dense_equivalent, 4)
        records.append(row)
        rows.append([spec, *(row[f"passkey_{c}"] for c in args.contexts), f"{row['perplexity']:.3f}",
                     f"{row['ppl_vs_dense']:.3f}x", f"{row['ppl_kv_bytes'] / 2**20:.1f} MiB",
                     f"{row['kv_bytes_vs_dense']:.2f}x", f"{row['kv_bytes_vs_bf16_dense']:.2f}x"])
        write(args, rows, records)  # after every policy: a long sweep that is stopped keeps its rows
    return 0


def write(args, rows: list, records: list) -> None:
    header = ["policy", *(f"passkey @{c}" for c in args.contexts), "perplexity", "vs dense",
              "resident KV (ppl run)", "vs dense row", "vs bf16 dense"]
    table = markdown_table(header, rows)
    note = (f"\n\nModel in {args.dtype}. vs bf16 dense: resident bytes over a tight bf16 copy of every K and V "
            "the run appended. Peak RSS is cumulative over the process (it only grows), so it is recorded in the JSON "
            "but not compared per policy here.")
    write_results(args.name, {"ppl_file": args.ppl_file, "ppl_tokens": args.ppl_tokens,
                              "ppl_context": args.ppl_context, "depths": args.depths, "dtype": args.dtype,
                              "rows": records},
                  f"quality ({f'passkey x{args.depths} depths' if args.contexts else 'no passkey'}, "
                  f"perplexity of {Path(args.ppl_file).name})",
                  table + note)


if __name__ == "__main__":
    sys.exit(main())
