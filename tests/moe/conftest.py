"""Fixtures shared by the MoE tests."""

from __future__ import annotations

import pytest

from kvkit.moe.synth import simple_trace
from kvkit.moe.trace import Trace


@pytest.fixture
def trace() -> Trace:
    return simple_trace()
