"""The synthetic generator reproduces the published routing statistics it was fitted to."""

from __future__ import annotations

import numpy as np
import pytest

from kvkit.moe.synth import (CALIBRATION, SynthConfig, check_calibration,
                             cooccurrence_predictions, generate, noisy_oracle_predictions,
                             preset, routing_stats)


@pytest.fixture(scope="module")
def deepseek_like():
    # an independent seed from the fit (bench/moe_calibrate.py fits on seeds 1..3); long
    # enough (31 requests of 256 tokens) that request-to-request variation averages out
    return generate(preset("deepseek-v2-lite"), 8000, seed=7, num_layers=2)


def test_preset_reproduces_lru_and_belady_curves_within_3_points(deepseek_like):
    check = check_calibration(deepseek_like)
    assert check["ok"], (check["max_abs_error"], check["curves"])


def test_preset_statistics_are_plausible(deepseek_like):
    stats = routing_stats(deepseek_like)
    assert stats["overlap"][1] > stats["overlap"][2] > stats["overlap"][16] > stats["random_overlap"]
    assert abs(stats["overlap"][1] - CALIBRATION["overlap"][1]) < 0.05
    lo, hi = stats["max_over_mean"]
    assert 1.0 < lo and hi < 5.0


def test_generate_is_deterministic_and_valid():
    cfg = SynthConfig(num_layers=2, request_tokens=10)
    a, b = generate(cfg, 30, seed=1), generate(cfg, 30, seed=1)
    assert np.array_equal(a.experts, b.experts) and a.experts.shape == (30, 2, 6)
    assert a.request.tolist() == [0] * 10 + [1] * 10 + [2] * 10


def test_cooccurrence_predictor_beats_chance(deepseek_like):
    pred, recall = cooccurrence_predictions(deepseek_like, distance=1)
    assert recall[1] > 2 * 6 / 64
    assert pred.lookahead == 1 and pred.lookahead_unit == "layers"
    assert (pred.predicted[:, 0] == -1).all()


def test_noisy_oracle_accuracy(deepseek_like):
    exact = noisy_oracle_predictions(deepseek_like, 1.0)
    assert np.array_equal(exact.predicted, deepseek_like.experts)
    noisy = noisy_oracle_predictions(deepseek_like, 0.5, seed=1)
    share = (noisy.predicted == deepseek_like.experts).mean()
    assert 0.45 < share < 0.55


@pytest.mark.parametrize("kwargs,match", [({"top_k": 0}, "top_k"),
                                          ({"type_stickiness": 1.0}, "type_stickiness"),
                                          ({"request_alpha": 0}, "request_alpha")])
def test_synth_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SynthConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="no synthetic preset"):
        preset("mixtral-8x7b")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [21, 22])
def test_preset_calibration_full_model_shape(seed):
    """All 26 layers, 6000 tokens (about 2 minutes per seed)."""
    check = check_calibration(generate(preset("deepseek-v2-lite"), 6000, seed=seed))
    assert check["ok"], (check["max_abs_error"], check["curves"])
