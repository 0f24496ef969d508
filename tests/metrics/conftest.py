"""Shared pieces of the metrics tests: the `system` marker, processes on loopback, bounded waits.

Tests marked `system` need the Debian packages `prometheus` and `chromium`
(`bash tests/metrics/install_system_packages.sh`); they fail, never skip, when one is missing.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
WORKLOAD = HERE / "workload.py"
INSTALL = "bash tests/metrics/install_system_packages.sh"
T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "system: needs the Debian packages prometheus and chromium "
        f"({INSTALL}); fails when they are missing")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: one thread, no multiprocess dir unless asked."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], T | None], timeout: float, what: str,
               interval: float = 0.25) -> T:
    """Call `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except Exception as exc:  # noqa: BLE001 (keep trying; report the last one)
            last_error = exc
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last error: {last_error!r}")


def read_line(proc: subprocess.Popen, timeout: float, what: str,
              stderr_path: Path | None = None) -> str:
    """The next stdout line of `proc`, or a failure naming `what` after `timeout` seconds.

    Child stderr goes to `stderr_path` (a file, so a chatty child never blocks on a full pipe).
    """
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            pytest.fail(f"{what}: no output within {timeout:.0f}s")
        line = proc.stdout.readline()
    finally:
        sel.close()
    if not line:
        err = stderr_path.read_text() if stderr_path and stderr_path.exists() else ""
        pytest.fail(f"{what} exited (code {proc.wait(5)}) before printing; stderr:\n{err[-3000:]}")
    return line.strip()


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def stop(proc: subprocess.Popen) -> None:
    """Terminate a child we started, then kill it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def require_binary(name: str) -> str:
    """The path of system binary `name`; a loud failure (not a skip) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"'{name}' is not installed, and this system test needs the real one. "
                    f"Run `{INSTALL}` (apt-get install prometheus chromium), then re-run.")
    return path


@dataclass
class Workload:
    """A running tests/metrics/workload.py: its /metrics port and where its summary lands."""

    proc: subprocess.Popen
    port: int
    summary_path: Path

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def summary(self, timeout: float = 120.0) -> dict[str, Any]:
        """The workload's summary JSON, once its steps are done."""
        def ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None and not self.summary_path.exists():
                pytest.fail(f"workload exited with {self.proc.returncode} before its summary")
            return json.loads(self.summary_path.read_text()) if self.summary_path.exists() else None
        return wait_until(ready, timeout, "the workload's summary")


@pytest.fixture
def start_workload(tmp_path: Path) -> Iterator[Callable[..., Workload]]:
    """Start workload.py with the given options; every one started is stopped afterwards."""
    started: list[subprocess.Popen] = []

    def start(**options: Any) -> Workload:
        summary = tmp_path / f"workload-{len(started)}.json"
        err = summary.with_suffix(".stderr")
        argv = [sys.executable, str(WORKLOAD), "--summary", str(summary)]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        with err.open("w") as err_file:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(argv, cwd=tmp_path, env=child_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=err_file)
        started.append(proc)
        line = read_line(proc, 120, "workload.py", err)
        assert line.startswith("PORT "), f"workload.py printed {line!r}, expected 'PORT <n>'"
        return Workload(proc, int(line.split()[1]), summary)

    yield start
    for proc in started:
        stop(proc)


@pytest.fixture
def helpers() -> Any:
    """The helper functions of this conftest, for test modules (importlib mode cannot import it)."""
    class Helpers:
        pass
    for fn in (child_env, free_port, wait_until, read_line, http_get, stop, require_binary):
        setattr(Helpers, fn.__name__, staticmethod(fn))
    Helpers.REPO_ROOT = REPO_ROOT
    return Helpers
