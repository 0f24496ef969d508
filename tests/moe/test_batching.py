"""Expert-aware batching against first-come-first-served."""

from __future__ import annotations

import numpy as np
import pytest

from kvkit.moe.batching import BatchConfig, schedule
from kvkit.moe.synth import SynthConfig, generate, simple_trace


def _clustered():
    # requests with strong own expert preferences (their "domain")
    cfg = SynthConfig(num_layers=4, request_tokens=32, request_sigma=2.0, type_strength=0.5)
    return generate(cfg, 32 * 24, seed=3)


def test_every_token_is_decoded_once():
    trace = _clustered()
    for strategy in ("fcfs", "expert_aware"):
        res = schedule(trace, BatchConfig(strategy=strategy, batch_size=8))
        assert res.tokens == trace.num_tokens
        assert len(res.completion_steps) == len(np.unique(trace.request))


def test_expert_aware_needs_fewer_experts_within_the_wait_bound():
    trace = _clustered()
    fcfs = schedule(trace, BatchConfig(strategy="fcfs", batch_size=8))
    aware = schedule(trace, BatchConfig(strategy="expert_aware", batch_size=8, window=16,
                                        max_wait_steps=2))
    assert aware.distinct_per_step < fcfs.distinct_per_step
    assert aware.max_gap_steps <= 2 + 1 and fcfs.max_gap_steps == 1


def test_batch_of_one_is_fcfs_order():
    trace = simple_trace(tokens=40, requests=4)
    res = schedule(trace, BatchConfig(strategy="fcfs", batch_size=1, window=1))
    assert res.steps == 40 and list(res.completion_steps) == [10, 20, 30, 40]


@pytest.mark.parametrize("kwargs,match", [
    ({"strategy": "random"}, "strategy must be one of"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"batch_size": 8, "window": 4}, "window"),
])
def test_batch_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchConfig(**kwargs)
