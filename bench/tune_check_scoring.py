"""How many decode steps should the tuner's joint check score, and should it score KL or the
text's log-loss? For each budget, passkey weight and window weight, the tuner's allocation
(`choose`) is scored with each check length N (the calibration text's last N positions decoded
after a dense prefill of the rest, `decoded_logprobs`, plus the passkey answers' KL: the score
`check` minimized before it also chose the passkey weight), by the change in log-loss of the
calibration text's own tokens over the longest check, and on the held-out text over its last 512
decode steps (perplexity against dense). Each check length, and the log-loss, picks the allocation
with the least score; the table marks which, and the held-out column says how well it chose.

    python bench/tune_check_scoring.py --ctx 4800 --budgets 0.125 0.25
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402
from tune_frontier import PPL_TEXTS, held_out_text  # noqa: E402

from kvkit import evaluate  # noqa: E402
from kvkit.tools.tune import check_sequences, choose, measure  # noqa: E402
from kvkit.tools.tune_measure import decoded_logprobs, dense_logprobs, joint_loss, kl_sum  # noqa: E402

CHECK_LENGTHS = (128, 512, 1024)


def logloss_change(dense: torch.Tensor, logp: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean change in log-loss (nats) of the tokens of `ids` that the last `N` positions predict
    (`dense`, `logp` `[N, V]`; the last position predicts none here, so N = 1 changes nothing)."""
    target = ids[0, ids.shape[1] - logp.shape[0] + 1:, None]
    return float((dense[:-1].gather(1, target) - logp[:-1].gather(1, target)).sum()) / max(len(target), 1)


def held_out_ratio(dense: torch.Tensor, logp: torch.Tensor, ids: torch.Tensor) -> float:
    """Perplexity ratio to dense over the last `N` tokens of `ids`: `dense` `[N + 1, V]` holds the
    dense log-probabilities at the positions before them, `logp` `[N, V]` those of the last `N`
    positions decoded. The first token is predicted by the prefill's last position, dense in both
    (as `evaluate.perplexity` scores it), so it adds nothing but a count to the mean."""
    n = logp.shape[0]
    return math.exp(logloss_change(dense[1:], logp, ids) * (n - 1) / n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=4800, help="budget length and held-out tokens read")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.125, 0.25])
    ap.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4, 8, 16])
    ap.add_argument("--passkey-weights", type=float, nargs="+", default=[1.0])
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--held-out-tokens", type=int, default=512, help="decode steps scored on the held-out text")
    ap.add_argument("--ppl-text", choices=list(PPL_TEXTS), default="licenses")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="tune_check_scoring")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = evaluate.load(None)
    m = measure(model, tok, calib_tokens=args.calib_tokens)
    checks = {n: check_sequences(m, n) for n in CHECK_LENGTHS}
    passkeys = checks[CHECK_LENGTHS[0]][1:]
    held = tok(held_out_text(args.ppl_text), return_tensors="pt").input_ids[:, -args.ctx:]
    n_held = args.held_out_tokens
    n_long = max(CHECK_LENGTHS)
    d_text, d_held = dense_logprobs(model, [checks[n_long][0], (held, n_held + 1, 1.0)])
    d_checks = {n: [d_text[-n:]] for n in CHECK_LENGTHS}  # dense reads the same whatever is scored
    d_pk = dense_logprobs(model, passkeys)
    records = []
    for budget in args.budgets:
        seen: dict[tuple, dict] = {}
        for pk_weight, weight in [(p, w) for p in args.passkey_weights for w in args.weights]:
            tuned = choose(m, budget, args.ctx, window_weight=weight, passkey_weight=pk_weight)
            key = (tuned.allocation.codec, tuned.allocation.window)
            if key not in seen:
                logps = {n: decoded_logprobs(model, checks[n][0][0], n, tuned.policy) for n in CHECK_LENGTHS}
                seen[key] = {
                    "kl": {n: kl_sum(d_checks[n][0], logps[n]) / n for n in CHECK_LENGTHS},
                    "calib_dlogloss": logloss_change(d_checks[n_long][0], logps[n_long], checks[n_long][0][0]),
                    "passkey": joint_loss(model, passkeys, d_pk, tuned.policy),
                    "held_out_ratio": held_out_ratio(d_held, decoded_logprobs(model, held, n_held, tuned.policy), held),
                    "streaming_heads": sum(w is not None for r in tuned.report["layers"] for w in r["windows"]),
                    "predicted_fraction": tuned.report["predicted_fraction"]}
            records.append({"budget": budget, "passkey_weight": pk_weight, "weight": weight, **seen[key]})
        rows = [r for r in records if r["budget"] == budget]
        for n in CHECK_LENGTHS:
            best = min(rows, key=lambda r: r["kl"][n] + r["passkey"])
            best.setdefault("picked_by", []).append(str(n))
        min(rows, key=lambda r: r["calib_dlogloss"]).setdefault("picked_by", []).append("log-loss")
    table = [[r["budget"], r["passkey_weight"], r["weight"], r["streaming_heads"],
              *(f"{r['kl'][n]:.4f}" for n in CHECK_LENGTHS), f"{r['calib_dlogloss']:+.4f}", f"{r['passkey']:.4f}",
              f"{r['held_out_ratio']:.3f}", ",".join(r.get("picked_by", []))] for r in records]
    write_results(args.name, {"ctx": args.ctx, "calib_tokens": args.calib_tokens, "held_out_tokens": n_held,
                              "ppl_text": args.ppl_text, "measure": m.info, "rows": records},
                  f"joint check length against {n_held} held-out decode steps at {args.ctx} tokens",
                  markdown_table(["budget", "passkey weight", "window weight", "streaming KV heads",
                                  *(f"KL/step, check of {n} calib steps" for n in CHECK_LENGTHS),
                                  f"calib log-loss change/step ({n_long} steps)", "passkey KL",
                                  f"held-out ppl vs dense ({n_held} steps)", "picked by a check of"], table)
                  + f"\n\nHeld-out text: {PPL_TEXTS[args.ppl_text]}. A check of N steps decodes the "
                  "calibration text's last N positions after a dense prefill and picks the least KL/step "
                  "plus passkey KL; weights that give the same allocation share one measurement.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
