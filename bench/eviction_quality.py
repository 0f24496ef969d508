"""Quality and memory of KV policies on the embedded SmolLM2: passkey and perplexity.

One question: at a given context, what does a policy keep of dense's passkey accuracy and
perplexity, and how many resident KV bytes does it need? Dense runs in the same process, and
the ratios come from that run. Used for h2o/a2sf (with the forgetting-factor sweep), duo and
compositions.

    python bench/eviction_quality.py --out bench/results/eviction_a2sf --ctx 1200 --depths 6 \
        --ppl-tokens 128 --ppl-context 1024 --policy dense \
        --policy 'h2o:{"budget": 300}' --policy 'a2sf:{"budget": 300, "forgetting_factor": 0.99}'

A `--policy` is `NAME`, `NAME:{json params}`, or a JSON policy file (`Policy.from_file`), with an
optional `label=` prefix. Writes OUT.json and OUT.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from kvkit import evaluate, policies
from kvkit.policies import Policy

GPL = "/usr/share/common-licenses/GPL-3"


def parse_policy(spec: str) -> tuple[str, Policy]:
    label, sep, rest = spec.partition("=")
    if not sep or rest.startswith("{") or "{" in label or ":" in label:
        label, rest = "", spec
    if rest.endswith(".json") and Path(rest).is_file():
        policy = Policy.from_file(rest)
        return label or Path(rest).stem, policy
    name, _, params = rest.partition(":")
    kwargs = json.loads(params) if params else {}
    policy = policies.get(name, **kwargs)
    return label or (name + ("" if not kwargs else " " + ",".join(f"{k}={v}" for k, v in kwargs.items()))), policy


def passkey_each(model, tok, policy, ctx, depths, seed, page_size, subset=None):
    """`evaluate.passkey`, one sample at a time (same keys: one draw of Random(seed) per depth),
    so a long run reports as it goes; `subset`: only these depth indices (keys unchanged, so a
    run split over processes sees the same samples). Yields (PasskeyResult, (pages used,
    allocated, tokens kept))."""
    for i, (depth, key) in enumerate(zip(depths, evaluate.passkey_keys(len(depths), seed))):
        if subset is not None and i not in subset:
            continue
        ids = evaluate.passkey_prompt(tok, ctx, depth, key)
        cache = evaluate.make_cache(model, policy, page_size)
        with torch.inference_mode():
            out = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        stats = cache.store.stats()
        new = out.shape[1] - ids.shape[1]
        yield evaluate.PasskeyResult(
            policy=policy.name, context_tokens=int(ids.shape[1]), depth=depth, key=key, answer=answer.strip(),
            correct=key in answer, kv_bytes=stats.nbytes, kv_bytes_dense_equivalent=stats.nbytes_dense_equivalent,
            decode_ms_per_token=1000 * cache.decode_seconds / max(1, new - 1)), _pages(cache.store)


def combine(rows: list[dict]) -> list[dict]:
    """Rows of one policy from runs split by --depth-subset: passkey counts add up, bytes take
    the max, answers concatenate; other fields come from the first row that has them."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["policy"] not in out:
            out[r["policy"]] = dict(r)
            continue
        m = out[r["policy"]]
        for k, v in r.items():
            if k in ("passkey_hits", "passkey_n", "seconds"):
                m[k] = m.get(k, 0) + v
            elif k in ("passkey_answers", "passkey_keys"):
                m[k] = m.get(k, []) + v
            elif k.endswith("_bytes") or k.endswith("_equivalent") or k.startswith("passkey_pages") \
                    or k == "passkey_tokens_resident_vs_all":
                m[k] = max(m.get(k, v), v)
            else:
                m.setdefault(k, v)
    return list(out.values())


