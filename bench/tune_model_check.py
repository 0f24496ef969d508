"""Does the tuner's model of decoding match decoding? For each tuned policy of a tune_frontier
result, on the held-out text, and for each part of it (the whole policy, its codecs alone, its
windows alone): the KL from dense per scored token as `tune_measure.joint_loss` computes it (one
forward, every layer compressed at once) against teacher-forced decoding through `KVKitCache`,
with the change in log-loss of the text's own tokens there.

    python bench/tune_model_check.py bench/results/tune_frontier_4800_joint.json --ctx 4800 --scored 128
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402
from tune_check_scoring import logloss_change  # noqa: E402
from tune_frontier import PPL_TEXTS, held_out_text  # noqa: E402

from kvkit import evaluate  # noqa: E402
from kvkit.integrations.hf import KVKitCache  # noqa: E402
from kvkit.policies import Policy  # noqa: E402
from kvkit.policies.codecs.plain import PlainCodec  # noqa: E402
from kvkit.tools.tune_measure import dense_logprobs, joint_loss, kl_sum  # noqa: E402


def parts(policy: Policy) -> dict[str, Policy]:
    """The policy, its codec rules alone (every head keeps every token) and its eviction rules
    alone (bf16 pages), as the tuner writes them: each rule sets a codec or an evictor."""
    codecs = tuple(r for r in policy.rules if r.evictor is None)
    evictions = tuple(r for r in policy.rules if r.evictor is not None)
    return {"policy": policy, "codecs alone": replace(policy, rules=codecs),
            "windows alone": replace(policy, codec=PlainCodec("bf16"), rules=evictions)}


@torch.inference_mode()
def decoded(model: Any, policy: Policy, ids: torch.Tensor, scored: int) -> torch.Tensor:
    """Log-probabilities `[scored, V]` of the last `scored` positions of `ids`, each a decode step
    through a `KVKitCache` of `policy` after a prefill of the rest."""
    cache = KVKitCache(model, policy)
    T = ids.shape[1]
    model(ids[:, :T - scored], past_key_values=cache, use_cache=True)
    logits = [model(ids[:, p:p + 1], past_key_values=cache, use_cache=True).logits[0, -1] for p in range(T - scored, T)]
    return torch.stack(logits).float().log_softmax(-1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("frontier", help="a tune_frontier result JSON (its tuned rows are checked)")
    ap.add_argument("--ctx", type=int, default=4800, help="tokens of the held-out text read")
    ap.add_argument("--scored", type=int, default=128, help="decode steps scored at the end")
    ap.add_argument("--ppl-text", choices=list(PPL_TEXTS), default="licenses")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="tune_model_check")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = evaluate.load(None)
    ids = tok(held_out_text(args.ppl_text), return_tensors="pt").input_ids[:, -args.ctx:]
    seqs = [(ids, args.scored, 1.0 / args.scored)]
    dense = dense_logprobs(model, seqs)
    rows, records = [], []
    for row in json.loads(Path(args.frontier).read_text())["rows"]:
        if row.get("method") != "tuned" or "policy" not in row:
            continue
        for name, part in parts(Policy.from_config(row["policy"])).items():
            model_kl = joint_loss(model, seqs, dense, part)
            logp = decoded(model, part, ids, args.scored)
            real_kl = kl_sum(dense[0], logp) / args.scored
            dnll = logloss_change(dense[0], logp, ids)
            records.append({"budget": row["budget"], "part": name, "model_kl": model_kl, "decoded_kl": real_kl,
                            "decoded_dnll": dnll})
            rows.append([row["budget"], name, f"{model_kl:.4f}", f"{real_kl:.4f}", f"{dnll:+.4f}"])
            write_results(args.name, {"frontier": args.frontier, "ctx": args.ctx, "scored": args.scored,
                                      "ppl_text": args.ppl_text, "rows": records},
                          f"tuner's decode model against KVKitCache ({args.scored} decode steps at {args.ctx} tokens)",
                          markdown_table(["budget", "part", "KL/token, tuner's model", "KL/token, KVKitCache",
                                          "log-loss change/token (KVKitCache)"], rows)
                          + f"\n\nText: {PPL_TEXTS[args.ppl_text]} (held out from tuning). KL in nats per scored "
                          "token against dense; 'alone': only that part of the policy applied.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
