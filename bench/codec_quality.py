"""Storage codecs on SmolLM2: perplexity of real text through the codec's cache and the KV bytes
the store really allocated, against dense in the same run.

python bench/codec_quality.py                       # the quoted run (bench/results/codec_quality.*)
python bench/codec_quality.py --rows "dense;kivi:bits=4" --tokens 64   # a quick look

Text: /usr/share/common-licenses/GPL-3, its last `--context` tokens; the first part is prefilled
and the last `--tokens` are predicted one at a time through the cache (kvkit.evaluate.perplexity).
CSKV's bases are calibrated on Python standard-library sources, never on this text.
The model runs in float32, so the dense store is float32; the byte ratios are quoted against a
bf16 dense store fed the same tokens in the same chunks (built and measured beside the run), the
conservative yardstick. `--merge` combines runs made in parallel (the perplexity ratio then
comes from the dense row of whichever run has it: same text, same tokens). A row is `name` or `name:param=value,param=value`; rows split on ';'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import RESULTS, markdown_table, write_results  # noqa: E402

GPL = "/usr/share/common-licenses/GPL-3"
DEFAULT_ROWS = ";".join([
    "dense", "plain:dtype=bf16",
    "kivi:bits=4", "kivi:bits=3", "kivi:bits=2",
    "gear:bits=4", "gear:bits=3", "gear:bits=2",
    "cskv:ratio=0.75", "cskv:ratio=0.5", "cskv:ratio=0.35", "cskv:ratio=0.2",
])


def parse_row(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return name.strip(), params


def build(name: str, params: dict):
    from kvkit import policies
    from kvkit.policies import Policy, PlainCodec
    if name == "plain":
        return Policy(codec=PlainCodec(**params), name="plain")
    return policies.get(name, **params)


def bf16_store_bytes(num_layers: int, num_kv_heads: int, head_dim: int, page_size: int,
                     prefill: int, decode: int, chunk: int = 512) -> int:
    """store.nbytes() of a plain bf16 store fed like kvkit.evaluate.perplexity feeds the cache:
    the prefill in chunks of `chunk`, then `decode` single tokens (same pool growth)."""
    from kvkit.store import PagedKVStore
    store = PagedKVStore(num_layers, num_kv_heads, head_dim, page_size=page_size, dtype=torch.bfloat16)
    seq = store.add_sequence()
    for layer in range(num_layers):
        sizes = [min(chunk, prefill - i) for i in range(0, prefill, chunk)] + [1] * decode
        for n in sizes:
            z = torch.zeros(n, num_kv_heads, head_dim, dtype=torch.bfloat16)
            store.append(seq, layer, z, z)
    return store.nbytes()


def finish(rows: list[dict], args_text: dict, name: str, write: bool) -> None:
    """Ratios against the dense row (perplexity) and the bf16 store (bytes); JSON + table."""
    dense = next((r for r in rows if r["policy"] == "dense"), None)
    for row in rows:
        row["ppl_vs_dense"] = row["perplexity"] / dense["perplexity"] if dense else None
        row["bytes_vs_dense_bf16"] = row["kv_bytes"] / row["bf16_store_bytes"]
    table = markdown_table(
        ["policy", "params", "page", "perplexity", "vs dense", "KV bytes", "vs bf16 dense"],
        [[r["policy"], ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "–", r["page_size"],
          f"{r['perplexity']:.4f}", f"{r['ppl_vs_dense']:.4f}x" if r["ppl_vs_dense"] else "–",
          r["kv_bytes"], f"{r['bytes_vs_dense_bf16']:.3f}x"] for r in rows])
    title = (f"codec quality, {Path(args_text['file']).name} last {args_text['context_tokens']} tokens, "
             f"{args_text['scored_tokens']} scored one at a time")
    if write:
        write_results(name, {"rows": rows, **args_text}, title, table)
    else:
        print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--file", default=GPL)
    ap.add_argument("--context", type=int, default=1792, help="tokens of the text used (prefill + scored)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens scored one at a time")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--name", default="codec_quality", help="results file name under bench/results/")
    ap.add_argument("--no-write", action="store_true")

    ap.add_argument("--merge", nargs="*", default=None,
                    help="combine result JSONs of earlier runs (same text and tokens) into --name")
    args = ap.parse_args(argv)
    if args.merge:
        runs = [json.loads(Path(p).read_text()) for p in args.merge]
        rows = [r for run in runs for r in run["rows"]]
        rows.sort(key=lambda r: r["policy"] != "dense")
        meta = {k: runs[0][k] for k in ("file", "context_tokens", "scored_tokens")}
        meta["merged_from"] = [run["command"] for run in runs]
        finish(rows, meta, args.name, not args.no_write)
        return 0

    from kvkit.evaluate import load, perplexity
    torch.manual_seed(0)
    model, tok = load()
    cfg = model.config
    geometry = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    text = Path(args.file).read_text()
    n_text = min(args.context, tok(text, return_tensors="pt").input_ids.shape[1])
    bf16 = bf16_store_bytes(*geometry, args.page_size, n_text - args.tokens, args.tokens - 1)
    rows = []
    for spec in args.rows.split(";"):
        name, params = parse_row(spec)
        policy = build(name, params)
        r = perplexity(model, tok, policy, text, tokens=args.tokens, context_tokens=args.context,
                       page_size=args.page_size)
        row = {"policy": name, "params": params, "page_size": args.page_size,
               "perplexity": r.perplexity, "kv_bytes": r.kv_bytes, "bf16_store_bytes": bf16,
               "kv_bytes_dense_equivalent": r.kv_bytes_dense_equivalent, "seconds": r.seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
        meta = {"file": args.file, "context_tokens": n_text, "scored_tokens": args.tokens}
        if not args.no_write:  # rewrite after every row, so a cut-short run keeps what it measured
            (RESULTS / f"{args.name}.partial.json").write_text(json.dumps({"rows": rows, **meta}))
    finish(rows, meta, args.name, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
