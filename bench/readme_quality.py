"""Read-ME on SmolLM2: perplexity (and passkey) of dense vs MoE with oracle / per-layer /
pre-gating routing over E and top-k, routing recall of the routers vs the oracle, and light
fine-tuning of the experts under the pre-gating router.

python bench/readme_quality.py                    # the quoted run (see bench/results/readme_*)
python bench/readme_quality.py --quick            # a 2-minute smoke run

Calibration and evaluation use disjoint text: by default the even-indexed vim help files
calibrate and the odd-indexed ones evaluate (same genre, different files); the Debian license
texts are a second, out-of-domain evaluation set.
Writes JSON and a markdown table (paths from --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_sha, machine_info  # noqa: E402


PARTIAL: list[Path] = []


def emit(row: dict) -> None:
    """Print a measured row and append it to <out>.partial.jsonl, so a cut-short run keeps it."""
    print(row, flush=True)
    if PARTIAL:
        with PARTIAL[0].open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF folder (default: embedded SmolLM2)")
    ap.add_argument("--calib", default="vim:0/2")
    ap.add_argument("--eval", dest="evals", default="vim:1/2,licenses")
    ap.add_argument("--calib-chunks", type=int, default=96)
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--experts", default="8,32")
    ap.add_argument("--fractions", default="0.25,0.5,0.75",
                    help="shares of the experts active (top-k = fraction * E)")
    ap.add_argument("--routers", default="oracle,layer,pregate")
    ap.add_argument("--pregate-epochs", type=int, default=30)
    ap.add_argument("--random-baseline", action="store_true",
                    help="also a random partition with oracle routing")
    ap.add_argument("--finetune", default="32:24", help="E:k to fine-tune ('' for none)")
    ap.add_argument("--finetune-seconds", type=float, default=600)
    ap.add_argument("--passkey-trials", type=int, default=0)
    ap.add_argument("--save-dir", default=None, help="save each MoE folder under this path")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--finetune-from", default=None,
                    help="skip extraction: load this saved MoE folder, fine-tune it under the "
                    "pre-gating router at --finetune's k, evaluate before and after")
    ap.add_argument("--finetune-before", action="store_true",
                    help="with --finetune-from, also evaluate before fine-tuning")
    ap.add_argument("--finetune-seq-len", type=int, default=128)
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench/results/readme_quality")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib_chunks, args.eval_chunks, args.seq_len = 8, 2, 128
        args.experts, args.fractions, args.pregate_epochs = "8", "0.75", 2
        args.finetune_seconds = 20
        args.finetune = "8:6"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    PARTIAL[:] = [Path(args.out).with_suffix(".partial.jsonl")]
    PARTIAL[0].parent.mkdir(parents=True, exist_ok=True)
    PARTIAL[0].write_text("")

    from kvkit.models import smollm2
    from kvkit.moe.readme import calib, evaluate, pipeline
    from kvkit.moe.readme.model import MoEConfig
    from kvkit.moe.readme.train import expert_mass, finetune_experts

    base = args.model or str(smollm2())
    t_start = time.monotonic()
    dense, tok = pipeline.load_dense(base)
    evals = {name: calib.token_chunks(tok, name, args.seq_len, args.eval_chunks)
             for name in args.evals.split(",")}
    primary = next(iter(evals))
    rows: list[dict] = []
    dense_ppl = {n: evaluate.perplexity(dense, c, progress=True, desc=f"dense ppl {n}")
                 for n, c in evals.items()}
    row = {"model": "dense", "experts": None, "top_k": None, "active": 1.0, "router": "-"}
    row.update({f"ppl_{n}": v for n, v in dense_ppl.items()})
    if args.passkey_trials:
        row["passkey"] = evaluate.passkey(dense, tok, args.passkey_trials)
    rows.append(row)
    emit(row)

    if args.finetune_from:
        return finetune_only(args, argv, base, tok, evals, dense_ppl, rows, t_start)

    chunks = calib.token_chunks(tok, args.calib, args.seq_len, args.calib_chunks)
    t0 = time.monotonic()
    profile = calib.profile_dense(dense, chunks)
    eval_profile = calib.profile_dense(dense, evals[primary][: max(2, args.eval_chunks // 2)])
    profile_s = time.monotonic() - t0
    del dense

    ft_e, ft_k = (int(v) for v in args.finetune.split(":")) if args.finetune else (0, 0)
    routing: list[dict] = []
    finetune_info = None
    for num_experts in (int(e) for e in args.experts.split(",")):
        ks = sorted({max(1, round(f * num_experts)) for f in map(float, args.fractions.split(","))})
        if num_experts == ft_e and ft_k not in ks:
            ks.append(ft_k)
        cfg = MoEConfig(num_experts=num_experts, top_k=max(ks))
        t0 = time.monotonic()
        moe = pipeline.extract(base, cfg, profile, ks=ks, pregate_epochs=args.pregate_epochs)
        extract_s = time.monotonic() - t0
        neurons = torch.stack([m.neurons for m in moe.mlps])
        ev_mass = expert_mass(eval_profile.mass, neurons)
        for k in ks:
            for router in args.routers.split(","):
                moe.set_router(router, k)
                row = {"model": "moe", "experts": num_experts, "top_k": k,
                       "active": round(k / num_experts, 4), "router": router,
                       "active_params": moe.active_params()["total_active"]}
                for n, c in evals.items():
                    row[f"ppl_{n}"] = evaluate.perplexity(moe.model, c, desc=f"E{num_experts} "
                                                          f"k{k} {router} {n}", progress=True)
                    row[f"ratio_{n}"] = row[f"ppl_{n}"] / dense_ppl[n]
                if router in ("layer", "pregate"):
                    rec = evaluate.routing_recall(moe, eval_profile.ids, ev_mass, k, router,
                                                  x=eval_profile.x)
                    row["recall_mean"] = sum(rec) / len(rec)
                    routing.append({"experts": num_experts, "top_k": k, "router": router,
                                    "recall_per_layer": [round(r, 4) for r in rec]})
                if args.passkey_trials and k == ft_k and num_experts == ft_e:
                    row["passkey"] = evaluate.passkey(moe.model, tok, args.passkey_trials)
                rows.append(row)
                emit(row)
        row_meta = {"experts": num_experts, "extract_seconds": round(extract_s, 1),
                    **moe.meta}
        routing.append({"experts": num_experts, "meta": row_meta})
        if args.save_dir:
            moe.save(Path(args.save_dir) / f"smollm2-E{num_experts}")
        if args.random_baseline:
            rnd = pipeline.extract(base, cfg, profile, method="random", train_routers=False,
                                   progress=False)
            for k in ks:
                rnd.set_router("oracle", k)
                row = {"model": "moe-random-partition", "experts": num_experts, "top_k": k,
                       "active": round(k / num_experts, 4), "router": "oracle"}
                for n, c in evals.items():
                    row[f"ppl_{n}"] = evaluate.perplexity(rnd.model, c)
                    row[f"ratio_{n}"] = row[f"ppl_{n}"] / dense_ppl[n]
                rows.append(row)
                emit(row)
            del rnd
        if num_experts == ft_e and args.finetune_seconds > 0:
            teacher, _ = pipeline.load_dense(base)
            moe.set_router("pregate", ft_k)
            ft_chunks = profile.ids
            finetune_info = finetune_experts(moe, teacher, ft_chunks,
                                             seconds=args.finetune_seconds)
            finetune_info.update({"experts": num_experts, "top_k": ft_k, "router": "pregate",
                                  "trained": "expert weights (gate/up/down slices)",
                                  "loss": "KL(dense || moe) on the calibration chunks"})
            del teacher
            for router in ("pregate", "layer", "oracle"):
                moe.set_router(router, ft_k)
                row = {"model": "moe+finetune", "experts": num_experts, "top_k": ft_k,
                       "active": round(ft_k / num_experts, 4), "router": router}
                for n, c in evals.items():
                    row[f"ppl_{n}"] = evaluate.perplexity(moe.model, c)
                    row[f"ratio_{n}"] = row[f"ppl_{n}"] / dense_ppl[n]
                if args.passkey_trials and router == "pregate":
                    row["passkey"] = evaluate.passkey(moe.model, tok, args.passkey_trials)
                rows.append(row)
                emit(row)
            if args.save_dir:
                moe.set_router("pregate", ft_k)
                moe.save(Path(args.save_dir) / f"smollm2-E{num_experts}-k{ft_k}-finetuned")
        del moe

    result = {"bench": "readme_quality", "command": "python " + " ".join(
        [sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "git": git_sha(), "machine": machine_info(), "model": base,
        "calibration": {"source": args.calib, "chunks": args.calib_chunks,
                        "seq_len": args.seq_len, "tokens": int(chunks.numel()),
                        "profile_seconds": round(profile_s, 1)},
        "evaluation": {n: {"chunks": int(c.shape[0]), "seq_len": args.seq_len,
                           "tokens": int(c.numel())} for n, c in evals.items()},
        "rows": rows, "routing": routing, "finetune": finetune_info,
        "wall_seconds": round(time.monotonic() - t_start, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result, list(evals))
    out.with_suffix(".md").write_text(md)
    PARTIAL[0].unlink(missing_ok=True)
    print(md)
    return 0


def finetune_only(args, argv, base, tok, evals, dense_ppl, rows, t_start) -> int:
    """Load a saved MoE, evaluate it under the pre-gating router, fine-tune, evaluate again."""
    from kvkit.moe.readme import calib, evaluate, pipeline
    from kvkit.moe.readme.model import ReadME
    from kvkit.moe.readme.train import finetune_experts

    moe = ReadME.load(args.finetune_from)
    k = int(args.finetune.split(":")[1])
    e = moe.config.num_experts

    def measure(label: str) -> None:
        for router in args.routers.split(","):
            moe.set_router(router, k)
            row = {"model": label, "experts": e, "top_k": k, "active": round(k / e, 4),
                   "router": router}
            for n, c in evals.items():
                row[f"ppl_{n}"] = evaluate.perplexity(moe.model, c, progress=True,
                                                      desc=f"{label} {router} {n}")
                row[f"ratio_{n}"] = row[f"ppl_{n}"] / dense_ppl[n]
            if args.passkey_trials and router == "pregate":
                row["passkey"] = evaluate.passkey(moe.model, tok, args.passkey_trials)
            rows.append(row)
            emit(row)

    if args.finetune_before:
        measure("moe")
    chunks = calib.token_chunks(tok, args.calib, args.finetune_seq_len, args.calib_chunks)
    teacher, _ = pipeline.load_dense(base)
    moe.set_router("pregate", k)
    info = finetune_experts(moe, teacher, chunks, seconds=args.finetune_seconds,
                            lr=args.finetune_lr)
    info.update({"experts": e, "top_k": k, "router": "pregate", "lr": args.finetune_lr,
                 "trained": "expert weights (gate/up/down slices)",
                 "loss": f"KL(dense || moe) on {chunks.shape[0]} calibration chunks of "
                         f"{chunks.shape[1]} tokens ({args.calib})"})
    del teacher
    measure("moe+finetune")
    if args.save_dir:
        moe.set_router("pregate", k)
        moe.save(Path(args.save_dir) / f"smollm2-E{e}-k{k}-finetuned")
    result = {"bench": "readme_finetune", "command": "python " + " ".join(
        [sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "git": git_sha(), "machine": machine_info(), "model": base, "moe": args.finetune_from,
        "calibration": {"source": args.calib, "tokens": int(chunks.numel())},
        "evaluation": {n: {"chunks": int(c.shape[0]), "seq_len": args.seq_len,
                           "tokens": int(c.numel())} for n, c in evals.items()},
        "rows": rows, "finetune": info, "wall_seconds": round(time.monotonic() - t_start, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result, list(evals))
    out.with_suffix(".md").write_text(md)
    PARTIAL[0].unlink(missing_ok=True)
    print(md)
    return 0


def markdown(result: dict, evals: list[str]) -> str:
    m = result["machine"]
    head = (f"{result['bench']} on SmolLM2 — {m['device']}, {m['cores']} cores "
            f"({m['threads']} thread), torch {m['torch']}, git {result['git']}\n\n"
            f"`{result['command']}`\n\n"
            f"calibration: {result['calibration']['source']} "
            f"({result['calibration']['tokens']} tokens); evaluation: "
            + ", ".join(f"{n} ({v['tokens']} tokens)" for n, v in result["evaluation"].items())
            + "\n\n")
    cols = ["model", "E", "top-k", "FFN active", "router"]
    for n in evals:
        cols += [f"ppl {n}", "vs dense"]
    cols += ["recall vs oracle", "passkey"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in result["rows"]:
        cells = [r["model"], str(r["experts"] or "–"), str(r["top_k"] or "–"),
                 f"{r['active']:.0%}", r["router"]]
        for n in evals:
            cells += [f"{r[f'ppl_{n}']:.2f}", f"{r.get(f'ratio_{n}', 1.0):.2f}x"]
        cells += [f"{r['recall_mean']:.3f}" if "recall_mean" in r else "–",
                  str(r.get("passkey", "–"))]
        lines.append("| " + " | ".join(cells) + " |")
    ft = result.get("finetune")
    tail = ""
    if ft:
        tail = (f"\nfine-tune: E={ft['experts']} top-{ft['top_k']}, {ft['trained']}, "
                f"{ft['loss']}, lr {ft.get('lr', 5e-5)}, {ft['steps']} steps / {ft['tokens']} "
                f"tokens in "
                f"{ft['seconds']:.0f} s (KL {ft['loss_first']:.3f} -> {ft['loss_last']:.3f})\n")
    return head + "\n".join(lines) + "\n" + tail


if __name__ == "__main__":
    sys.exit(main())
