""".ci/lower_pins.py, which gives `make test-lower` its pins, stays in step with pyproject.toml:
every requirement it pins has a lower bound, each pin lies inside the declared range, and a
stand-in below the declared bound (BELOW) is only for a package still required."""

import importlib.util
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ["kernels", "plot"]  # the extras `make test-lower` installs with the core requirements


def _lower_pins():
    spec = importlib.util.spec_from_file_location("lower_pins", ROOT / ".ci" / "lower_pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _requirements() -> list[Requirement]:
    return [Requirement(r) for r in _lower_pins().requirements(EXTRAS)]


def test_every_pin_lies_in_its_declared_range():
    lp = _lower_pins()
    declared = {canonicalize_name(r.name): r.specifier for r in _requirements()}
    pins = lp.pins(EXTRAS)
    assert {canonicalize_name(n) for n, _, _ in pins} == set(declared)
    for name, version, bound in pins:
        assert declared[canonicalize_name(name)].contains(version), (name, version)
        assert Version(version) >= Version(bound)
        assert f">={bound}" in str(declared[canonicalize_name(name)]).replace(" ", "")


def test_stand_ins_are_for_required_packages_only():
    lp = _lower_pins()
    required = {canonicalize_name(r.name) for r in _requirements()}
    assert set(lp.BELOW) <= required
    assert all(why for _, why in lp.BELOW.values())


def test_a_requirement_without_a_lower_bound_is_refused():
    lp = _lower_pins()
    assert lp.lower_bound("torch>=2.11,<2.14") == ("torch", "2.11")
    assert lp.lower_bound("vllm==0.32.*") == ("vllm", "0.32")
    assert lp.lower_bound("prometheus_client>=0.20") == ("prometheus-client", "0.20")
    with pytest.raises(ValueError, match="no lower bound"):
        lp.lower_bound("xformers")
    with pytest.raises(ValueError, match="no lower bound"):
        lp.lower_bound("numpy<3")
