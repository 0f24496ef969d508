"""Pictures of the trade-off: quality against KV bytes, and time per token against context.

Used by `kvkit demo --plot FILE` and by the plotting scripts in `bench/`. matplotlib is an
optional extra (`pip install 'kvkit[plot]'`); it is imported when a figure is drawn, and
`require()` says how to install it when it is missing. Figures are drawn with the non-interactive
Agg backend and written to the file named (its suffix picks the format: .png, .svg, .pdf).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from kvkit.demo import DemoRow

INSTALL_HINT = "drawing needs matplotlib: pip install 'kvkit[plot]'"
FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0)  # ticks of the bytes-vs-dense axes


def require():
    """The `matplotlib.pyplot` module, on the Agg backend.

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@dataclass(frozen=True)
class Point:
    """One policy at one budget: its quality and its bytes as fractions of dense's."""

    policy: str               # points of one policy are joined by a line, one legend entry
    bytes_vs_dense: float
    passkey: float            # share of keys answered, 0..1
    perplexity_vs_dense: float | None = None
    note: str = ""            # written beside the point on the perplexity panel (e.g. the budget)
    joined: bool = True       # False: the policy's points are separate settings, not a curve


def _scatter(ax, points: Sequence[Point], y: str, ylabel: str, xlabel: str, legend: bool,
             notes: bool = False) -> None:
    groups: dict[str, list[Point]] = {}
    for p in points:
        if getattr(p, y) is not None:
            groups.setdefault(p.policy, []).append(p)
    for name, pts in groups.items():
        pts = sorted(pts, key=lambda p: p.bytes_vs_dense)
        xs, ys = [p.bytes_vs_dense for p in pts], [getattr(p, y) for p in pts]
        if name == "dense":
            ax.scatter(xs, ys, marker="*", s=220, color="black", zorder=3, label=name)
        else:
            ax.plot(xs, ys, marker="o", linewidth=1 if pts[0].joined else 0, label=name)
        for p in pts if notes else ():
            if p.note:
                ax.annotate(p.note, (p.bytes_vs_dense, getattr(p, y)), textcoords="offset points",
                            xytext=(3, -10), fontsize=6, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xticks(FRACTIONS, [f"1/{round(1 / f)}" if f < 1 else f"{f:g}" for f in FRACTIONS])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="best")


def tradeoff(points: Sequence[Point], path: str | Path, title: str,
             xlabel: str = "resident KV bytes vs dense (log)") -> Path:
    """Passkey (and perplexity, where points have it) against bytes; dense drawn as a star."""
    plt = require()
    with_ppl = any(p.perplexity_vs_dense is not None for p in points)
    fig, axes = plt.subplots(1, 2 if with_ppl else 1, figsize=(12 if with_ppl else 6.5, 5), squeeze=False)
    _scatter(axes[0][0], points, "passkey", "passkey accuracy", xlabel, legend=True)
    axes[0][0].set_ylim(-0.05, 1.1)
    if with_ppl:
        _scatter(axes[0][1], points, "perplexity_vs_dense", "perplexity vs dense (lower is better)", xlabel,
                 legend=False, notes=True)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def demo(rows: Sequence[DemoRow], path: str | Path, title: str) -> Path:
    """`kvkit demo`'s rows: passkey against resident KV (vs a tight bf16 copy of the same
    tokens), passkey against KV read per token and ms per token (vs the first, dense, row)."""
    plt = require()
    base = rows[0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, ratio, xlabel in ((axes[0], lambda r: r.kv_bytes / r.dense_bytes, "resident KV vs bf16 dense (log)"),
                              (axes[1], lambda r: r.read_bytes_per_token / base.read_bytes_per_token,
                               "KV read per token vs dense (log)")):
        points = [Point("dense" if r is base else r.label, ratio(r), r.correct / max(1, r.samples)) for r in rows]
        _scatter(ax, points, "passkey", "passkey accuracy", xlabel, legend=ax is axes[0])
        ax.set_ylim(-0.05, 1.1)
    names = [r.label for r in rows]
    times = [r.ms_per_token / base.ms_per_token for r in rows]
    colors = ["black", *(f"C{i}" for i in range(len(rows) - 1))]  # as the scatters' color cycle
    axes[2].barh(names[::-1], times[::-1], color=colors[::-1])
    axes[2].axvline(1.0, color="black", linewidth=0.8)
    axes[2].set_xlabel("ms per token vs dense (median decode step)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def speed(series: dict[str, list[tuple[int, float]]], path: str | Path, title: str,
          ylabel: str = "ms per token (median step)") -> Path:
    """Lines of (context tokens, ms per token), one per name; a name starting `dense` is drawn black."""
    plt = require()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, pts in sorted(series.items()):
        pts = sorted(pts)
        style = dict(color="black", linewidth=2) if name.startswith("dense") else {}
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name, **style)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
