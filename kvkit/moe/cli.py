"""`kvkit moe replay` and `kvkit moe sim`: score expert-cache policies on a trace;
`kvkit moe schedule`: rank the online scheduler's configurations (kvkit.moe.sched) by time.

Mounted by `kvkit.cli` through `register_cli(subparsers)`; each subcommand sets
`func(args) -> int`. Prints a markdown table, and JSON with `--json PATH` (or `--json -`).
Options are checked as they are parsed; a bad trace or option raises `kvkit.cli.UsageError`,
which `kvkit` prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kvkit.cli import UsageError, nonneg_float, nonneg_int, output_file, positive_int

__all__ = ["register_cli", "main"]


def _csv_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _capacities(text: str) -> list[int]:
    try:
        values = [int(p) for p in _csv_list(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected integers like 8,16,32, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 like 8,16,32, got {text!r}")
    return values


def _fraction(text: str) -> float:
    value = nonneg_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _json_out(text: str) -> str | Path:
    return text if text == "-" else output_file(text)


def _table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join("–" if r[c] is None else str(r[c]) for c in cols) + " |")
    return "\n".join(out)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--capacity", type=_capacities, default=[16],
                   help="fast-tier experts per layer (or in total with --scope shared); "
                        "comma list, e.g. 8,16,32")
    p.add_argument("--policy", type=_csv_list, default=["lru", "lfu", "lookahead", "score"],
                   help="comma list of lru, lfu, belady, lookahead, score (lru and belady "
                        "always run as yardsticks)")
    p.add_argument("--scope", choices=["layer", "shared"], default="layer")
    p.add_argument("--warmup-tokens", type=nonneg_int, default=None,
                   help="tokens replayed before counting (default: 10%% of the trace)")
    p.add_argument("--profile", default="a100-pcie4",
                   help="hardware profile for stall estimates: a100-pcie4, h100-pcie5, "
                        "rtx4090-pcie4, local (measured here)")
    p.add_argument("--miss", choices=["none", "load", "lowbit", "cpu", "auto"], default="none",
                   help="miss handling for non-yardstick policies (kvkit.moe.miss)")
    p.add_argument("--predict", choices=["keep", "cooccurrence", "oracle"], default="keep",
                   help="predictions for lookahead: keep the trace's, fit a layer-ahead "
                        "co-occurrence predictor, or a noisy oracle (pre-gating stand-in)")
    p.add_argument("--lookahead", type=nonneg_int, default=1,
                   help="with --predict: layers ahead (cooccurrence) or tokens ahead (oracle)")
    p.add_argument("--oracle-accuracy", type=_fraction, default=0.9)
    p.add_argument("--prefetch-budget", type=nonneg_int, default=8,
                   help="experts the lookahead policy may prefetch per step")
    p.add_argument("--other-ms", type=nonneg_float, default=0.0,
                   help="non-expert time per layer (attention etc.) that hides prefetches")
    p.add_argument("--json", type=_json_out, default=None, help="write JSON here ('-' for stdout)")


def _predictions(trace: Any, args: argparse.Namespace) -> Any:
    from kvkit.moe.synth import cooccurrence_predictions, noisy_oracle_predictions

    if args.predict == "cooccurrence":
        trace, recall = cooccurrence_predictions(trace, args.lookahead)
        print(f"co-occurrence predictor, {args.lookahead} layer(s) ahead: held-out recall "
              f"{recall[args.lookahead]:.3f}")
    elif args.predict == "oracle":
        trace = noisy_oracle_predictions(trace, args.oracle_accuracy, args.lookahead, "tokens")
    return trace


def _evaluate(trace: Any, args: argparse.Namespace, source: dict[str, Any]) -> int:
    from kvkit.moe.cache import CacheConfig
    from kvkit.moe.miss import MissHandler
    from kvkit.moe.sim import compare_policies, get_profile

    trace = _predictions(trace, args)
    if "lookahead" in args.policy and trace.predicted is None:
        raise UsageError("policy 'lookahead' needs predictions; this trace has none. Add "
                         "--predict cooccurrence (layer-ahead predictor) or --predict oracle, or "
                         "drop lookahead from --policy")
    profile = get_profile(args.profile)
    warm = args.warmup_tokens if args.warmup_tokens is not None else trace.num_tokens // 10
    handler = None if args.miss == "none" else MissHandler(profile, mode=args.miss)
    rows = []
    for cap in args.capacity:
        cfg = CacheConfig(cap, scope=args.scope, warmup_tokens=warm)
        rows += compare_policies(trace, args.policy, cfg, profile, handler,
                                 other_per_layer_s=args.other_ms * 1e-3,
                                 policy_params={"lookahead": {"prefetch_budget":
                                                              args.prefetch_budget}})
    print(f"{source['trace']}: {trace.num_tokens} tokens x {trace.num_layers} layers, "
          f"{trace.num_experts} experts top-{trace.top_k}, {trace.expert_bytes} B/expert; "
          f"profile {profile.name} ({profile.source})")
    print(_table(rows))
    if args.json:
        doc = {"command": " ".join(sys.argv),
               **source, "profile": profile.__dict__, "rows": rows}
        text = json.dumps(doc, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            args.json.write_text(text + "\n")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from kvkit.moe.trace import load_csv_trace, load_trace

    path = Path(args.trace)
    try:
        trace = load_csv_trace(path, num_experts=args.num_experts, expert_bytes=args.expert_bytes) \
            if path.suffix == ".csv" else load_trace(path)
        return _evaluate(trace, args, {"trace": str(path)})
    except (FileNotFoundError, ValueError) as err:  # TraceError is a ValueError
        raise UsageError(str(err)) from err


def _sim(args: argparse.Namespace) -> int:
    from kvkit.moe.synth import check_calibration, generate, preset
    from kvkit.moe.trace import save_trace

    try:
        cfg = preset(args.preset)
    except (KeyError, ValueError, OSError) as err:
        raise UsageError(f"--preset {args.preset}: {err}") from err
    trace = generate(cfg, args.tokens, seed=args.seed, num_layers=args.layers)
    if not args.skip_calibration_check:
        check = check_calibration(trace)
        if not check["ok"]:
            print(f"kvkit moe sim: error: this synthetic trace misses the calibration curves by "
                  f"{check['max_abs_error']:.3f} (> 0.03): {check['curves']}; no simulated "
                  f"numbers reported. Use more --tokens or refit (bench/moe_calibrate.py).",
                  file=sys.stderr)
            return 3
        print(f"calibration ok: max |error| {check['max_abs_error']:.3f} vs DeepSeek-V2-Lite "
              f"LRU/Belady curves")
    if args.save_trace:
        print(f"trace written to {save_trace(args.save_trace, trace)}")
    try:
        return _evaluate(trace, args, {"trace": f"synthetic:{args.preset}", "seed": args.seed})
    except ValueError as err:
        raise UsageError(str(err)) from err


def _schedule(args: argparse.Namespace) -> int:
    from kvkit.moe.predict import recall
    from kvkit.moe.sched import SchedConfig, gate_ranked
    from kvkit.moe.sched_compare import compare_schedules, standard_configs
    from kvkit.moe.sim import get_profile
    from kvkit.moe.trace import load_trace

    try:
        trace = load_trace(Path(args.trace))
        cap = args.capacity or max(1, trace.num_experts // 4)
        warm = args.warmup_tokens if args.warmup_tokens is not None else trace.num_tokens // 2
        profile = get_profile(args.profile)
        if args.lowbit:
            ok, why = gate_ranked(trace)
            if not ok:
                raise ValueError(f"--lowbit needs a trace whose rows are in gate order "
                                 f"(highest first); {args.trace} has no gate ranks: {why}")
        variants = [(label, trace, cfg) for label, cfg in standard_configs(
            cap, lowbit=args.lowbit is not None, lowbit_bits=args.lowbit or 4,
            lowbit_min_rank=args.lowbit_min_rank)]
        if trace.predicted is not None:
            # confidence from the warm-up tokens only: the counted ones stay unseen
            conf = recall(trace, trace.predicted, 0, warm) if warm else 1.0
            variants.append(("hybrid + hints: trace predictions", trace,
                             SchedConfig(cap, hint_confidence=round(conf, 4))))
        rows = compare_schedules(variants, profile, warm, args.hidden_size)
    except (FileNotFoundError, ValueError) as err:  # TraceError is a ValueError
        raise UsageError(str(err)) from err
    print(f"{args.trace}: {trace.num_tokens} tokens ({warm} warm-up) x {trace.num_layers} layers, "
          f"{trace.num_experts} experts top-{trace.top_k}, {cap} cached per layer; "
          f"profile {profile.name}, modelled; fastest first")
    print(_table(rows))
    if args.json:
        text = json.dumps({"command": " ".join(sys.argv), "trace": str(args.trace),
                           "profile": profile.__dict__, "rows": rows}, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            args.json.write_text(text + "\n")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add `replay` and `sim` to an argparse subparsers object (mounted as `kvkit moe ...`)."""
    p = subparsers.add_parser("replay", help="replay a routing trace through cache policies",
                              description="Replay a routing trace (.npz from "
                                          "kvkit.moe.trace.save_trace, or CSV with columns "
                                          "layer, token, experts) through expert-cache policies.")
    p.add_argument("trace", help="trace file (.npz or .csv)")
    p.add_argument("--num-experts", type=positive_int, default=None, help="CSV only: experts per layer")
    p.add_argument("--expert-bytes", type=positive_int, default=1, help="CSV only: bytes per expert")
    _common(p)
    p.set_defaults(func=_replay)
    s = subparsers.add_parser("sim", help="simulate policies on a calibrated synthetic trace",
                              description="Generate a synthetic trace calibrated to "
                                          "DeepSeek-V2-Lite routing, check the calibration, then "
                                          "replay and price the policies.")
    s.add_argument("--preset", default="deepseek-v2-lite")
    s.add_argument("--tokens", type=positive_int, default=2000)
    s.add_argument("--layers", type=positive_int, default=None, help="default: the preset's (26)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--save-trace", type=output_file, default=None, help="also write the trace (.npz)")
    s.add_argument("--skip-calibration-check", action="store_true")
    _common(s)
    s.set_defaults(func=_sim)
    d = subparsers.add_parser("schedule", help="rank the online scheduler's configurations",
                              description="Run an .npz trace through kvkit.moe.sched: LRU with "
                                          "on-demand loads, all-CPU misses, each part alone and "
                                          "their compositions, ranked by modelled time per "
                                          "token (hit_rate counts demand hits only).")
    d.add_argument("trace", help="trace file (.npz)")
    d.add_argument("--capacity", type=positive_int, default=None,
                   help="fast-tier experts per layer (default: a quarter of the experts)")
    d.add_argument("--profile", default="a100-pcie4",
                   help="hardware profile: a100-pcie4, h100-pcie5, rtx4090-pcie4")
    d.add_argument("--warmup-tokens", type=nonneg_int, default=None,
                   help="tokens run before counting (default: half of the trace)")
    d.add_argument("--hidden-size", type=positive_int, default=2048,
                   help="model hidden size: activations shipped for a CPU miss")
    d.add_argument("--lowbit", type=positive_int, default=None, metavar="BITS",
                   help="also rank low-bit copies of BITS bits per weight (HOBBIT; changes "
                        "outputs; needs a trace whose rows are in gate order)")
    d.add_argument("--lowbit-min-rank", type=nonneg_int, default=2,
                   help="0-based rank in a token's top-k from which a low-bit copy is allowed")
    d.add_argument("--json", type=_json_out, default=None, help="write JSON here ('-' for stdout)")
    d.set_defaults(func=_schedule)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: `python -m kvkit.moe.cli replay|sim ...`, the same as `kvkit moe ...`."""
    from kvkit.cli import main as kvkit_main

    return kvkit_main(["moe", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
