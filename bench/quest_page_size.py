"""Quest passkey by page size and GQA reduce on the embedded SmolLM2: why `quest()` asks for
8-token pages.

Same method as `bench/selection_quality.py` (one dense prefill per context, depth and page
size; each variant decodes on a fork), with Quest's reduce over the GQA group (max, sum,
softmax) at budgets 1/8 and 1/4, for each page size.

    OMP_NUM_THREADS=2 python bench/quest_page_size.py --ctx 2400 4800 --samples 12 --page-sizes 16 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import markdown_table, write_results  # noqa: E402
from selection_quality import shared_prefill  # noqa: E402

from kvkit import evaluate, policies  # noqa: E402

REDUCES = ("max", "sum", "softmax")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, nargs="+", default=[2400, 4800])
    ap.add_argument("--samples", type=int, default=12, help="depths per context, spread evenly, ends excluded")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25])
    ap.add_argument("--page-sizes", type=int, nargs="+", default=[16, 8])
    args = ap.parse_args(argv)
    model, tok = evaluate.load()
    depths = [(i + 0.5) / args.samples for i in range(args.samples)]
    rows = []
    for ctx in args.ctx:
        for size in args.page_sizes:
            variants = {(f"quest reduce={r}", f): policies.get("quest", budget=int(ctx * f), reduce=r, page_size=size)
                        for f in args.fractions for r in REDUCES}
            for (name, frac), res in shared_prefill(model, tok, variants, list(variants), ctx, depths, None).items():
                hits = sum(r.correct for r in res)
                rows.append({"context": ctx, "context_tokens": res[0].context_tokens, "page_size": size,
                             "variant": name, "budget_fraction": frac, "budget": int(ctx * frac), "hits": hits,
                             "samples": len(res), "answers": [[r.depth, r.key, r.answer] for r in res]})
    table = markdown_table(
        ["context", "page", "variant", "budget (tokens/KV head)", "passkey"],
        [[r["context_tokens"], r["page_size"], r["variant"], f"{r['budget']} ({r['budget_fraction']:g})",
          f"{r['hits']}/{r['samples']}"] for r in rows])
    write_results("quest_page_size", {"rows": rows, "threads": torch.get_num_threads()},
                  "Quest passkey by page size and GQA reduce, SmolLM2-135M float32", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
