"""Shared helpers of the MoE benchmarks: machine info and JSON + markdown output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import common

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine_info() -> dict[str, Any]:
    return {**common.machine_info(), "git": common.git_sha()}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    for r in rows[1:]:
        cols += [c for c in r if c not in cols]
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_results(name: str, result: dict[str, Any], rows: list[dict[str, Any]],
                  title: str, notes: str = "") -> tuple[Path, Path]:
    """Write bench/results/<name>.json and .md (the table, then `notes`); print the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    js, md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    js.write_text(json.dumps(result, indent=2, default=str) + "\n")
    m = result.get("machine", {})
    text = (f"## {title}\n\n{m.get('device')}, {m.get('cores')} cores ({m.get('cpu')}), "
            f"torch {m.get('torch')}, git {m.get('git')}\n\n`{result.get('command')}`\n\n"
            + markdown_table(rows) + notes)
    md.write_text(text)
    print(text)
    return js, md
