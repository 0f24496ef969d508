"""Shared helpers of the MoE benchmarks: machine info and JSON + markdown output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine_info() -> dict[str, Any]:
    import numpy as np
    import torch

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, check=False).stdout.strip()
    except OSError:
        sha = ""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": "cuda" if torch.cuda.is_available() else "cpu", "cpu": cpu,
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "git": sha}


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
                  title: str) -> tuple[Path, Path]:
    """Write bench/results/<name>.json and .md; print the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    js, md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    js.write_text(json.dumps(result, indent=2, default=str) + "\n")
    m = result.get("machine", {})
    text = (f"## {title}\n\n{m.get('device')}, {m.get('cores')} cores ({m.get('cpu')}), "
            f"torch {m.get('torch')}, git {m.get('git')}\n\n`{result.get('command')}`\n\n"
            + markdown_table(rows))
    md.write_text(text)
    print(text)
    return js, md
