"""Does sparse paged decode beat dense decode, and how close to the memory roofline does it run?

One decode step (one query per sequence, all query heads) at several contexts, budgets and
batch sizes. In the same process:
  - dense baseline: the fastest of PyTorch SDPA and a plain matmul-softmax-matmul over
    contiguous K/V `[B, Hkv, L, D]` (FACTS.md: on CPU bf16 SDPA is much slower than the plain
    path, so both are timed and the faster one is the baseline);
  - sparse, reference: `kvkit.attention.ref.sparse_decode_ref` over a paged pool, reading
    `budget` tokens per KV head (pages chosen at random: selection cost is not included);
  - sparse, Triton (CUDA only): `kvkit.kernels.sparse_decode` on the same inputs, plus the same
    kernel reading every page (dense-through-the-kernel); an installed flash-attn is recorded in
    the machine block but not timed yet (to do on the first GPU run).
On CUDA the table gives achieved bandwidth (bytes the kernel must read / time) against the
device's peak. Without CUDA nothing Triton is timed (the interpreter's timings mean nothing);
the table then shows the reference path's measured speedup and, in columns marked
"predicted", the roofline time of the GPU kernel (bytes read / peak bandwidth of --gpu-model),
which is a prediction, not a measurement.

    python bench/kernels.py                      # CPU: small grid, SmolLM2 geometry
    python bench/kernels.py --geometry llama8b --contexts 8192 32768 65536 131072 \
        --budgets 1024 2048 4096 --batches 1 8 32        # GPU: the issue's grid

Shapes: B seqs, Hq/Hkv query/kv heads, L context, K budget tokens, S page_size, D head_dim.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_sha  # noqa: E402


GEOMETRIES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}  # (Hq, Hkv, D)
PEAK_BW = {"H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12,
           "A100-SXM4-80GB": 2.04e12, "A100": 1.56e12, "L4": 3.0e11, "A10": 6.0e11}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def peak_bandwidth(name: str) -> float | None:
    for key, bw in PEAK_BW.items():
        if key in name:
            return bw
    return None


def timeit(fns: dict, device: str, warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median and p90 wall time in ms of each callable, interleaved round by round so that all
    of them see the same load (the CPU machines are shared); synchronised on CUDA."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = (statistics.median(ts), ts[min(len(ts) - 1, int(0.9 * len(ts)))])
    return out


def make_point(B: int, L: int, K: int, geometry: tuple[int, int, int], S: int, dtype: torch.dtype,
               device: str, seed: int = 0) -> dict:
    """Contiguous K/V for the dense baseline and the same tokens in a shuffled page pool."""
    Hq, Hkv, D = geometry
    g = torch.Generator(device=device).manual_seed(seed)
    P = L // S
    k = torch.randn(B, Hkv, L, D, generator=g, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, L, D, generator=g, device=device, dtype=dtype)
    q = torch.randn(B, Hq, D, generator=g, device=device, dtype=dtype)
    perm = torch.randperm(B * Hkv * P, generator=g, device=device)          # page id of (b, h, p)
    k_cache = torch.empty(B * Hkv * P, S, D, device=device, dtype=dtype)
    v_cache = torch.empty_like(k_cache)
    k_cache[perm] = k.reshape(-1, S, D)
    v_cache[perm] = v.reshape(-1, S, D)
    table_all = perm.view(B, Hkv, P)
    keep = torch.rand(B, Hkv, P, generator=g, device=device).argsort(-1)[..., :K // S].sort(-1).values
    table = table_all.gather(-1, keep)                                     # [B, Hkv, K // S]
    valid = torch.ones(B * Hkv * P, S, dtype=torch.bool, device=device)
    return {"q": q, "k": k, "v": v, "k_cache": k_cache, "v_cache": v_cache, "table": table,
            "table_all": table_all, "valid": valid}


def dense_sdpa(pt: dict):
    q = pt["q"][:, :, None]
    return F.scaled_dot_product_attention(q, pt["k"], pt["v"], enable_gqa=True)


def dense_matmul(pt: dict):
    B, Hq, D = pt["q"].shape
    Hkv = pt["k"].shape[1]
    qg = pt["q"].view(B, Hkv, Hq // Hkv, D)                                 # [B, Hkv, G, D]
    s = (qg @ pt["k"].transpose(-1, -2)) * D ** -0.5                       # [B, Hkv, G, L]
    return torch.softmax(s.float(), -1).to(qg.dtype) @ pt["v"]


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    geometry = GEOMETRIES[args.geometry]
    Hq, Hkv, D = geometry
    elem = torch.tensor([], dtype=dtype).element_size()
    from kvkit.attention.ref import sparse_decode_ref
    kernels = None
    if device == "cuda":
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("unset TRITON_INTERPRET to time compiled kernels")
        import kvkit.kernels as kernels
    gpu_name = torch.cuda.get_device_name() if device == "cuda" else None
    peak = peak_bandwidth(gpu_name) if gpu_name else None
    predicted_bw = PEAK_BW[args.gpu_model]
    extras = {}
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401  (recorded only; not timed yet)
            extras["flash_attn"] = flash_attn.__version__
        except ImportError:
            pass
    rows = []
    for L in args.contexts:
        for B in args.batches:
            pt = None
            try:
                pt = make_point(B, L, max(args.budgets), geometry, args.page_size, dtype, device)
            except (RuntimeError, MemoryError) as e:  # out of memory: skip this point, say so
                rows.append({"context": L, "batch": B, "skipped": f"{type(e).__name__}: {str(e)[:80]}"})
                continue
            dense_bytes = 2 * B * Hkv * L * D * elem
            fns = {"sdpa": lambda: dense_sdpa(pt), "matmul": lambda: dense_matmul(pt)}
            if kernels is not None:
                fns["dense_triton"] = lambda: kernels.sparse_decode(pt["q"], pt["k_cache"], pt["v_cache"],
                                                                    pt["table_all"], pt["valid"])
            budgets = [K for K in args.budgets if K <= L]
            tables = {K: pt["table"][..., :K // args.page_size].contiguous() for K in budgets}
            for K in budgets:
                fns[f"ref{K}"] = (lambda t: lambda: sparse_decode_ref(pt["q"], pt["k_cache"], pt["v_cache"], t,
                                                                      pt["valid"]))(tables[K])
                if kernels is not None:
                    fns[f"triton{K}"] = (lambda t: lambda: kernels.sparse_decode(
                        pt["q"], pt["k_cache"], pt["v_cache"], t, pt["valid"]))(tables[K])
            tm = timeit(fns, device, args.warmup, args.repeats)
            sdpa, mm = tm["sdpa"], tm["matmul"]
            dense = min(sdpa, mm)
            base = {"context": L, "batch": B, "dense_sdpa_ms_p50": sdpa[0], "dense_matmul_ms_p50": mm[0],
                    "dense_ms_p50": dense[0], "dense_ms_p90": dense[1], "dense_bytes": dense_bytes,
                    "dense_baseline": "sdpa" if sdpa[0] <= mm[0] else "matmul"}
            if kernels is not None:
                allk = tm["dense_triton"]
                base["dense_triton_ms_p50"] = allk[0]
                base["dense_triton_bw_frac_of_peak"] = dense_bytes / (allk[0] * 1e-3) / peak if peak else None
            for K in budgets:
                sparse_bytes = 2 * B * Hkv * K * D * elem  # K and V of the selected tokens
                ref = tm[f"ref{K}"]
                row = {**base, "budget": K, "sparse_bytes": sparse_bytes, "ref_ms_p50": ref[0],
                       "ref_ms_p90": ref[1], "ref_speedup_vs_dense": dense[0] / ref[0],
                       "predicted_gpu_model": args.gpu_model,
                       "predicted_dense_us": dense_bytes / predicted_bw * 1e6,
                       "predicted_sparse_us": sparse_bytes / predicted_bw * 1e6,
                       "predicted_speedup": dense_bytes / sparse_bytes}
                if kernels is not None:
                    tri = tm[f"triton{K}"]
                    row.update({"triton_ms_p50": tri[0], "triton_ms_p90": tri[1],
                                "triton_speedup_vs_dense": dense[0] / tri[0],
                                "triton_bw_bytes_per_s": sparse_bytes / (tri[0] * 1e-3),
                                "triton_bw_frac_of_peak": sparse_bytes / (tri[0] * 1e-3) / peak if peak else None})
                rows.append(row)
                print(f"  L={L} B={B} K={K}: dense {dense[0]:.3f} ms, ref {ref[0]:.3f} ms"
                      + (f", triton {row['triton_ms_p50']:.3f} ms" if "triton_ms_p50" in row else ""),
                      file=sys.stderr)
            del pt
            if device == "cuda":
                torch.cuda.empty_cache()
    import triton
    return {
        "bench": "kernels",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "git": git_sha(),
        "machine": {"device": gpu_name or "cpu", "cores": os.cpu_count(), "threads": args.threads,
                    "load_avg_1m": os.getloadavg()[0],
                    "platform": platform.platform(), "torch": torch.__version__, "triton": triton.__version__,
                    "peak_bw_bytes_per_s": peak, "extras": extras},
        "geometry": {"num_qo_heads": Hq, "num_kv_heads": Hkv, "head_dim": D, "page_size": args.page_size,
                     "dtype": args.dtype},
        "measured_triton": kernels is not None,
        "note": ("Triton kernel timed on the GPU." if kernels is not None else
                 "No CUDA: only the PyTorch reference path and the dense baseline were measured. "
                 f"predicted_* columns are a roofline prediction for {args.gpu_model} "
                 f"({predicted_bw / 1e12:.2f} TB/s): bytes of K/V read / peak bandwidth, ignoring launch "
                 "overhead (two launches, ~5-10 us each) and the page-table/slot-mask reads (<1% of the "
                 "bytes at D=64 bf16); it is not a measurement."),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    m, geo = result["machine"], result["geometry"]
    head = (f"kernels — {m['device']}, {m['threads']} threads (load {m['load_avg_1m']:.1f}), "
            f"torch {m['torch']}, triton {m['triton']}, "
            f"git {result['git']}; Hq/Hkv/D = {geo['num_qo_heads']}/{geo['num_kv_heads']}/{geo['head_dim']}, "
            f"page {geo['page_size']}, {geo['dtype']}\n\n{result['note']}\n\n")
    if result["measured_triton"]:
        cols = ["context", "batch", "budget", "dense ms p50", "triton ms p50", "vs dense",
                "triton GB/s", "% of peak", "ref ms p50"]
        fmt = lambda r: [r["context"], r["batch"], r["budget"], f"{r['dense_ms_p50']:.3f}",  # noqa: E731
                         f"{r['triton_ms_p50']:.3f}", f"{r['triton_speedup_vs_dense']:.2f}x",
                         f"{r['triton_bw_bytes_per_s'] / 1e9:.0f}",
                         "–" if r["triton_bw_frac_of_peak"] is None else f"{100 * r['triton_bw_frac_of_peak']:.0f}%",
                         f"{r['ref_ms_p50']:.3f}"]
    else:
        cols = ["context", "batch", "budget", "dense ms p50 (measured)", "ref ms p50 (measured)",
                "ref vs dense (measured)", "GPU dense µs (predicted)", "GPU sparse µs (predicted)",
                "GPU speedup (predicted)"]
        fmt = lambda r: [r["context"], r["batch"], r["budget"], f"{r['dense_ms_p50']:.3f}",  # noqa: E731
                         f"{r['ref_ms_p50']:.3f}", f"{r['ref_speedup_vs_dense']:.2f}x",
                         f"{r['predicted_dense_us']:.1f}", f"{r['predicted_sparse_us']:.1f}",
                         f"{r['predicted_speedup']:.1f}x"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['context']} | {r['batch']} | – | skipped: {r['skipped']} |")
        else:
            lines.append("| " + " | ".join(map(str, fmt(r))) + " |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", choices=list(GEOMETRIES), default=None,
                    help="default: llama8b on CUDA, smollm2 on CPU")
    ap.add_argument("--contexts", type=int, nargs="+", default=None)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CPU boxes are shared)")
    ap.add_argument("--gpu-model", choices=list(PEAK_BW), default="H100 SXM",
                    help="the GPU whose peak bandwidth the CPU run's roofline prediction uses")
    ap.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA exists")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu
    args.geometry = args.geometry or ("llama8b" if gpu else "smollm2")
    args.contexts = args.contexts or ([8192, 32768, 65536, 131072] if gpu else [8192, 32768])
    args.batches = args.batches or ([1, 8, 32] if gpu else [1, 4])
    result = run(args)
    tag = "cuda" if gpu else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"kernels_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (args.out / f"kernels_{tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
