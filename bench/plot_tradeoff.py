"""Quality against memory: passkey and perplexity of every policy and budget against the
resident KV bytes it really allocated, as fractions of a tight bf16 copy of the same K and V
(what a bf16 dense store needs), dense a star.

Reads the quality results already in bench/results/ (written by bench/quality.py) and draws
them; it runs no model. Selectors (quest, lserve, tidal) keep every token, so they sit at or
above dense's bytes here: what they save is the bytes each step reads (`kvkit demo --plot`
draws that axis). Needs matplotlib (`pip install 'kvkit[plot]'`).

    python bench/plot_tradeoff.py            # writes bench/results/tradeoff.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

from kvkit.plot import Point, tradeoff  # noqa: E402

SOURCES = ("quality_memory_budgets", "quality_read_codec_budgets", "quality_composition")


def family(spec: str) -> tuple[str, str]:
    """(line the point belongs to, note beside it) of a bench/quality.py policy spec."""
    if spec.endswith(".json"):
        return "compositions", Path(spec).stem
    name, _, params = spec.partition(":")
    if name in ("gear", "cskv", "int8", "kivi"):
        return "codecs", spec
    return name, params.partition("=")[2]


def points(names: list[str]) -> tuple[list[Point], list[str]]:
    """The points of the named results files (dense once), and the files' commands."""
    found: list[Point] = []
    commands = []
    for name in names:
        data = json.loads((RESULTS / f"{name}.json").read_text())
        if "kv_bytes_vs_bf16_dense" not in data["rows"][0]:
            raise SystemExit(f"{name}.json predates bytes against bf16 dense: rerun the command in {name}.md")
        commands.append(data["command"])
        ctx = next(k for k in data["rows"][0] if k.startswith("passkey_"))
        for row in data["rows"]:
            if row["policy"] == "dense" and any(p.policy == "dense" for p in found):
                continue
            hits, samples = map(int, row[ctx].split("/"))
            line, note = ("dense", "") if row["policy"] == "dense" else family(row["policy"])
            found.append(Point(line, row["kv_bytes_vs_bf16_dense"], hits / samples, row["ppl_vs_dense"], note,
                               joined=line not in ("codecs", "compositions")))
    return found, commands


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), help="results stems under bench/results/")
    ap.add_argument("--out", type=Path, default=RESULTS / "tradeoff.png")
    args = ap.parse_args(argv)
    pts, _ = points(args.sources)
    depths = sorted({json.loads((RESULTS / f"{name}.json").read_text())["depths"] for name in args.sources})
    tradeoff(pts, args.out, f"SmolLM2-135M in bf16: passkey at 2.4K tokens x {'/'.join(map(str, depths))} depths, "
                            "perplexity of the "
                            "Apache-2.0 text; budgets in tokens per KV head\n"
                            f"bench/results/{{{','.join(args.sources)}}}.md", xlabel="resident KV vs bf16 dense (log)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
