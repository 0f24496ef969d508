"""The routing traces shipped in kvkit/moe/data/readme_* load and are what they claim."""

from importlib.resources import files

import numpy as np
import pytest

from kvkit.moe.trace import load_trace

SHIPPED = sorted(p.name for p in files("kvkit.moe").joinpath("data").iterdir()
                 if p.name.startswith("readme_") and p.name.endswith(".npz"))


def test_traces_are_shipped():
    assert len(SHIPPED) >= 2


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_trace_is_valid(name):
    trace = load_trace(files("kvkit.moe").joinpath("data", name))
    assert trace.meta["model"].startswith("smollm2-readme")
    assert trace.num_layers == 30 and trace.predicted is not None
    assert trace.lookahead_unit == "tokens"
    assert len(np.unique(trace.request)) >= 2
    if trace.meta["router"] == "pregate":
        k = trace.top_k
        assert np.array_equal(trace.predicted[..., :k], trace.experts)
