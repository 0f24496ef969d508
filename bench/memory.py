"""Resident KV bytes per storage codec: `store.nbytes()` of a store filled like a real cache,
against a bf16 dense store filled the same way (and the peak RSS of the whole run).

python bench/memory.py                                  # the quoted run (bench/results/memory.*)
python bench/memory.py --contexts 2048 --page-sizes 16  # one point

The store has SmolLM2's geometry (30 layers, 3 KV heads, head_dim 64) and is fed random K/V
the way `kvkit.evaluate.perplexity` feeds it (prefill in chunks of 512, then `--decode`
single-token appends), so every byte the codec allocates is counted: packed codes, scales,
low-rank factors, outliers, the full-precision buffer of open pages and the recent window,
page bookkeeping and the pool's spare pages. Byte counts do not depend on the values (every
codec allocates fixed-size tensors), so random K/V give the bytes a real run gives; quality
is `bench/codec_quality.py`. CSKV's bases are a model constant shared by all sequences, like
the weights: reported in their own column, not in the store's bytes.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import markdown_table, write_results  # noqa: E402

DEFAULT_ROWS = ";".join([
    "dense", "int8", "kivi:bits=4", "kivi:bits=2",
    "gear:bits=4", "gear:bits=3", "gear:bits=2",
    "gear:bits=4,rank=1,outliers=0.005", "gear:bits=2,rank=2,outliers=0.02",
    "cskv:ratio=0.75", "cskv:ratio=0.5", "cskv:ratio=0.2",
])
GEOMETRY = (30, 3, 64)  # SmolLM2-135M: layers, KV heads, head_dim


def fill(policy, page_size: int, context: int, decode: int, dtype: torch.dtype, chunk: int = 512):
    """A store built by `policy`, fed `context - decode` tokens in chunks, then `decode` singles."""
    L, H, D = GEOMETRY
    store = policy.make_store(L, H, D, page_size, dtype=dtype)
    seq = store.add_sequence()
    g = torch.Generator().manual_seed(0)
    prefill = context - decode
    sizes = [min(chunk, prefill - i) for i in range(0, prefill, chunk)] + [1] * decode
    for layer in range(L):
        for n in sizes:
            k = torch.randn(n, H, D, generator=g).to(dtype)
            store.append(seq, layer, k, k)
    return store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--contexts", default="1663,4096,8192")
    ap.add_argument("--page-sizes", default="16,64")
    ap.add_argument("--decode", type=int, default=127, help="single-token appends after the prefill")
    ap.add_argument("--name", default="memory")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    from codec_quality import build, parse_row
    from kvkit.policies.codecs.cskv import CskvCodec
    from kvkit.policies import Policy, PlainCodec
    rows = []
    for page_size in [int(x) for x in args.page_sizes.split(",")]:
        for context in [int(x) for x in args.contexts.split(",")]:
            base = fill(Policy(codec=PlainCodec("bf16")), page_size, context, args.decode, torch.bfloat16)
            base_bytes = base.nbytes()
            del base
            for spec in args.rows.split(";"):
                name, params = parse_row(spec)
                policy = build(name, params)
                start = time.perf_counter()
                store = fill(policy, page_size, context, args.decode, torch.bfloat16)  # a bf16 model
                seconds = time.perf_counter() - start
                nbytes = store.nbytes()
                bases = 0
                if name == "cskv":
                    ranks = [policy.codec_for(layer) for layer in range(GEOMETRY[0])]
                    H, D = GEOMETRY[1:]
                    # fp32 encoder + decoder + mean per head, at the ranks used
                    bases = sum(4 * H * (2 * D * (c.k_rank + c.v_rank) + 2 * D) for c in ranks
                                if isinstance(c, CskvCodec))
                stats = store.stats()
                rows.append({"policy": name, "params": params, "page_size": page_size,
                             "context_tokens": context, "kv_bytes": nbytes,
                             "bf16_store_bytes": base_bytes, "bytes_vs_dense_bf16": nbytes / base_bytes,
                             "bases_bytes": bases, "pages_capacity": stats.pages_capacity,
                             "fill_seconds": seconds})
                print(rows[-1], flush=True)
                del store
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    table = markdown_table(
        ["policy", "params", "page", "context", "KV bytes", "vs bf16 dense", "bases bytes (shared)"],
        [[r["policy"], ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "–", r["page_size"],
          r["context_tokens"], r["kv_bytes"], f"{r['bytes_vs_dense_bf16']:.3f}x", r["bases_bytes"] or "–"]
         for r in rows])
    payload = {"rows": rows, "geometry": {"num_layers": GEOMETRY[0], "num_kv_heads": GEOMETRY[1],
                                          "head_dim": GEOMETRY[2]},
               "decode_appends": args.decode, "peak_rss_bytes": peak}
    title = "resident KV bytes per codec, SmolLM2 geometry (30 layers x 3 KV heads x 64)"
    if args.no_write:
        print(table)
    else:
        write_results(args.name, payload, title, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