def _pages(store) -> tuple[int, int, int]:
    st = store.stats()
    return st.pages_used, st.pages_capacity, st.tokens_resident


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", action="append", required=True)
    ap.add_argument("--ctx", type=int, default=2400, help="passkey prompt tokens")
    ap.add_argument("--depths", type=int, default=6, help="passkey depths (0 skips passkey)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--depth-subset", default=None, help="comma-separated depth indices to run (split a run)")
    ap.add_argument("--ppl-tokens", type=int, default=128, help="tokens scored one at a time (0 skips)")
    ap.add_argument("--ppl-context", type=int, default=1024, help="tokens of the text kept in all")
    ap.add_argument("--ppl-file", default=GPL)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("--merge-logs", nargs="+", default=None, metavar="LOG",
                    help="instead of running: collect the rows printed by earlier runs (same settings, "
                         "e.g. split over processes) and write one result")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    depths = [(i + 0.5) / args.depths for i in range(args.depths)]
    if args.merge_logs:
        rows = [json.loads(line) for log in args.merge_logs
                for line in Path(log).read_text().replace("\r", "\n").splitlines() if line.startswith('{"policy"')]
        labels = [parse_policy(spec)[0] for spec in args.policy]
        return write(args, depths, combine(rows), merged_from=args.merge_logs, labels=labels)
    chosen = [parse_policy(s) for s in args.policy]
    model, tok = evaluate.load()
    text = Path(args.ppl_file).read_text(errors="replace")
    rows = []
    for label, policy in chosen:
        row: dict = {"policy": label, "config": policy.to_config() if len(json.dumps(policy.to_config())) < 4000
                     else {"name": policy.name, "note": "per-head rules elided"}}
        t0 = time.perf_counter()
        if args.ppl_tokens:  # first: one prefill, then decode steps
            p = evaluate.perplexity(model, tok, policy, text, args.ppl_tokens, context_tokens=args.ppl_context,
                                    page_size=args.page_size)
            row.update(ppl=p.perplexity, ppl_kv_bytes=p.kv_bytes, ppl_context_tokens=p.context_tokens,
                       ppl_kv_bytes_bf16_dense_equivalent=p.kv_bytes_dense_equivalent)
            print(json.dumps({"partial": label, "ppl": p.perplexity, "ppl_kv_bytes": p.kv_bytes}), flush=True)
        if args.depths:
            res, pages = [], []  # pages: (pages used, pages allocated, tokens resident) per sample
            subset = None if args.depth_subset is None else {int(i) for i in args.depth_subset.split(",")}
            for sample in passkey_each(model, tok, policy, args.ctx, depths, args.seed, args.page_size, subset):
                res.append(sample[0])
                pages.append(sample[1])
                print(json.dumps({"partial": label, **asdict(sample[0]), "pages": sample[1]}), flush=True)
            used, capacity, resident = max(pages)
            appended = max(r.kv_bytes_dense_equivalent for r in res) // (2 * 2 * 64)  # K+V bf16, head_dim 64
            row.update(passkey_pages_used=used, passkey_pages_allocated=capacity,
                       passkey_tokens_resident_vs_all=round(resident / appended, 4))
            row.update(passkey_hits=sum(r.correct for r in res), passkey_n=len(res),
                       passkey_context_tokens=res[0].context_tokens,
                       passkey_kv_bytes=max(r.kv_bytes for r in res),
                       passkey_kv_bytes_bf16_dense_equivalent=max(r.kv_bytes_dense_equivalent for r in res),
                       passkey_answers=[r.answer for r in res], passkey_keys=[r.key for r in res])
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
    return write(args, depths, rows)


def write(args: argparse.Namespace, depths: list[float], rows: list[dict], merged_from: list[str] | None = None,
          labels: list[str] | None = None) -> int:
    if labels is not None:  # keep the order of --policy; rows whose label is not listed are dropped
        by_label = {r["policy"]: r for r in rows}
        rows = [by_label[label] for label in labels if label in by_label]
    dense = next((r for r in rows if r["policy"] == "dense"), None)
    for r in rows:
        for key in ("passkey_kv_bytes", "ppl_kv_bytes"):
            if dense and key in r and dense.get(key):
                r[key.replace("_bytes", "_vs_dense")] = round(r[key] / dense[key], 4)
            if key in r:
                r[key.replace("_bytes", "_vs_bf16_dense")] = round(r[key] / r[key + "_bf16_dense_equivalent"], 4)
        if dense and "ppl" in r:
            r["ppl_vs_dense"] = round(r["ppl"] / dense["ppl"], 4)
    result = {"bench": "eviction_quality", "command": "python " + " ".join([sys.argv[0], *map(_quote, sys.argv[1:])]),
              "git": git_sha(), "machine": {"device": "cpu", "cores": os.cpu_count(), "torch": torch.__version__,
                                            "python": platform.python_version(),
                                            "load_avg_at_end": os.getloadavg()[0]},
              "model": "SmolLM2-135M-Instruct float32", "ctx": args.ctx, "depths": depths,
              "ppl": {"file": args.ppl_file, "tokens": args.ppl_tokens, "context": args.ppl_context}, "rows": rows}
    if merged_from:
        result["merged_from_logs"] = merged_from
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


def _quote(a: str) -> str:
    return f"'{a}'" if any(c in a for c in ' {}"') else a


def markdown(result: dict) -> str:
    rows = result["rows"]
    ctx = next((r["passkey_context_tokens"] for r in rows if "passkey_context_tokens" in r), result["ctx"])
    lines = [f"{result['bench']}: passkey at {ctx} tokens x {len(result['depths'])} depths, perplexity of the last "
             f"{result['ppl']['tokens']} of {result['ppl']['context']} tokens of {Path(result['ppl']['file']).name} "
             f"— SmolLM2-135M float32, cpu, torch {result['machine']['torch']}, git {result['git']}",
             "", f"`{result['command']}`", "",
             "| policy | passkey | KV bytes (passkey) | vs dense | vs bf16 dense | tokens kept | perplexity | vs dense "
             "| KV bytes (ppl) | vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pk = f"{r['passkey_hits']}/{r['passkey_n']}" if "passkey_hits" in r else "–"
        lines.append("| " + " | ".join([
            r["policy"], pk, f"{r.get('passkey_kv_bytes', '–')}", f"{r.get('passkey_kv_vs_dense', '–')}",
            f"{r.get('passkey_kv_vs_bf16_dense', '–')}", f"{r.get('passkey_tokens_resident_vs_all', '–')}",
            f"{r['ppl']:.3f}" if "ppl" in r else "–", f"{r.get('ppl_vs_dense', '–')}",
            f"{r.get('ppl_kv_bytes', '–')}", f"{r.get('ppl_kv_vs_dense', '–')}"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
