"""Decode attention time per step at long context: dense vs page/token selection, same run.

Question: at 8K context with a 1K-token budget per KV head, how much faster is one decode step
of attention with Quest / LServe / TidalDecode selection (scoring and top-k included) than the
fastest dense decode this CPU has? SmolLM2 geometry: 30 layers, 9 query heads, 3 KV heads,
head_dim 64, batch 1.

Two paths are timed for the selectors:
- `kernel`: what a serving engine runs. The page table is a tensor (as vLLM/flashinfer keep
  block tables); scoring is kvkit's lean `quest_decode_fast` / `lserve_select_fast` (each tested
  to choose the pages its selector chooses) and Tidal's softmax mass, then
  `kvkit.attention.fast.sparse_decode_fast` over the store's own page pool. The dense baseline is the fastest of plain matmul-softmax (fp32,
  bf16) and SDPA (fp32, bf16) over contiguous K/V.
- `library`: `policy.select(store, ...)` + `kvkit.attention.decode` exactly as KVKitCache runs
  them (page tables built from Python lists, decode's CPU path for plain pages), against
  `FullSelector` + the same decode (and, as `dense_ref`, + decode's float32 reference, what
  every CPU decode ran before the CPU path). Reported for transparency.

    OMP_NUM_THREADS=1 python bench/speed.py --context 8192 --budget 1024
    OMP_NUM_THREADS=1 python bench/speed.py --page-size 8 --out bench/results/speed_page8
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import RESULTS, markdown_table, timeit, timeit_rounds, write_results  # noqa: E402

from kvkit import PagedKVStore, policies  # noqa: E402
from kvkit.attention import decode  # noqa: E402
from kvkit.attention.fast import dense_decode_fast, quest_decode_fast, sparse_decode_fast  # noqa: E402
from kvkit.policies.selectors.quest import LServeSelector  # noqa: E402
from kvkit.scoring import (forced_from_positions, forced_pages, lserve_scores, quest_scores, signed_boxes,  # noqa: E402
                           top_pages)


def lserve_select_fast(q, kmin, kmax, table, seq_lens, S, budget_pages, group, coarse, sink, window):
    """LServe's fresh choice on lists never evicted, as `LServeSelector` makes it."""
    forced = forced_pages(tuple(seq_lens), table.shape[-1], S, sink, window, str(q.device))
    scores = lserve_scores(q, signed_boxes(kmin, kmax, table), budget_pages, group, coarse)
    return top_pages(torch.where(forced != 0, forced, scores), table, budget_pages)

HQ, HKV, D, LAYERS = 9, 3, 64, 30


def build(context: int, page_size: int, dtype: torch.dtype, layers: int, seed: int = 0):
    """A store holding `context` tokens in each of `layers` layers, and the same K/V contiguous."""
    g = torch.Generator().manual_seed(seed)
    store = PagedKVStore(layers, HKV, D, page_size=page_size, dtype=dtype, key_bounds=True)
    seq = store.add_sequence()
    dense = []
    for layer in range(layers):
        # keys with a per-channel offset, as RoPE'd keys have; values plain
        k = torch.randn(context, HKV, D, generator=g) + torch.randn(1, HKV, D, generator=g) * 2
        v = torch.randn(context, HKV, D, generator=g)
        store.append(seq, layer, k, v)
        dense.append((k.transpose(0, 1)[None].contiguous(), v.transpose(0, 1)[None].contiguous()))
    return store, seq, dense


