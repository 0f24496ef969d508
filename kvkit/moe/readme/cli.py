"""``kvkit moe extract | eval | trace``: the Read-ME subcommands (mounted by ``kvkit.cli``).

Numbers and output paths are checked as they are parsed (``kvkit.cli``'s argparse types), model
folders before anything loads; models load through ``kvkit.models`` (safetensors, no remote code).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from kvkit.cli import UsageError, nonneg_float, nonneg_int, output_file, positive_int

logger = logging.getLogger(__name__)


ROUTERS = ["oracle", "layer", "pregate", "all"]


def _ints(text: str) -> list[int]:
    return [positive_int(v) for v in text.split(",") if v.strip()]


def _moe_folder(path: str) -> Path:
    """`path` if it holds a Read-ME model (checked when the command runs, before loading)."""
    folder = Path(path).expanduser()
    if not (folder / "readme_config.json").is_file():
        raise UsageError(f"{folder} is not a Read-ME MoE folder (no readme_config.json); "
                         "write one with `kvkit moe extract --out FOLDER`")
    return folder


def _out_folder(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file; --out names a folder to write")
    return path


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``extract``, ``eval`` and ``trace`` to an argparse subparsers object."""
    p = subparsers.add_parser("extract", help="turn the dense model into a Read-ME MoE folder")
    p.add_argument("--model", default=None, help="dense HF folder (default: embedded SmolLM2)")
    p.add_argument("--experts", type=positive_int, default=32, help="experts per layer (divides 1536-s)")
    p.add_argument("--top-k", type=positive_int, default=24)
    p.add_argument("--shared", type=nonneg_int, default=0, help="always-on neurons per layer")
    p.add_argument("--router", default="pregate", choices=ROUTERS,
                   help="default routing of the saved model")
    p.add_argument("--ks", type=_ints, default=[], help="top-k values the routers serve (default: top-k)")
    p.add_argument("--calib", default="pydoc:0/2", help="pydoc | kvkit | stdlib | vim | licenses | path, "
                   "optionally name:i/n for every n-th file")
    p.add_argument("--calib-chunks", type=positive_int, default=96)
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--partition", default="coactivation", choices=["coactivation", "random"])
    p.add_argument("--pregate-epochs", type=nonneg_int, default=30)
    p.add_argument("--pregate-window", type=positive_int, default=8)
    p.add_argument("--finetune-seconds", type=nonneg_float, default=0.0,
                   help="then fine-tune the experts under the pre-gating router this long")
    p.add_argument("--out", type=_out_folder, required=True, help="folder to write (JSON config + safetensors)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (1 on a shared machine; default: torch's choice)")
    p.set_defaults(func=cmd_extract)

    p = subparsers.add_parser("eval", help="perplexity / passkey / recall of a Read-ME folder")
    p.add_argument("path", help="folder written by `kvkit moe extract`")
    p.add_argument("--router", default=None, choices=ROUTERS)
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--text", default="pydoc:1/2", help="evaluation text (not the calibration)")
    p.add_argument("--chunks", type=positive_int, default=16)
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--passkey", type=nonneg_int, default=0, help="passkey trials (0: skip)")
    p.add_argument("--dense", action="store_true", help="also the dense baseline")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (1 on a shared machine; default: torch's choice)")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("trace", help="record a routing trace (kvkit.moe.trace format)")
    p.add_argument("path", help="folder written by `kvkit moe extract`")
    p.add_argument("--text", default="kvkit", help="text source, as --calib of extract")
    p.add_argument("--requests", type=positive_int, default=4)
    p.add_argument("--tokens", type=positive_int, default=128, help="tokens per request")
    p.add_argument("--router", default=None, choices=ROUTERS)
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--predict-k", type=positive_int, default=None, help="pre-gating predictions per layer")
    p.add_argument("--order", default="interleave", choices=["interleave", "sequential"])
    p.add_argument("--lookahead", type=nonneg_int, default=0, help="tokens ahead predictions are known")
    p.add_argument("--out", type=output_file, required=True, help=".npz path")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (1 on a shared machine; default: torch's choice)")
    p.set_defaults(func=cmd_trace)


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def cmd_extract(args: argparse.Namespace) -> int:
    _threads(args)
    from kvkit.models import load_config, resolve_model
    from kvkit.moe.readme import pipeline
    from kvkit.moe.readme.model import MoEConfig
    from kvkit.moe.readme.train import finetune_experts

    cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, shared_neurons=args.shared,
                    router=args.router, pregate_window=args.pregate_window)
    try:
        base = str(resolve_model(args.model))
        cfg.check(load_config(base).intermediate_size)  # fail before the slow part
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from err
    ks = args.ks or [args.top_k]
    if bad := [k for k in ks if not 1 <= k <= args.experts]:
        raise UsageError(f"--ks values must be in [1, {args.experts}], got {bad}")
    profile = pipeline.calibrate(base, args.calib, args.calib_chunks, args.seq_len)
    moe = pipeline.extract(base, cfg, profile, ks=ks, method=args.partition,
                           pregate_epochs=args.pregate_epochs)
    moe.meta["calibration"] = {"source": args.calib, "chunks": args.calib_chunks,
                               "seq_len": args.seq_len}
    if args.finetune_seconds > 0:
        teacher, _ = pipeline.load_dense(base)
        moe.set_router("pregate")
        info = finetune_experts(moe, teacher, profile.ids, seconds=args.finetune_seconds)
        moe.meta["finetune"] = info
        moe.set_router(args.router)
    out = moe.save(args.out)
    params = moe.active_params()
    print(f"wrote {out}: E={cfg.num_experts} top-{cfg.top_k} shared {cfg.shared_neurons}, "
          f"{cfg.active_fraction(moe.model.config.intermediate_size):.0%} of FFN neurons "
          f"active, {params['total_active'] / 1e6:.1f}M of {params['total_dense'] / 1e6:.1f}M "
          f"parameters active per token")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _threads(args)
    from kvkit.models import load_tokenizer
    from kvkit.moe.readme import calib, evaluate
    from kvkit.moe.readme.model import ReadME
    from kvkit.moe.readme.pipeline import load_dense

    moe = ReadME.load(_moe_folder(args.path))
    moe.set_router(args.router or moe.config.router, args.top_k)
    tok = load_tokenizer(moe.base_model)
    chunks = calib.token_chunks(tok, args.text, args.seq_len, args.chunks)
    result = {"path": args.path, "router": moe.mode, "top_k": moe.top_k,
              "text": args.text, "tokens": int(chunks.numel()),
              "active_params": moe.active_params()}
    result["ppl"] = evaluate.perplexity(moe.model, chunks, progress=True)
    if args.passkey:
        result["passkey"] = f"{evaluate.passkey(moe.model, tok, args.passkey)}/{args.passkey}"
    if args.dense:
        dense, _ = load_dense(moe.base_model)
        result["dense_ppl"] = evaluate.perplexity(dense, chunks, progress=True)
        result["ratio"] = result["ppl"] / result["dense_ppl"]
        if args.passkey:
            result["dense_passkey"] = f"{evaluate.passkey(dense, tok, args.passkey)}/{args.passkey}"
    print(json.dumps(result, indent=2))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    _threads(args)
    from kvkit.models import load_tokenizer
    from kvkit.moe.readme import calib
    from kvkit.moe.readme.model import ReadME
    from kvkit.moe.readme.tracing import record_trace
    from kvkit.moe.trace import save_trace

    moe = ReadME.load(_moe_folder(args.path))
    tok = load_tokenizer(moe.base_model)
    chunks = calib.token_chunks(tok, args.text, args.tokens, args.requests)
    trace = record_trace(moe, list(chunks), router=args.router or moe.config.router,
                         top_k=args.top_k, predict_k=args.predict_k, order=args.order,
                         lookahead=args.lookahead, model_name=f"smollm2-readme-"
                         f"E{moe.config.num_experts}", extra_meta={"text": args.text})
    out = save_trace(args.out, trace)
    print(f"wrote {out}: {trace.num_tokens} tokens x {trace.num_layers} layers x top-"
          f"{trace.top_k} of {trace.num_experts} experts, {args.requests} requests, "
          f"router {trace.meta['router']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m kvkit.moe.readme.cli``), the same as ``kvkit moe ...``."""
    import sys

    from kvkit.cli import main as kvkit_main

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return kvkit_main(["moe", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
