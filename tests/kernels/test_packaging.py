"""kvkit.kernels is the repo's triton_kernels/ folder, and never a top-level `triton_kernels`
(vLLM imports that name as OpenAI's kernel package)."""

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNELS_DIR = REPO_ROOT / "triton_kernels"


def _where(spec) -> list[str]:
    return [] if spec is None else list(spec.submodule_search_locations or [spec.origin])


def test_triton_kernels_is_not_ours():
    spec = importlib.util.find_spec("triton_kernels")
    assert not any(Path(p).resolve().is_relative_to(REPO_ROOT) for p in _where(spec))


def test_triton_kernels_is_not_ours_outside_the_checkout():
    code = ("import importlib.util, json; s = importlib.util.find_spec('triton_kernels'); "
            "print(json.dumps([] if s is None else list(s.submodule_search_locations or [s.origin])))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd="/tmp", env=env, capture_output=True, text=True,
                         check=True)
    assert not any(Path(p).resolve().is_relative_to(REPO_ROOT) for p in eval(res.stdout))


def test_kvkit_kernels_is_the_triton_kernels_folder():
    spec = importlib.util.find_spec("kvkit.kernels")
    assert [Path(p).resolve() for p in _where(spec)] == [KERNELS_DIR]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import kvkit.kernels as k; print(k.__file__)"
    res = subprocess.run([sys.executable, "-c", code], cwd="/tmp", env={**env, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, check=True)
    assert Path(res.stdout.strip()).resolve() == KERNELS_DIR / "__init__.py"


def test_kernels_import_only_torch_and_triton():
    allowed = {"torch", "triton", "__future__", "typing", "math"}
    for path in KERNELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"


def test_interpreter_is_on():
    """conftest sets TRITON_INTERPRET before triton is imported; without CUDA it must have worked."""
    from kvkit.kernels import _page_scores, _quant_decode, _sparse_decode, _streaming_prefill
    from kvkit.kernels._common import interpreted
    if os.environ.get("TRITON_INTERPRET") == "1":
        for kernel in (_sparse_decode._sparse_decode_kernel, _quant_decode._quant_decode_kernel,
                       _page_scores._page_scores_kernel, _streaming_prefill._streaming_prefill_kernel):
            assert interpreted(kernel), kernel
