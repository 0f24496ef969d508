"""A tiny kvkit workload that reports metrics, for the Prometheus and browser tests.

The "dense" and "streaming" policies (`kvkit.policies.get`) each get a real `PagedKVStore`
(`policy.make_store`) and the same token stream, run the decode data flow of DESIGN.md
(append, select, `kvkit.attention.decode`, evict) per layer, and report through
`kvkit.metrics`: resident bytes, pages read, decode and selection time, evictions, and on every
`recall_every`-th step the selection recall (the share of dense attention mass that the tokens
streaming kept receive). A small LRU expert cache sees top-2 routing of random logits.

Run: python workload.py --steps 64 --step-seconds 0.05 --hold 60 --summary out.json
The first stdout line is "PORT <n>" (metrics on 127.0.0.1). The summary JSON (the exact values
handed to kvkit.metrics, and the stores' final stats) is written once the steps are done; the
process then keeps serving for `--hold` seconds and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections import OrderedDict
from pathlib import Path

import torch

from kvkit import metrics, policies
from kvkit.attention import decode
from kvkit.store import PagedKVStore

# L layers, HKV KV heads, HQ query heads (GQA 2:1), D head_dim, S page_size
L, HKV, HQ, D, S = 2, 2, 4, 32, 16
MODEL = "tiny-llama"
NUM_EXPERTS, CACHE_SLOTS, TOP_K = 8, 3, 2


def dense_pages(store: PagedKVStore, seq: int) -> int:
    """Pages a dense read of every layer and KV head needs for the tokens appended so far."""
    return sum(store.num_kv_heads * -(-store.length(seq, layer) // store.page_size)
               for layer in range(store.num_layers))


def recall(dense: PagedKVStore, kept: PagedKVStore, seq: int, layer: int, q: torch.Tensor
           ) -> float:
    """Share of dense attention mass (q `[HQ, D]`) on the positions `kept` holds in `layer`."""
    shares = []
    for head in range(dense.num_kv_heads):
        pos, k, _ = dense.read(seq, layer, head)                            # [n], [n, D]
        qh = q[head * (HQ // HKV):(head + 1) * (HQ // HKV)].float()         # [G, D]
        p = torch.softmax(qh @ k.float().T / math.sqrt(D), dim=-1)          # [G, n]
        on_kept = torch.isin(pos, kept.positions(seq, layer, head))
        shares.append(float(p[:, on_kept].sum(-1).mean()))
    return sum(shares) / len(shares)


class LRUExperts:
    """An LRU cache of expert ids; counts hits, misses, bytes moved and prefetch use."""

    def __init__(self, slots: int, expert_bytes: int) -> None:
        self.slots, self.expert_bytes = slots, expert_bytes
        self.cache: OrderedDict[int, None] = OrderedDict()

    def lookup(self, experts: list[int], predicted: set[int]) -> dict[str, int]:
        hits = misses = 0
        for e in experts:
            if e in self.cache:
                hits += 1
                self.cache.move_to_end(e)
            else:
                misses += 1
                self.cache[e] = None
                if len(self.cache) > self.slots:
                    self.cache.popitem(last=False)
        return {"hits": hits, "misses": misses, "bytes_moved": misses * self.expert_bytes,
                "prefetch_issued": len(predicted),
                "prefetch_useful": len(predicted & set(experts))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=28)
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--recall-every", type=int, default=4)
    parser.add_argument("--hold", type=float, default=60.0, help="seconds to keep serving after")
    parser.add_argument("--summary", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    port = metrics.serve(0)
    print(f"PORT {port}", flush=True)

    chosen = {"dense": policies.get("dense"),
              "streaming": policies.get("streaming", sink=args.sink, window=args.window)}
    stores = {name: p.make_store(L, HKV, D, page_size=S) for name, p in chosen.items()}
    seqs = {name: store.add_sequence() for name, store in stores.items()}
    expert_weight = torch.empty(64, 128, dtype=torch.bfloat16)  # one expert's weights
    experts = LRUExperts(CACHE_SLOTS, expert_weight.numel() * expert_weight.element_size())
    skew = torch.linspace(2.0, 0.0, NUM_EXPERTS)  # some experts are hot
    sent: dict[str, dict[str, float]] = {name: {} for name in (*stores, "lru")}

    def add(policy: str, key: str, value: float) -> None:
        sent[policy][key] = sent[policy].get(key, 0) + value

    def evicted(name: str, tokens: int) -> None:
        if tokens:
            metrics.record_evictions(name, tokens)
            add(name, "evicted_tokens", tokens)

    for start in range(0, args.prefill, S):  # chunked prefill, evicting as it goes
        n = min(S, args.prefill - start)
        for layer in range(L):
            k, v = torch.randn(n, HKV, D), torch.randn(n, HKV, D)
            for name, store in stores.items():
                store.append(seqs[name], layer, k, v)
                evicted(name, chosen[name].evict(store, [seqs[name]], layer, None))

    predicted: set[int] = set()
    for step in range(args.steps):
        q = torch.randn(L, HQ, D)  # one decode query per layer
        sample = step % args.recall_every == 0  # recall needs a dense pass: sampled steps only
        shares: list[float] = []
        done = {name: {"read": 0, "seconds": 0.0, "selecting": 0.0} for name in stores}
        for layer in range(L):
            k, v = torch.randn(1, HKV, D), torch.randn(1, HKV, D)
            for name, store in stores.items():  # dense first: its store is the recall oracle
                policy, seq = chosen[name], seqs[name]
                store.append(seq, layer, k, v)
                t0 = time.perf_counter()
                selection = policy.select(store, [seq], layer, q[layer][None])
                t1 = time.perf_counter()
                _, stats = decode(q[layer][None], store, [seq], layer, selection,
                                  return_stats=policy.needs_attention)
                done[name]["seconds"] += time.perf_counter() - t0
                done[name]["selecting"] += t1 - t0
                done[name]["read"] += int(selection.num_pages.sum())
                if sample and name == "streaming":
                    shares.append(recall(stores["dense"], store, seq, layer, q[layer]))
                evicted(name, policy.evict(store, [seq], layer, stats))
        for name, store in stores.items():
            read, total = done[name]["read"], dense_pages(store, seqs[name])
            bytes_read = read * S * D * 2 * store.dtype.itemsize  # K and V of each page read
            metrics.record_decode(name, read, total, bytes_read, done[name]["seconds"],
                                  done[name]["selecting"])
            for key, value in (("pages_read", read), ("pages_dense", total),
                               ("bytes_read", bytes_read), ("decode_steps", 1)):
                add(name, key, value)
            metrics.observe_store(store, name, MODEL)
            metrics.observe_resident_parts(name, {("bf16", "all"): store.nbytes()}, MODEL)
        if sample:
            r = min(1.0, sum(shares) / len(shares))
            metrics.record_selection_recall("streaming", r)
            metrics.record_selection_recall("dense", 1.0)  # dense reads every token
            add("streaming", "recall_sum", r)
            add("streaming", "recall_count", 1)

        route = torch.topk(torch.randn(NUM_EXPERTS) + skew, TOP_K).indices.tolist()
        counts = experts.lookup(route, predicted)
        predicted = set(route)  # naive lookahead: the next token uses the same experts
        metrics.record_expert_cache("lru", **counts)
        for key, value in counts.items():
            add("lru", key, value)
        time.sleep(args.step_seconds)

    final = {name: dataclasses.asdict(store.stats()) for name, store in stores.items()}
    tmp = args.summary.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid(), "sent": sent, "stores": final,
                               "steps": args.steps, "model": MODEL}, indent=1))
    tmp.replace(args.summary)  # appears whole, never half-written
    time.sleep(args.hold)


if __name__ == "__main__":
    main()
