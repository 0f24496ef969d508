"""Time per token against prompt length: the whole-model decode step of dense and of the
selectors, from the bench/hf_decode.py results in bench/results/ (one point per results file
and config; DynamicCache is transformers' own cache, the baseline those runs time against).

It runs no model: run bench/hf_decode.py at more `--context` lengths (with `--out`
bench/results/hf_decode_<dtype>_<n>k) to add points. Needs matplotlib (`pip install 'kvkit[plot]'`).

    python bench/plot_speed.py --dtype bfloat16    # writes bench/results/speed_bfloat16.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

from kvkit.plot import speed  # noqa: E402


def series(dtype: str) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """{config label: [(prompt tokens, median ms per token)]} over hf_decode_<dtype>*.json, and
    the git revisions those files record."""
    lines: dict[str, list[tuple[int, float]]] = {}
    revisions = []
    for path in sorted(RESULTS.glob(f"hf_decode_{dtype}*.json")):
        data = json.loads(path.read_text())
        revisions.append(data["git"])
        for row in data["rows"]:
            name = {"dynamic": "DynamicCache", "dense": "dense (KVKitCache)"}.get(row["config"], row["config"])
            if row["budget"]:
                name += " at 1/8 of the prompt"
            lines.setdefault(name, []).append((data["context_tokens"], row["step_ms_p50"]))
    return lines, revisions


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/speed_<dtype>.png")
    args = ap.parse_args(argv)
    lines, revisions = series(args.dtype)
    if not lines:
        print(f"no bench/results/hf_decode_{args.dtype}*.json; run bench/hf_decode.py first", file=sys.stderr)
        return 1
    out = args.out or RESULTS / f"speed_{args.dtype}.png"
    speed(lines, out, f"SmolLM2-135M in {args.dtype}, whole decode step, 2 CPU cores\n"
                      f"bench/results/hf_decode_{args.dtype}*.md (git {', '.join(sorted(set(revisions)))})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
