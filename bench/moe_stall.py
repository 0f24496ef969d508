"""Offloaded scheduler, measured against modelled: stall and time per token on this machine.

Question: when `kvkit.moe.offload(policy="sched")` runs on a profile measured on this machine
(`measure_local_profile()`), how far are its measured stall and time per token from what
`schedule_trace` predicts for the same decisions on the same profile? Each row is one real run
(`kvkit.moe.stall.measure_vs_model`: teacher-forced decode one token at a time, experts in a
memory-mapped safetensors file, decisions checked equal to the simulator's) and its simulation;
fields are medians over `--repeats` fresh runs.

Models (random weights, no download): Read-ME SmolLM2-135M (`bench/moe_offload.py`'s build:
8 experts, top-2, random partition, untrained pre-gating router) and the tiny Mixtral, Qwen2-MoE,
OLMoE and Read-ME models of the decision-sequence test (tests/moe/conftest.py). Fast tier: a
quarter of the experts per layer. Configurations: LRU with on-demand loads, loads only with
background transfers and hints, and the default `SchedConfig` (misses split between loads and
slow-tier compute, background transfers, hints).

    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_stall.py
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_common import ROOT, machine_info, markdown_table, write_results  # noqa: E402

from kvkit.moe.sched import SchedConfig  # noqa: E402
from kvkit.moe.sim import measure_local_profile  # noqa: E402
from kvkit.moe.stall import measure_vs_model  # noqa: E402

TINY = ("mixtral", "qwen2_moe", "olmoe", "readme")


def tiny_builders() -> dict[str, Callable]:
    """The decision-sequence test's tiny models (tests/moe/conftest.py's `moe_builders`)."""
    spec = importlib.util.spec_from_file_location("moe_conftest",
                                                  ROOT / "tests" / "moe" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {"mixtral": mod._mixtral, "qwen2_moe": mod._qwen2_moe, "olmoe": mod._olmoe,
            "readme": mod._tiny_readme}


def configs(cap: int) -> list[tuple[str, SchedConfig]]:
    return [("lru (on-demand loads)", SchedConfig(cap, miss="load", keep="lru",
                                                  background=False, hints=False)),
            ("loads + background + hints", SchedConfig(cap, miss="load")),
            ("sched default (auto misses)", SchedConfig(cap))]


def build(name: str, tiny: dict[str, Callable]) -> tuple[torch.nn.Module, Any]:
    """(the module to offload and decode, the Read-ME wrapper or None)."""
    if name == "readme-smollm2":
        import moe_offload

        moe, _ = moe_offload.readme(None)
        return moe.model, moe
    torch.manual_seed(0)
    m = tiny[name]()
    if name == "readme":
        return m.model, m
    m.eval().set_experts_implementation("eager")
    return m, None


def one_row(name: str, label: str, cfg: SchedConfig, args: argparse.Namespace, profile,
            tiny: dict[str, Callable], ids: torch.Tensor) -> dict[str, Any]:
    runs = []
    for _ in range(args.repeats):
        model, moe = build(name, tiny)
        trace, top_k = None, None
        if moe is not None:     # pre-gating hints come a token ahead: record the trace
            from kvkit.moe.readme.tracing import record_trace

            trace = record_trace(moe, [ids[0]], router="pregate", predict_k=moe.config.top_k,
                                 model_name=name, expert_dtype_bytes=4)
            top_k = moe.config.top_k
        else:
            top_k = model.config.num_experts_per_tok
        runs.append(measure_vs_model(model, ids, cfg, profile, top_k, trace, args.warmup))
        del model, moe
        gc.collect()
    row: dict[str, Any] = {"model": name, "config": label}
    for k, v in runs[0].items():     # numbers: the median over the runs
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [r[k] for r in runs if r[k] is not None]
            row[k] = round(float(np.median(vals)), 4) if vals else None
        elif k != "decisions_equal":
            row[k] = v
    row["ms_per_token_range"] = [round(min(r["ms_per_token"] for r in runs), 3),
                                 round(max(r["ms_per_token"] for r in runs), 3)]
    row["decisions_equal"] = all(r["decisions_equal"] for r in runs)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="readme-smollm2," + ",".join(TINY))
    ap.add_argument("--tokens", type=int, default=40, help="decode steps per tiny-model run")
    ap.add_argument("--smollm2-tokens", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=4, help="tokens not counted at the start")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="moe_stall")
    args = ap.parse_args(argv)
    start = time.time()
    load_before = os.getloadavg()
    profile = measure_local_profile(repeats=21)
    tiny = tiny_builders()
    rows = []
    for name in args.models.split(","):
        big = name == "readme-smollm2"
        n = args.smollm2_tokens if big else args.tokens
        ids = torch.randint(0, 500 if big else 96, (1, n),
                            generator=torch.Generator().manual_seed(0))
        if big:
            import moe_offload

            experts = moe_offload.readme(None)[0].config.num_experts
        else:
            model, moe = build(name, tiny)
            experts = moe.config.num_experts if moe is not None else \
                getattr(model.config, "num_local_experts", None) or model.config.num_experts
        cap = max(1, experts // 4)
        for label, cfg in configs(cap):
            rows.append(one_row(name, label, cfg, args, profile, tiny, ids))
            print(f"{name} / {label} done ({time.time() - start:.0f}s)", flush=True)
    cols = ("model", "config", "capacity", "tokens", "ms_per_token", "ms_per_token_range",
            "model_ms_per_token",
            "time_ratio", "expert_path_ms", "expert_path_ratio", "stall_ms", "model_stall_ms",
            "stall_ratio", "fast_ms", "slow_ms", "plan_ms", "other_ms", "model_compute_ms",
            "decisions_equal")
    table = [{c: r[c] for c in cols} for r in rows]
    command = "OMP_NUM_THREADS=%d .venv/bin/python %s" % (
        torch.get_num_threads(), " ".join(["bench/moe_stall.py", *sys.argv[1:]]))
    result = {"bench": "moe_stall", "command": command, "machine": machine_info(),
              "seconds": round(time.time() - start, 1), "profile": profile.__dict__,
              "load_average_1_5_15min": {"start": [round(x, 2) for x in load_before],
                                         "end": [round(x, 2) for x in os.getloadavg()]},
              "rows": rows}
    notes = ("\nMeasured: `ms_per_token` is the wall-clock of each decode forward; `stall_ms` the "
             "compute thread waiting on expert transfers (demand copies out of the mmap, "
             "in-flight background copies); `fast_ms` / `slow_ms` expert compute from the "
             "fast-tier slots / from the slow tier's weights (`cpu` misses); `plan_ms` the "
             "scheduler's own decisions; `other_ms` the rest of the forward (attention, "
             "routers, bookkeeping); `expert_path_ms` = stall + fast + slow. Modelled "
             "(`model_*`): `schedule_trace` on the same decisions and the measured profile "
             f"(link {profile.link_bytes_per_s / 1e9:.2f} GB/s + "
             f"{1e6 * profile.link_latency_s:.2f} us, {profile.fast_flops / 1e9:.1f} GFLOP/s, "
             f"memory {profile.fast_mem_bytes_per_s / 1e9:.2f} GB/s); it has no non-expert "
             "work, so `time_ratio` = measured total / modelled and `expert_path_ratio` = "
             "measured expert path / modelled. Ratios > 1: the model is optimistic. Medians of "
             f"{args.repeats} fresh runs (`ms_per_token_range`: min and max), {args.warmup} "
             f"warm-up tokens not counted; load average (1 min) {load_before[0]:.2f} at the "
             f"start and {os.getloadavg()[0]:.2f} at the end. See "
             "bench/results/NOTES.md for what the ratios say on a CPU.\n")
    write_results(args.out, result, table,
                  "offloaded scheduler on this CPU: measured vs modelled (same decisions, "
                  "measured profile)", notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
