"""bench/gpu_check.sh as far as a CPU machine can run it: it stops clearly without CUDA, its
import tree maps kvkit.kernels to triton_kernels/ without a top-level `triton_kernels`, and a dry
run (GPU_CHECK_DRY=1: interpreter, tiny grid) accepts every argument it passes to pytest and to
bench/kernels.py. The machine's `python3` is replaced by this environment's (first on PATH)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "bench" / "gpu_check.sh"
NO_CUDA = "gpu_check: no CUDA device (torch.cuda.is_available() is False); run this on the GPU machine"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TRITON_INTERPRET", "GPU_CHECK_DRY", "GPU_CHECK_DEADLINE_S")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def _run(*args: str, timeout: float = 120, **extra: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(SCRIPT), *args], env=_env(**extra), cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=timeout)
    return res, time.monotonic() - t0


def test_gpu_check_needs_an_outdir():
    res, _ = _run()
    assert res.returncode == 2
    assert "usage: bash bench/gpu_check.sh OUTDIR" in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_gpu_check_without_cuda_exits_3_with_one_line(tmp_path):
    out = tmp_path / "gpu"
    res, seconds = _run(str(out))
    assert res.returncode == 3, res.stdout + res.stderr
    assert res.stderr.strip() == NO_CUDA
    assert "Traceback" not in res.stdout + res.stderr
    machine = json.loads((out / "machine.json").read_text())
    assert machine["cuda_available"] is False
    assert machine["torch"] == torch.__version__
    assert not (out / "kernel_tests.txt").exists()  # nothing long ran
    assert seconds < 60


def test_import_tree_maps_kvkit_kernels_to_triton_kernels(tmp_path):
    res, _ = _run("--import-tree", str(tmp_path), TRITON_INTERPRET="1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(p.is_symlink() for p in (tmp_path / "kvkit").iterdir() if p.name != "__pycache__")
    code = ("import importlib.util, json, kvkit, kvkit.kernels; s = importlib.util.find_spec('triton_kernels'); "
            "print(json.dumps([kvkit.__file__, kvkit.kernels.__file__, "
            "[] if s is None else list(s.submodule_search_locations or [s.origin])]))")
    probe = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                           env=_env(PYTHONPATH=str(tmp_path), TRITON_INTERPRET="1"), check=True)
    kvkit_file, kernels_file, triton_kernels = json.loads(probe.stdout)
    assert Path(kvkit_file).parent == tmp_path / "kvkit"  # the tree, not the editable install
    assert Path(kernels_file).resolve() == REPO_ROOT / "triton_kernels" / "__init__.py"
    assert not any(Path(p).resolve().is_relative_to(REPO_ROOT) for p in triton_kernels)


def test_gpu_check_dry_run_accepts_its_commands(tmp_path):
    out = tmp_path / "gpu"
    res, seconds = _run(str(out), GPU_CHECK_DRY="1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [
        "cuda", "import_tree", "kernel_tests", "kernels_llama8b", "kernels_llama8b_128k", "kernels_smollm2"]
    assert all(s["status"] == "PASS" for s in summary["steps"][1:]), summary
    assert "passed" in (out / "kernel_tests.txt").read_text()
    assert (out / "kernel_tests.xml").exists()
    for name, geometry in [("kernels_llama8b", 128), ("kernels_llama8b_128k", 128), ("kernels_smollm2", 64)]:
        bench = json.loads((out / name / "kernels_cpu.json").read_text())
        assert bench["geometry"]["head_dim"] == geometry and bench["geometry"]["dtype"] == "bf16"
        assert bench["rows"] and all("dense_sdpa_ms_p50" in r for r in bench["rows"])
    assert "| kernels_smollm2 | PASS |" in (out / "summary.md").read_text()
    assert seconds < 90
