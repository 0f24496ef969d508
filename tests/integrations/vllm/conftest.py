"""`engine`: start one real vLLM engine (`engine_run.py`) in its own process and read its report.

Each run gets its own process because kvkit's backend override is global to a process; it starts
from a temporary folder (never the checkout root: triton_kernels/ shadowing), niced, with one
OpenMP thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("engine_run.py")


class Engine:
    def __init__(self, tmp_path_factory) -> None:
        self.tmp = tmp_path_factory

    def start(self, **args) -> subprocess.CompletedProcess:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for name in ("KVKIT_POLICY", "KVKIT_CONFIG"):  # engine_run.py sets them from `args`
            env.pop(name, None)
        cmd = ["nice", "-n", "10", sys.executable, str(RUNNER), json.dumps(args)]
        return subprocess.run(cmd, cwd=self.tmp.mktemp("vllm"), env=env, capture_output=True,
                              text=True, timeout=600)

    def run(self, **args) -> dict:
        """The report of an engine that must finish."""
        proc = self.start(**args)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("KVKIT_REPORT ")]
        assert proc.returncode == 0 and lines, f"engine failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        return json.loads(lines[-1].removeprefix("KVKIT_REPORT "))

    def fails(self, **args) -> str:
        """The stderr of an engine that must fail to start."""
        proc = self.start(**args)
        assert proc.returncode != 0, f"engine was expected to fail:\n{proc.stdout[-2000:]}"
        return proc.stderr


@pytest.fixture(scope="session")
def engine(tmp_path_factory) -> Engine:
    return Engine(tmp_path_factory)
