"""What every benchmark records: the machine, the git revision, the command; and the writer of
`bench/results/<name>.json` + `.md`. Benchmarks run as `python bench/<script>.py`, so this
module imports as `common` from beside them.

Results are committed, so they name no folder of one machine: `portable()` records a path
inside the repo relative to its root and any other (a temporary folder, a home) by its file
name; system paths (`/usr/...`) stay as they are."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
REPO_ROOT = RESULTS.parents[1]
# an absolute path of two or more parts, not inside a URL or a relative path (a/b, http://h/p)
_ABSOLUTE = re.compile(r"(?<![\w.:/~-])/[\w.+-]+(?:/[\w.+@%-]+)+/?")
_SYSTEM = ("/usr/", "/etc/", "/opt/", "/proc/", "/sys/", "/dev/")  # alike on every machine


def connector_args(policy: dict | None) -> dict[str, Any]:
    """`LLM(...)` keyword arguments a kvkit policy config needs beside itself: kvkit's KV
    connector when the policy evicts by score (h2o, a2sf: integrations/vllm/eviction.py)."""
    if policy is None:
        return {}
    from kvkit.integrations.vllm import plugin

    if not plugin.scores_blocks(plugin.load_policy(json.dumps(policy))):
        return {}
    return {"kv_transfer_config": dict(plugin.EVICTION_CONNECTOR)}


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the architecture where that is missing)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import numpy
    import torch
    info: dict[str, Any] = {"device": "cpu", "cores": os.cpu_count(), "cpu": cpu_model(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "numpy": numpy.__version__, "threads": torch.get_num_threads()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def portable(text: str) -> str:
    """`text` with every absolute path made repo-relative (inside the repo) or cut to its file
    name (outside it, e.g. a temporary folder). Limits: a path is a run of word characters,
    `.+-@%` and slashes, so a name with spaces or commas is cut there (the rest stays as text)."""
    def one(match: re.Match[str]) -> str:
        path = match.group(0)
        if path.startswith(_SYSTEM):
            return path
        where = Path(os.path.abspath(path))
        return where.relative_to(REPO_ROOT).as_posix() if where.is_relative_to(REPO_ROOT) else where.name
    return _ABSOLUTE.sub(one, text)


def _portable_record(value: Any) -> Any:
    if isinstance(value, str):
        return portable(value)
    if isinstance(value, dict):
        return {k: _portable_record(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable_record(v) for v in value]
    return value


def command() -> str:
    """The command line that ran this benchmark, as run from the repo root: the script relative
    to the root, absolute paths in arguments made `portable()`; relative ones kept as given."""
    args = [portable(os.path.abspath(sys.argv[0])), *(portable(a) for a in sys.argv[1:])]
    return "python " + " ".join(shlex.quote(a) for a in args)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def timeit(fn, warmup: int, reps: int) -> dict[str, float]:
    """Median and p90 of wall time and of this thread's CPU time (`time.thread_time`), in ms.

    On a shared machine the wall time includes waiting for a core; the thread's CPU time counts
    only the work done (with one torch thread, all of it happens on this thread)."""
    for _ in range(warmup):
        fn()
    return timeit_rounds({"fn": fn}, 0, reps, 1)["fn"]


def timeit_rounds(fns: dict[str, Any], warmup: int, reps: int, rounds: int) -> dict[str, dict[str, float]]:
    """`timeit` for several cases whose ratio is the result: each round times every case in turn
    (`reps` calls each) and the statistics pool all rounds, so a host that slows down halfway
    slows every case alike instead of whichever happened to run then."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(reps):
                t, c = time.perf_counter(), time.thread_time()
                fn()
                cpu[name].append((time.thread_time() - c) * 1e3)
                wall[name].append((time.perf_counter() - t) * 1e3)
    return {name: _stats(wall[name], cpu[name]) for name in fns}


def _stats(wall: list[float], cpu: list[float]) -> dict[str, float]:
    wall, cpu = sorted(wall), sorted(cpu)
    p90 = min(len(cpu) - 1, int(0.9 * len(cpu)))
    return {"ms_p50": statistics.median(cpu), "ms_p90": cpu[p90],
            "wall_ms_p50": statistics.median(wall), "wall_ms_p90": wall[p90]}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("-" * (len(h) + 2) for h in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], title: str, table: str,
                  out_dir: Path = RESULTS) -> Path:
    """Write `<name>.json` (payload + command, git, machine) and `<name>.md`; print the table.
    Every string in them is made `portable()`: results name no folder of one machine."""
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    record = _portable_record({"bench": name, "command": command(), "git": git_sha(),
                               "machine": machine, **payload})
    table = portable(table)
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    header = (f"{title} — {machine['device']}, {machine['cores']} cores, torch {machine['torch']}, "
              f"git {record['git']}\n\n`{record['command']}`\n")
    (out_dir / f"{name}.md").write_text(header + "\n" + table + "\n")
    print(header + "\n" + table)
    return out_dir / f"{name}.json"


def run_child(script: str, payload: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run `python <script> --child <payload JSON>` in a fresh process and return the JSON it
    prints on its last `KVKIT_REPORT ` line. vLLM benchmarks start each engine this way: kvkit's
    backend override is global to a process. It runs from a temporary folder, never the checkout
    root (whose triton_kernels/ would shadow OpenAI's package of that name)."""
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([sys.executable, str(Path(script).resolve()), "--child", json.dumps(payload)],
                              cwd=cwd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("KVKIT_REPORT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{Path(script).name} child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("KVKIT_REPORT "))


def child_report(fn, payload: str) -> int:
    """The child side of `run_child`: run `fn` on the JSON payload and print its report."""
    print("KVKIT_REPORT " + json.dumps(fn(json.loads(payload))), flush=True)
    return 0
