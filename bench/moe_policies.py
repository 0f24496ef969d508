"""Expert-cache policies on a DeepSeek-V2-Lite-like synthetic trace: hit rate, gap to Belady,
bytes moved and modelled stall, with LRU and Belady from the same run.

Question: does `lookahead` close half of the LRU->Belady gap at 16 of 64 experts, and move
>= 1.5x fewer bytes than LRU at a cache of 2x the active experts (12 of 64)?
Numbers are reported only if the trace passes the calibration check (+-3 points).

    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_policies.py --tokens 1500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_common import machine_info, write_results  # noqa: E402

from kvkit.moe.cache import CacheConfig, make_policy, replay  # noqa: E402
from kvkit.moe.miss import MissHandler  # noqa: E402
from kvkit.moe.sim import PROFILES, measure_local_profile, simulate  # noqa: E402
from kvkit.moe.synth import (check_calibration, cooccurrence_predictions, generate,  # noqa: E402
                             noisy_oracle_predictions, preset)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--capacities", default="8,12,16,32")
    ap.add_argument("--profile", default="a100-pcie4")
    ap.add_argument("--prefetch-budget", type=int, default=8)
    ap.add_argument("--profile-capacity", type=int, default=12,
                    help="capacity of the per-hardware-profile comparison")
    args = ap.parse_args()
    start = time.time()
    trace = generate(preset("deepseek-v2-lite"), args.tokens, seed=args.seed,
                     num_layers=args.layers)
    check = check_calibration(trace)
    if not check["ok"]:
        print(f"calibration check failed ({check['max_abs_error']:.3f} > 0.03): no numbers")
        return 1
    profile = PROFILES[args.profile]
    cooc, recall = cooccurrence_predictions(trace, 1)
    pregate = noisy_oracle_predictions(trace, 1.0, lookahead=1, unit="tokens")
    variants = [
        ("lru", trace, make_policy("lru"), None),
        ("lfu", trace, make_policy("lfu"), None),
        ("score", trace, make_policy("score"), None),
        ("lookahead cooc-1layer", cooc, make_policy("lookahead",
                                                    prefetch_budget=args.prefetch_budget), None),
        ("lookahead pregate-1token", pregate,
         make_policy("lookahead", prefetch_budget=args.prefetch_budget), None),
        ("lookahead pregate-1token, no prefetch", pregate,
         make_policy("lookahead", prefetch_budget=0), None),
        ("lookahead pregate-1token + miss auto", pregate,
         make_policy("lookahead", prefetch_budget=args.prefetch_budget),
         MissHandler(profile, mode="auto", lowbit_min_rank=99)),
        ("lookahead pregate-1token + miss auto/int4", pregate,
         make_policy("lookahead", prefetch_budget=args.prefetch_budget),
         MissHandler(profile, mode="auto", lowbit_min_rank=2)),
        ("belady", trace, make_policy("belady"), None),
    ]
    rows = []
    for cap in [int(c) for c in args.capacities.split(",")]:
        cfg = CacheConfig(cap, warmup_tokens=args.tokens // 10)
        out = {}
        for name, tr, pol, miss in variants:
            res = replay(tr, pol, cfg, miss_handler=miss, record=True)
            out[name] = (res, simulate(tr, res, profile, warmup_tokens=cfg.warmup_tokens))
        lru, lru_sim = out["lru"]
        bel = out["belady"][0].hit_rate
        for name, (res, sim) in out.items():
            gap = bel - lru.hit_rate
            rows.append({"capacity": cap, "policy": name, "hit_rate": round(res.hit_rate, 4),
                         "prefetch_hit_rate": round(res.prefetch_hit_rate, 4),
                         "gap_closed": round((res.hit_rate - lru.hit_rate) / gap, 3),
                         "bytes_per_token_MB": round(res.bytes_per_token / 1e6, 1),
                         "bytes_vs_lru": round(lru.bytes_moved / max(res.bytes_moved, 1), 3),
                         "prefetch_acc": round(res.prefetch_accuracy, 3),
                         "miss_load/int4/cpu": "/".join(str(res.miss_how[k])
                                                         for k in ("load", "lowbit", "cpu")),
                         "stall_ms_per_token": round(1e3 * sim.stall_per_token, 2),
                         "speedup_vs_lru": round(lru_sim.seconds / sim.seconds, 3)})
        print(f"capacity {cap} done ({time.time() - start:.0f}s)", flush=True)
    # the per-miss choice depends on the hardware: same trace, every profile, one capacity
    profiles = {**PROFILES, "local": measure_local_profile()}
    cfg = CacheConfig(args.profile_capacity, warmup_tokens=args.tokens // 10)
    lru = replay(trace, "lru", cfg, record=True)
    for pname, prof in profiles.items():
        lru_sim = simulate(trace, lru, prof, warmup_tokens=cfg.warmup_tokens)
        for name, miss in [("lru", None), ("lookahead pregate-1token", None),
                           ("lookahead pregate-1token + miss auto/int4",
                            MissHandler(prof, mode="auto", lowbit_min_rank=2))]:
            tr = trace if name == "lru" else pregate
            res = lru if name == "lru" else replay(
                tr, make_policy("lookahead", prefetch_budget=args.prefetch_budget), cfg,
                miss_handler=miss, record=True)
            sim = simulate(tr, res, prof, warmup_tokens=cfg.warmup_tokens)
            rows.append({"capacity": args.profile_capacity, "policy": f"[{pname}] {name}",
                         "hit_rate": round(res.hit_rate, 4),
                         "prefetch_hit_rate": round(res.prefetch_hit_rate, 4), "gap_closed": None,
                         "bytes_per_token_MB": round(res.bytes_per_token / 1e6, 1),
                         "bytes_vs_lru": round(lru.bytes_moved / max(res.bytes_moved, 1), 3),
                         "prefetch_acc": round(res.prefetch_accuracy, 3),
                         "miss_load/int4/cpu": "/".join(str(res.miss_how[k])
                                                         for k in ("load", "lowbit", "cpu")),
                         "stall_ms_per_token": round(1e3 * sim.stall_per_token, 2),
                         "speedup_vs_lru": round(lru_sim.seconds / sim.seconds, 3)})
    result_profiles = {k: v.__dict__ for k, v in profiles.items()}
    command = "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(sys.argv)
    result = {"bench": "moe_policies", "command": command, "machine": machine_info(),
              "seconds": round(time.time() - start, 1), "profile": profile.__dict__,
              "profiles": result_profiles,
              "trace": {"preset": "deepseek-v2-lite", "tokens": args.tokens,
                        "layers": args.layers, "seed": args.seed},
              "calibration": {"max_abs_error": round(check["max_abs_error"], 4),
                              "curves": check["curves"]},
              "cooccurrence_recall_1layer": recall[1], "rows": rows}
    title = (f"expert cache policies, synthetic DeepSeek-V2-Lite-like trace ({args.tokens} "
             f"tokens x {args.layers} layers, 64 experts top-6, calibration error "
             f"{check['max_abs_error']:.3f}); stall on {profile.name} (modelled)")
    write_results("moe_policies", result, rows, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
