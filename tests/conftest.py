"""Set before any test module imports triton (which reads it when `kvkit.kernels` is first
imported): Triton kernels run through the interpreter on CPU. A GPU run sets TRITON_INTERPRET=0.
Also `bench_script`, which loads a benchmark script as a module for the tests of bench/."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def bench_script():
    """`load(name)`: bench/<name>.py as a module (the benchmarks are scripts, not a package)."""
    return _load_bench_script


def _load_bench_script(name: str):
    """bench/<name>.py as a module `bench_<name>`, with bench/ on sys.path while it loads (the
    scripts import `common` and each other from beside them) and registered in sys.modules
    (dataclasses look their module up while the class is made)."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    return module
