"""What choosing pages costs per layer in kvkit's vLLM backend, against dense decode attention.

Question: at the shapes of `bench/vllm_throughput.py` (7689-token requests in 241 blocks of 32
tokens, SmolLM2's 3 KV heads of 9 query heads, head_dim 64, 8-token sub-page bounds in bf16),
how long does one layer's page choice take (quest's bound of every listed block; lserve's
two-level choice when a request chooses afresh, and the kept choice when it reuses it), and how
does that compare with what the choice is there to save: attention over the whole context
(bf16 matmul-softmax, `dense_decode_fast`), timed in the same run. The choice runs exactly the
functions the backend runs per layer (`selection.py`, the sink/window forcing, the top-k).

No vLLM needed. One torch thread; times are this thread's CPU time (see `common.timeit`).

    OMP_NUM_THREADS=1 python bench/vllm_selection.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import RESULTS, markdown_table, timeit, write_results  # noqa: E402

from kvkit.attention.fast import dense_decode_fast  # noqa: E402
from kvkit.integrations.vllm.selection import (FILL_SCORE, block_bound_scores, empty_bounds,  # noqa: E402
                                              lserve_block_scores, page_boxes)
from kvkit.policies.selectors.quest import LServeSelector  # noqa: E402
from kvkit.scoring import forced_from_lengths, reduce_group, reuse_scores, top_pages_per_row  # noqa: E402

HQ, HKV, D, S, SUB = 9, 3, 64, 32, 8


def case(batch: int, context: int, seed: int = 0):
    """Bounds of `batch` requests' blocks (scattered over the pool, as vLLM allocates them),
    their virtual page lists, a decode query, and the same K/V contiguous for the dense baseline."""
    g = torch.Generator().manual_seed(seed)
    P = -(-context // S)
    keys = torch.randn(batch, HKV, P * S, D, generator=g) + torch.randn(batch, HKV, 1, D, generator=g) * 2
    keys = keys.to(torch.bfloat16)
    per_sub = keys.view(batch, HKV, P, S // SUB, SUB, D)
    rows = torch.cat([per_sub.amax(4), -per_sub.amin(4)], -1)  # [B, H, P, R, 2D] signed boxes
    blocks = 1 + torch.randperm(batch * P, generator=g).view(batch, P)  # block 0: vLLM's null block
    vpages = blocks[:, None, :] * HKV + torch.arange(HKV)[None, :, None]  # [B, H, P]
    bounds = empty_bounds((1 + batch * P) * HKV, S // SUB, D, torch.bfloat16)
    bounds[vpages.reshape(-1)] = rows.reshape(-1, S // SUB, 2 * D)
    q = torch.randn(batch, HQ, D, generator=g).to(torch.bfloat16)
    v = torch.randn(batch, HKV, P * S, D, generator=g).to(torch.bfloat16)
    return bounds, vpages, q, keys, v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=7689)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--out", default=str(RESULTS / "vllm_selection"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sel = LServeSelector(budget=args.budget, sink=4, window=32, group=4, coarse=2, reuse_steps=4)
    scale = D ** -0.5
    rows = []
    for B in args.batch:
        bounds, vpages, q, k, v = case(B, args.context)
        P = vpages.shape[-1]
        lengths = torch.full((B,), args.context)
        forced = forced_from_lengths(lengths, P, S, sel.sink, sel.window)[:, None, :].expand_as(vpages)
        budget = torch.full((B,), args.budget // S)
        boxes = page_boxes(bounds)  # the backend keeps these at KV write
        entries = torch.arange(P).expand_as(vpages)

        def quest():
            bound = reduce_group(block_bound_scores(q, bounds, vpages), "max", scale)
            return top_pages_per_row(torch.where(forced != 0, forced, bound), vpages, budget)

        def lserve_refresh():
            scores = lserve_block_scores(q, bounds, boxes, vpages, budget, sel)
            return top_pages_per_row(torch.where(forced != 0, forced, scores), entries, budget)
        kept = lserve_refresh()

        def lserve_reuse():
            scores = reuse_scores(kept, P, FILL_SCORE)
            return top_pages_per_row(torch.where(forced != 0, forced, scores), entries, budget)

        def dense():
            return dense_decode_fast(q, k, v)
        t = {name: timeit(fn, 5, args.reps)["ms_p50"]
             for name, fn in (("dense attention", dense), ("quest choice", quest),
                              ("lserve choice afresh", lserve_refresh), ("lserve reused choice", lserve_reuse))}
        t["lserve choice, mean of 4 steps"] = (t["lserve choice afresh"] + 3 * t["lserve reused choice"]) / 4
        for name, ms in t.items():
            rows.append({"batch": B, "case": name, "ms_p50": round(ms, 4),
                         "vs_dense_attention": round(ms / t["dense attention"], 3)})
            print(f"batch {B} {name}: {ms:.3f} ms ({rows[-1]['vs_dense_attention']:.2f} of dense attention)")
    table = markdown_table(["batch", "per layer", "CPU ms p50", "/ dense attention"],
                           [[r["batch"], r["case"], f"{r['ms_p50']:.3f}", f"{r['vs_dense_attention']:.2f}"]
                            for r in rows])
    table += (f"\n\n{args.context}-token requests, blocks of {S} tokens, bounds per {SUB}-token sub-page in bf16, "
              f"budget {args.budget} tokens per KV head; lserve: logical pages of {sel.group} blocks, "
              f"coarse {sel.coarse}, a choice serves {sel.reuse_steps} steps. CPU time of one torch thread, median "
              f"of {args.reps}. Dense attention: bf16 matmul-softmax over the whole context, what a choice saves "
              "at most (the sparse read of the chosen blocks comes on top of the choice).")
    write_results(Path(args.out).name, {"rows": rows, "context": args.context, "budget": args.budget},
                  "page choice per layer in kvkit's vLLM backend vs dense decode attention", table,
                  Path(args.out).parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
