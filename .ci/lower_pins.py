"""Print the lowest versions pyproject.toml claims, one `name==version` a line, for `make test-lower`.

Every requirement of `[project].dependencies` and of the extras named on the command line
(default: `kernels`; `make test-lower` adds `plot`) must have a lower bound (`>=`, `==` or `~=`); the pin is that bound.
Only the direct dependencies are pinned: pip resolves the rest (tokenizers, huggingface_hub,
...) to the newest versions these pins allow, so a too-low bound shows up as an install or a
test failure.

Where the declared bound cannot be installed here, BELOW says which version stands in for it
and why; `--explain` prints those reasons.

    python3 .ci/lower_pins.py [extra ...] [--explain]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the copy pip carries
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# name -> (the version installed instead of the declared bound, why)
BELOW = {
    "torch": ("2.13.0", "PyPI's Linux wheels of torch 2.11/2.12 are CUDA builds (several GB of nvidia-* "
                        "packages) and the PyTorch CPU index is not reachable here; 2.13.0+cpu is the "
                        "lowest CPU build that installs. torch 2.11 is left to bench/gpu_check.sh."),
}

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)(;.*)?$")


def lower_bound(requirement: str) -> tuple[str, str]:
    """`"torch>=2.11,<2.14"` -> `("torch", "2.11")`; raises ValueError with no lower bound."""
    m = _REQ.match(requirement)
    if m is None:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    name, specs = m.group(1).lower().replace("_", "-"), m.group(2)
    for spec in specs.split(","):
        spec = spec.strip()
        for op in ("===", "==", "~=", ">="):
            if spec.startswith(op):
                version = spec[len(op):].strip()
                if "*" in version:  # `==0.32.*`: the lowest release of that series
                    version = version.rstrip(".*")
                return name, version
    raise ValueError(f"{requirement!r} has no lower bound (>=, == or ~=): its lower edge cannot be tested")


def requirements(extras: list[str], pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The core requirements of pyproject.toml and those of `extras`, as written there."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return reqs


def pins(extras: list[str], pyproject: Path = ROOT / "pyproject.toml") -> list[tuple[str, str, str]]:
    """(name, version to install, declared bound) for the core dependencies and `extras`."""
    out = []
    for req in requirements(extras, pyproject):
        name, declared = lower_bound(req)
        out.append((name, BELOW.get(name, (declared,))[0], declared))
    return out


def main(argv: list[str]) -> int:
    explain = "--explain" in argv
    extras = [a for a in argv if not a.startswith("--")] or ["kernels"]
    for name, version, declared in pins(extras):
        print(f"{name}=={version}")
        if explain and version != declared:
            print(f"#   {name}: declared >={declared}; {BELOW[name][1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
