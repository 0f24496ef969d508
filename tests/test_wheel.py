"""The wheel others install: build it from the checkout's tracked files, install it (not
editable) into a fresh virtual environment, and run the README's plain-import snippet and
`kvkit policies` from a folder outside the checkout.

pip installs the wheel the way a user's pip would, resolving its declared requirements, but from
the wheelhouse `make wheelhouse` fills (`.venv/wheelhouse`: the lock's versions, torch the CPU
build) with `--no-index --find-links` and no pip configuration, so the test needs no network and
sees no other package source. It checks that the declared ranges resolve to a consistent set
(`pip check`), that the core install brings no Triton, and that the installed kvkit works on its
own. It does not check other versions within the ranges: `make test-lower` tests the lower edges.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from importlib.metadata import version

import pytest
from packaging.requirements import Requirement

from kvkit import policies

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / ".venv" / "wheelhouse"
pytestmark = pytest.mark.slow


def _run(*cmd, cwd: Path, timeout: int = 300, env: dict | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know the tracked files")
    src = tmp_path_factory.mktemp("src")
    for name in _run("git", "ls-files", "-z", cwd=ROOT).split("\0"):
        if name and (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src, cwd=src)
    (found,) = dist.glob("kvkit-*.whl")
    return found


def _offline_pip() -> dict:
    """The environment for pip: no PIP_* settings and no configuration files, so the wheelhouse
    given on the command line is the only package source."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull}


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    if not (WHEELHOUSE / ".complete").is_file():
        pytest.skip(f"no wheelhouse at {WHEELHOUSE}: run `make wheelhouse` (`make test-all` does)")
    env = tmp_path_factory.mktemp("venv")
    _run(sys.executable, "-m", "venv", "--without-pip", env, cwd=env)
    pip = (sys.executable, "-m", "pip", "--python", env / "bin" / "python")
    _run(*pip, "install", "--no-index", "--find-links", WHEELHOUSE, "-q", wheel, cwd=env, env=_offline_pip(),
         timeout=600)
    _run(*pip, "check", cwd=env, env=_offline_pip())
    return env


def test_wheel_holds_the_package_under_kvkit_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"kvkit"}  # no top-level triton_kernels or integrations
    for needed in ("kvkit/kernels/sparse_decode.py", "kvkit/integrations/hf/cache.py",
                   "kvkit/data/duo_smollm2.json", "kvkit/demo.py", "kvkit/integrations/vllm/plugin.py"):
        assert needed in names


def test_declared_ranges_admit_the_locked_versions(wheel):
    meta = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info/METADATA")
    requires = [Requirement(r) for r in Parser().parsestr(meta.decode()).get_all("Requires-Dist")]
    core = [r for r in requires if r.marker is None]
    assert {r.name for r in core} >= {"torch", "transformers"} and "triton" not in {r.name for r in core}
    assert all(r.specifier.contains(version(r.name), prereleases=True) for r in core), core
    torch_req = next(r for r in core if r.name == "torch")
    assert all(s.operator not in ("==", "===") for s in torch_req.specifier)  # a range, not a pin
    assert any(r.name == "matplotlib" and r.marker.evaluate({"extra": "plot"}) for r in requires)


def test_installed_wheel_runs_the_readme_and_the_cli_outside_the_checkout(venv, tmp_path):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"\*\*Plain import\*\*.*?```python\n(.*?)```", readme, re.S).group(1)
    py = venv / "bin" / "python"
    out = _run(py, "-c", snippet + "\nimport kvkit, importlib.util as u\nprint(kvkit.__file__)\n"
               "print(u.find_spec('triton_kernels'))", cwd=tmp_path)
    lines = out.strip().splitlines()
    assert lines[0] == "260"
    assert Path(lines[1]).is_relative_to(venv) and lines[2] == "None"
    found = json.loads(_run(venv / "bin" / "kvkit", "policies", "--json", cwd=tmp_path))
    assert [d["name"] for d in found] == policies.names()
    assert _run(venv / "bin" / "kvkit", "--version", cwd=tmp_path).strip() == f"kvkit {version('kvkit')}"


def test_installed_wheel_resolved_cpu_torch_and_no_triton(venv, tmp_path):
    code = ("import importlib.util, torch; "
            "print(torch.__version__, torch.version.cuda, importlib.util.find_spec('triton') is not None)")
    torch_version, cuda, has_triton = _run(venv / "bin" / "python", "-c", code, cwd=tmp_path).split()
    assert torch_version.endswith("+cpu") and cuda == "None"
    assert has_triton == "False"  # Triton is the `kernels` extra, not a core requirement
