"""The README's one table: for the demo's policies at one budget (1/8 of the prompt for the
selectors), passkey, perplexity, resident KV against a bf16 dense store, KV read per token and
ms per token against dense, all in one run of SmolLM2 in bf16.

Passkey, bytes, read and time come from `kvkit.demo.run` (prompts interleaved across policies);
perplexity from `kvkit.evaluate.perplexity` over the last `--ppl-tokens` tokens of a
`--ppl-context`-token window of real text, read one token at a time through each policy's cache.

    python bench/summary.py --ctx 2400 --depths 3     # writes bench/results/summary.{json,md}
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402

import torch  # noqa: E402

from kvkit import demo, evaluate  # noqa: E402
from kvkit.cli import DEFAULT_TEXT, DEMO_ROWS, depths  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", default=list(DEMO_ROWS))
    ap.add_argument("--ctx", type=int, default=2400)
    ap.add_argument("--depths", type=int, default=3)
    ap.add_argument("--ppl-file", default=str(DEFAULT_TEXT))  # results record it repo-relative (portable)
    ap.add_argument("--ppl-tokens", type=int, default=128)
    ap.add_argument("--ppl-context", type=int, default=2048)
    ap.add_argument("--name", default="summary")
    args = ap.parse_args(argv)
    model, tok = evaluate.load(None, torch.bfloat16)
    chosen = demo.build_rows(args.policies, args.ctx)
    rows = demo.run(model, tok, chosen, args.ctx, depths(args.depths))
    text = Path(args.ppl_file).read_text(errors="replace")
    ppl = [evaluate.perplexity(model, tok, policy, text, args.ppl_tokens, context_tokens=args.ppl_context).perplexity
           for _, policy in chosen]
    base = rows[0]
    records, table = [], []
    for row, p in zip(rows, ppl):
        records.append({**demo.as_dict(row), "perplexity": round(p, 4), "ppl_vs_dense": round(p / ppl[0], 4),
                        "kv_bytes_vs_dense": round(row.kv_bytes / row.dense_bytes, 4),
                        "read_vs_dense": round(row.read_bytes_per_token / base.read_bytes_per_token, 4),
                        "ms_vs_dense": round(row.ms_per_token / base.ms_per_token, 4)})
        r = records[-1]
        table.append([row.label, f"{row.correct}/{row.samples}", f"{p:.2f}", f"{r['ppl_vs_dense']:.3f}x",
                      f"{row.kv_bytes / 2**20:.1f} MiB", f"{r['kv_bytes_vs_dense']:.2f}x",
                      f"{r['read_vs_dense']:.2f}x", f"{row.ms_per_token:.1f}", f"{r['ms_vs_dense']:.2f}x"])
    header = ["policy", f"passkey @{args.ctx}", "perplexity", "vs dense", "resident KV", "vs bf16 dense",
              "KV read/token vs dense", "ms/token", "vs dense"]
    note = (f"\n\nSmolLM2-135M-Instruct in bfloat16; passkey: {args.depths} depths at ~{args.ctx} tokens; "
            f"perplexity: last {args.ppl_tokens} tokens of a {args.ppl_context}-token window of "
            f"{Path(args.ppl_file).name}. Resident KV: the store's allocated tensors after a passkey prompt "
            "(the largest), against a tight bf16 copy of the same tokens' K and V; read: K/V slots each decode step's selection lists plus the page bounds a "
            "scoring selector reads; ms/token: median whole-model decode step. Selectors read "
            f"{max(8, args.ctx // 8)} tokens per KV head (1/8 of the prompt); kvkit.demo says how each "
            "column is measured.")
    write_results(args.name, {"ctx": args.ctx, "depths": args.depths, "ppl_file": args.ppl_file,
                              "ppl_tokens": args.ppl_tokens, "ppl_context": args.ppl_context, "rows": records},
                  "summary: the demo's policies in one bf16 run", markdown_table(header, table) + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
