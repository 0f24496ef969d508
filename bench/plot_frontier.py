"""Draw `bench/results/<name>.json` (written by bench/tune_frontier.py): perplexity change against
the KV bytes really allocated (fraction of a bf16 dense store), one line per method, passkey
score beside each point. Runs no model. Needs matplotlib (`pip install 'kvkit[plot]'`).

    python bench/plot_frontier.py            # writes bench/results/tune_frontier.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="tune_frontier")
    args = ap.parse_args(argv)
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads((RESULTS / f"{args.name}.json").read_text())
    rows = [r for r in doc["rows"] if "perplexity" in r]
    dense = next(r for r in rows if r["method"] == "dense")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, marker in (("tuned", "o"), ("single", "s"), ("composition", "^")):
        pts = sorted((r["kv_bytes"] / r["dense_bf16_bytes"], 100 * (r["perplexity"] / dense["perplexity"] - 1),
                      f"{r['passkey']}/{r['passkey_of']}") for r in rows if r["method"] == method)
        if not pts:
            continue
        xs, ys, keys = zip(*pts)
        ax.plot(xs, ys, marker=marker, label=method, ls="" if method == "single" else "-")  # singles differ in kind
        for x, y, k in pts:
            ax.annotate(k, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for b in doc["budgets"]:
        ax.axvline(b, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log", base=2)
    xs_all = [r["kv_bytes"] / r["dense_bf16_bytes"] for r in rows if r["method"] != "dense"] + list(doc["budgets"])
    ax.set_xlim(min(xs_all) / 1.5, max(xs_all) * 1.5)  # one budget alone would fill the axis with a sliver
    ax.axhline(0, color="grey", lw=0.5)  # dense
    ax.set_yscale("symlog", linthresh=10)  # a point far off (a budget below every good choice) keeps the rest readable
    ticks = [-5, -2, 0, 1, 2, 5, 10, 20, 50, 100, 200]
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, next((t for t in ticks if t >= hi), hi))  # a labelled tick above the highest point
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:+g}"))
    ax.set_xlabel("resident KV bytes / bf16 dense store (log2)")
    ax.set_ylabel("perplexity vs dense (%), held-out text")
    ax.set_title(f"kvkit tune frontier, passkey @{doc['ctx']} beside each point")
    ax.legend()
    fig.tight_layout()
    out = RESULTS / f"{args.name}.png"
    fig.savefig(out, dpi=110)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
