"""Real offloaded execution: decode wall-clock and expert-load stall per token, on-demand (LRU)
against lookahead prefetch at the same fast-tier size, experts in a memory-mapped safetensors
file; the non-offloaded model from the same run is the baseline and the output reference.

Question: with lookahead prefetch, is the stall per token <= half of on-demand loading?

Models (random weights, no download):
* `mixtral`: a MixtralConfig MoE (hidden 512, 8 experts of 1536, top-2, 8 layers, fp32);
  lookahead = the next layer's router applied to this layer's input.
* `readme`: the Read-ME MoE of kvkit.moe.readme built from the embedded SmolLM2-135M (or
  `--readme-path`, a saved trained one), pre-gating router = exact lookahead for all layers.
  Without a trained folder, the partition is random and the pre-gating router untrained:
  the routing is then arbitrary, but the offloading mechanics and timings are real.

    OMP_NUM_THREADS=2 .venv/bin/python bench/moe_offload.py --tokens 24
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_common import machine_info, write_results  # noqa: E402

from kvkit.moe.offload import OffloadConfig, offload  # noqa: E402


def mixtral(args_router_std: float) -> tuple[torch.nn.Module, str]:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536,
                        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
    model = MixtralForCausalLM(cfg).eval()
    model.set_experts_implementation("eager")
    with torch.no_grad():   # a N(0, 0.02) router sends almost every token to the same experts
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, args_router_std)
    return model, (f"random Mixtral-like: 8 layers, 8 experts x 9.4 MB fp32, top-2, router "
                   f"weights N(0, {args_router_std})")


def readme(path: str | None) -> tuple[torch.nn.Module, str]:
    from kvkit.moe.readme.model import MoEConfig, ReadME

    torch.manual_seed(0)    # untrained routers: the same random weights on every build
    if path:
        moe = ReadME.load(path)
        moe.set_router("pregate")
        return moe, f"Read-ME from {path}"
    from kvkit.models import smollm2
    from kvkit.moe.readme.extract import random_partition
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(smollm2()), dtype=torch.float32).eval()
    cfg = MoEConfig(num_experts=8, top_k=2, router="pregate")
    parts = [random_partition(dense.config.intermediate_size, 8, 0, seed=i)
             for i in range(dense.config.num_hidden_layers)]
    neurons = torch.stack([p[0] for p in parts])
    shared = torch.stack([p[1] for p in parts])
    moe = ReadME(dense, cfg, "smollm2", (neurons, shared))
    return moe, ("Read-ME SmolLM2-135M, 30 layers, 8 experts x 1.3 MB fp32, top-2, random "
                 "partition, untrained pre-gating router (routing arbitrary; timings real)")


@torch.no_grad()
def decode(model: torch.nn.Module, ids: torch.Tensor, stream: torch.Tensor,
           handle=None) -> tuple[torch.Tensor, float]:
    """Prefill `ids`, then decode one token at a time, feeding `stream` [1, n] (teacher forced:
    a random model's greedy output repeats one token, which would route every step alike).
    Returns (next-token logits of every decode step [n, V], decode seconds)."""
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    logits = []
    if handle is not None:
        handle.reset_stats()
    t0 = time.perf_counter()
    for i in range(stream.shape[1]):
        out = model(input_ids=stream[:, i:i + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[0, -1])
    return torch.stack(logits), time.perf_counter() - t0


def run(name: str, build, args: argparse.Namespace, rows: list[dict]) -> str:
    """`build()` returns (model, description), the same weights every call (fixed seeds);
    each offloaded run gets a fresh build instead of a deep copy, to keep memory low."""
    model, desc = build()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (1, args.prompt), generator=gen)
    stream = torch.randint(0, 500, (1, args.tokens), generator=gen)
    lm = model.model if hasattr(model, "pregate") else model     # ReadME wraps the HF model
    decode(lm, ids, stream[:, :3])                                # warm-up
    ref, secs = decode(lm, ids, stream)
    n = args.tokens
    rows.append({"model": name, "policy": "all resident", "capacity": "all",
                 "ms_per_token": round(1e3 * secs / n, 2), "stall_ms_per_token": 0.0,
                 "stall_vs_on_demand": None, "hit_rate": 1.0, "prefetch_acc": None,
                 "identical": True})
    on_demand = None
    del model, lm
    gc.collect()
    for policy in ("lru", "lookahead"):
        work, _ = build()
        wlm = work.model if hasattr(work, "pregate") else work
        handle = offload(wlm, OffloadConfig(capacity=args.capacity, policy=policy,
                                            slow_tier="file"))
        decode(wlm, ids, stream[:, :3])                           # warm the page cache
        got, secs = decode(wlm, ids, stream, handle)
        s = handle.stats()
        handle.close()
        stall = 1e3 * s["stall_s"] / n
        on_demand = stall if policy == "lru" else on_demand
        rows.append({"model": name, "policy": "on-demand (lru)" if policy == "lru" else
                     "lookahead prefetch", "capacity": args.capacity,
                     "ms_per_token": round(1e3 * secs / n, 2),
                     "stall_ms_per_token": round(stall, 3),
                     "stall_vs_on_demand": round(stall / on_demand, 3) if on_demand else None,
                     "hit_rate": round(s["hit_rate"], 3),
                     "prefetch_acc": round(s["prefetch_useful"] / s["prefetch_issued"], 3)
                     if s["prefetch_issued"] else None,
                     "identical": bool(torch.equal(ref, got))})
        del work, wlm, handle
        gc.collect()
    print(f"{name} done: {desc}", flush=True)
    return desc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mixtral,readme")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--capacity", type=int, default=4, help="experts per layer in the fast tier")
    ap.add_argument("--readme-path", default=None)
    ap.add_argument("--router-std", type=float, default=0.2,
                    help="std of the random Mixtral router weights (routing diversity)")
    args = ap.parse_args()
    start = time.time()
    rows: list[dict] = []
    descs = {}
    for name in args.models.split(","):
        if name == "mixtral":
            descs[name] = run(name, lambda: mixtral(args.router_std), args, rows)
        else:
            descs[name] = run(name, lambda: readme(args.readme_path), args, rows)
    command = "OMP_NUM_THREADS=%s .venv/bin/python %s" % (torch.get_num_threads(),
                                                          " ".join(sys.argv))
    result = {"bench": "moe_offload", "command": command, "machine": machine_info(),
              "seconds": round(time.time() - start, 1), "models": descs,
              "slow_tier": "memory-mapped safetensors file (page cache warm)", "rows": rows}
    title = (f"offloaded MoE decode, {args.tokens} teacher-forced decode steps after a "
             f"{args.prompt}-token prompt, identical = bitwise equal logits, "
             f"{args.capacity} experts/layer in the fast tier, real wall-clock")
    write_results("moe_offload", result, rows, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