def fastest_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A dense layer of the sparse steps: the faster dense path for the dtype on this CPU (the
    dense_* rows: matmul-softmax in float32, SDPA in bf16), as `kvkit.attention.decode` picks."""
    if k.dtype == torch.float32:
        return dense_decode_fast(q, k, v)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=200, help="timed repetitions per layer case")
    ap.add_argument("--step-reps", type=int, default=20,
                    help="timed repetitions of a 30-layer step (lserve: of 4 steps), in rounds of 4 that alternate the cases")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS / "speed"))
    args = ap.parse_args(argv)
    if args.context % args.page_size:
        ap.error("--context must be a multiple of --page-size (the lean paths then need no slot mask)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_at_start = os.getloadavg()[0]
    ctx, S = args.context, args.page_size
    budget_pages = args.budget // S
    q32 = torch.randn(1, HQ, D)  # each case gets it in the pool's dtype, as a model of that dtype makes it
    lengths = torch.tensor([ctx])
    sink, window = 4, 32
    rows: list[dict] = []

    def row(path, policy, dtype, scope, t, **extra):
        rows.append({"path": path, "policy": policy, "dtype": str(dtype).replace("torch.", ""), "scope": scope,
                     "context": ctx, "budget": None if policy.startswith("dense") else args.budget,
                     "decode_ms_p50": round(t["ms_p50"], 4), "decode_ms_p90": round(t["ms_p90"], 4),
                     "wall_ms_p50": round(t["wall_ms_p50"], 4), "wall_ms_p90": round(t["wall_ms_p90"], 4), **extra})
        print(f"{path:8s} {scope:6s} {policy:14s} {rows[-1]['dtype']:9s} cpu p50 {t['ms_p50']:.4f} p90 {t['ms_p90']:.4f} "
              f"| wall p50 {t['wall_ms_p50']:.4f} p90 {t['wall_ms_p90']:.4f} ms", flush=True)

    # ---- one layer, kernel path ------------------------------------------------------------
    for dtype in (torch.float32, torch.bfloat16):
        q = q32.to(dtype)
        store, seq, dense = build(ctx, S, dtype, 1)
        k, v = dense[0][0].to(dtype), dense[0][1].to(dtype)
        kp, vp = store.storage(0).k, store.storage(0).v
        table = store.page_tables([seq], 0)  # [1, Hkv, P]
        kmin, kmax = store.key_bounds(0)
        slot_pos = store.slot_positions(0)

        row("kernel", "dense_matmul", dtype, "layer", timeit(lambda: dense_decode_fast(q, k, v), args.warmup, args.reps))
        row("kernel", "dense_sdpa", dtype, "layer", timeit(
            lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True), args.warmup, args.reps))

        def quest_step():  # the lean fused path (same pages as QuestSelector, tested)
            return quest_decode_fast(q, kp, vp, kmin, kmax, table, [ctx], budget_pages, sink, window)

        def quest_generic():  # the library's scoring functions + the generic sparse decode
            forced = forced_from_positions(slot_pos, table, lengths, sink, window)
            scores = quest_scores(q, signed_boxes(kmin, kmax, table), forced, "max")
            return sparse_decode_fast(q, kp, vp, top_pages(scores, table, budget_pages), slot_pos >= 0)
        row("kernel", "quest", dtype, "layer", timeit(quest_step, args.warmup, args.reps))
        row("kernel", "quest_generic", dtype, "layer", timeit(quest_generic, args.warmup, args.reps))

        lsel = LServeSelector(budget=args.budget, sink=sink, window=window, group=4, coarse=2, reuse_steps=4)
        cached = {}

        def lserve_refresh():  # the lean two-level pass (same pages as LServeSelector, tested)
            cached["pages"] = lserve_select_fast(q, kmin, kmax, table, [ctx], S, budget_pages, lsel.group,
                                                 lsel.coarse, sink, window)
            return sparse_decode_fast(q, kp, vp, cached["pages"])  # context % page_size == 0: all slots full

        def lserve_reuse():  # the kept pages; the newest page is among them (it is a window page)
            return sparse_decode_fast(q, kp, vp, cached["pages"])
        t_ref = timeit(lserve_refresh, args.warmup, args.reps)
        t_reuse = timeit(lserve_reuse, args.warmup, args.reps)
        n = lsel.reuse_steps
        row("kernel", "lserve", dtype, "layer",
            {k2: (t_ref[k2] + (n - 1) * t_reuse[k2]) / n for k2 in t_ref},  # p90 of the mix: approximate
            refresh_ms_p50=round(t_ref["ms_p50"], 4), reuse_ms_p50=round(t_reuse["ms_p50"], 4), reuse_steps=n)

        # TidalDecode, a reuse layer: gather the chosen positions' slots, attend over them
        chosen = torch.randperm(ctx)[:args.budget].sort().values

        def tidal_reuse():
            slots = (table[0][:, chosen // S] * S + chosen % S).view(-1)  # [Hkv*K] flat slot ids
            kk = kp.view(-1, D).index_select(0, slots).view(1, HKV, -1, D)
            vv = vp.view(-1, D).index_select(0, slots).view(1, HKV, -1, D)
            return dense_decode_fast(q, kk, vv)

        def tidal_select():  # a selection layer: full attention plus the top-K positions
            qg = (q.view(1, HKV, 3, D) * D ** -0.5).to(k.dtype)
            probs = torch.softmax((qg @ k.transpose(-1, -2)).float(), -1)
            out = (probs.to(v.dtype) @ v).view(1, HQ, D)
            probs.sum((1, 2))[0].topk(args.budget)
            return out
        t_tr = timeit(tidal_reuse, args.warmup, args.reps)
        t_ts = timeit(tidal_select, args.warmup, args.reps)
        row("kernel", "tidal_reuse", dtype, "layer", t_tr)
        row("kernel", "tidal_select", dtype, "layer", t_ts)

    # ---- one layer, library path (bf16 store, as KVKitCache with a bf16 model) ----------------
    store, seq, _ = build(ctx, S, torch.bfloat16, 1)
    q = q32.to(torch.bfloat16)
    lib_reps = max(10, args.reps // 10)
    for name, pol, backend in (("dense", policies.get("dense"), None),
                               ("dense_ref", policies.get("dense"), "ref"),  # decode's float32 reference
                               ("quest", policies.get("quest", budget=args.budget, dense_layers=0), None),
                               ("lserve", policies.get("lserve", budget=args.budget, dense_layers=0), None)):
        def lib_step(pol=pol, backend=backend, refresh=False):
            if refresh:  # forget the kept choice: this step chooses afresh
                store.policy_state(seq).clear()
            sel = pol.select(store, [seq], 0, q)
            return decode(q, store, [seq], 0, sel, backend=backend)
        if name != "lserve":
            row("library", name, torch.bfloat16, "layer", timeit(lib_step, 3, lib_reps))
            continue
        # the length stays put here, so without the reset every step after the first would reuse
        t_ref = timeit(lambda: lib_step(refresh=True), 3, lib_reps)
        t_reuse = timeit(lib_step, 3, lib_reps)
        n = pol.selector.reuse_steps
        row("library", name, torch.bfloat16, "layer", {k2: (t_ref[k2] + (n - 1) * t_reuse[k2]) / n for k2 in t_ref},
            refresh_ms_p50=round(t_ref["ms_p50"], 4), reuse_ms_p50=round(t_reuse["ms_p50"], 4), reuse_steps=n)

    # ---- one decode step over 30 layers, kernel path, bf16 and fp32 -----------------------------
    for dtype in (torch.float32, torch.bfloat16):
        q = q32.to(dtype)
        store, seq, dense = build(ctx, S, dtype, LAYERS, seed=1)
        dense = [(k.to(dtype), v.to(dtype)) for k, v in dense]
        tables = [store.page_tables([seq], layer) for layer in range(LAYERS)]
        bounds = [store.key_bounds(layer) for layer in range(LAYERS)]
        pools = [(store.storage(layer).k, store.storage(layer).v, store.slot_positions(layer)) for layer in range(LAYERS)]

        def dense_all():
            for k, v in dense:
                dense_decode_fast(q, k, v)

        def quest_all(dense_layers=2):
            for layer in range(LAYERS):
                if layer < dense_layers:
                    fastest_dense(q, *dense[layer])
                    continue
                kp, vp, _ = pools[layer]
                quest_decode_fast(q, kp, vp, *bounds[layer], tables[layer], [ctx], budget_pages, sink, window)
        lsel_step = LServeSelector(budget=args.budget, sink=sink, window=window, group=4, coarse=2, reuse_steps=4)

        def lserve_all4(dense_layers=2):  # 4 decode steps: one refresh of the selection, 3 reuses
            kept = {}
            for step in range(lsel_step.reuse_steps):
                for layer in range(LAYERS):
                    if layer < dense_layers:
                        fastest_dense(q, *dense[layer])
                        continue
                    kp, vp, _ = pools[layer]
                    if step == 0:
                        kept[layer] = lserve_select_fast(q, *bounds[layer], tables[layer], [ctx], S, budget_pages,
                                                         lsel_step.group, lsel_step.coarse, sink, window)
                    sparse_decode_fast(q, kp, vp, kept[layer])

        def sdpa_all():
            for k, v in dense:
                F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
        # interleaved rounds: the ratios are the result, and this host's speed drifts within minutes
        rounds = max(1, args.step_reps // 4)
        t = timeit_rounds({"dense_matmul": dense_all, "dense_sdpa": sdpa_all, "quest": quest_all,
                           "lserve": lserve_all4}, 2, 4, rounds)
        row("kernel", "dense_matmul", dtype, "step", t["dense_matmul"])
        row("kernel", "dense_sdpa", dtype, "step", t["dense_sdpa"])
        row("kernel", "quest", dtype, "step", t["quest"], dense_layers=2)
        row("kernel", "lserve", dtype, "step", {k2: v / lsel_step.reuse_steps for k2, v in t["lserve"].items()},
            dense_layers=2)
        del store, dense

    # ---- ratios against the fastest dense of the same scope, same run ------------------------
    for scope in ("layer", "step"):
        base = min((r for r in rows if r["scope"] == scope and r["path"] == "kernel" and r["policy"].startswith("dense")),
                   key=lambda r: r["decode_ms_p50"])
        for r in rows:
            if r["scope"] == scope and r["path"] == "kernel":
                r["speedup_vs_fastest_dense"] = round(base["decode_ms_p50"] / r["decode_ms_p50"], 2)
                wall_base = min(x["wall_ms_p50"] for x in rows if x["scope"] == scope and x["path"] == "kernel"
                                and x["policy"].startswith("dense"))
                r["wall_speedup_vs_fastest_dense"] = round(wall_base / r["wall_ms_p50"], 2)
                r["fastest_dense"] = f"{base['policy']} {base['dtype']}"
    lib_dense = next(r for r in rows if r["path"] == "library" and r["policy"] == "dense")
    for r in rows:
        if r["path"] == "library":
            r["speedup_vs_library_dense"] = round(lib_dense["decode_ms_p50"] / r["decode_ms_p50"], 2)

    table = markdown_table(
        ["path", "scope", "policy", "dtype", "CPU ms p50", "CPU ms p90", "vs fastest dense (CPU)", "wall ms p50",
         "vs fastest dense (wall)"],
        [[r["path"], r["scope"], r["policy"], r["dtype"], f"{r['decode_ms_p50']:.4f}", f"{r['decode_ms_p90']:.4f}",
          f"{r.get('speedup_vs_fastest_dense', r.get('speedup_vs_library_dense')):.2f}x", f"{r['wall_ms_p50']:.4f}",
          "" if r.get("wall_speedup_vs_fastest_dense") is None else f"{r['wall_speedup_vs_fastest_dense']:.2f}x"]
         for r in rows])
    table += ("\n\nTimes are this thread's CPU time (`time.thread_time`, one torch thread), which leaves out time "
              "spent waiting for a core; wall times are beside them. The fastest dense is the fastest of "
              "matmul-softmax and SDPA in fp32 and bf16 over contiguous K/V.\n"
              "`layer`: one layer; `step`: 30 layers (quest, lserve: first 2 dense, by the faster dense path of the "
              "dtype; lserve: 4 steps / 4). Queries come in the pool's dtype, as a model of that dtype makes "
              "them. `library` rows compare against the library's own dense path (FullSelector + "
              "kvkit.attention.decode), not the fastest dense. "
              "lserve = (one refresh + 3 reuse steps) / 4; tidal_select = a selection layer (full attention + "
              "top-K), tidal_reuse = a layer reading the chosen 1K tokens.")
    write_results(Path(args.out).name, {
        "load_avg_1m_at_start": load_at_start, "rows": rows,
        "geometry": {"layers": LAYERS, "num_qo_heads": HQ, "num_kv_heads": HKV, "head_dim": D,
                     "page_size": S, "batch": 1, "sink": sink, "window": window}},
        f"decode attention, context {ctx}, budget {args.budget} tokens/KV head, page {S}, "
        f"{torch.get_num_threads()} torch thread(s), load {load_at_start:.1f} at start", table, Path(args.out).parent)
    return 0


if __name__ == "__main__":
    with torch.inference_mode():
        raise SystemExit(main())
