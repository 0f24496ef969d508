"""Predictors fitted on part of a trace and scored on the rest."""

from __future__ import annotations

import numpy as np
import pytest

from kvkit.moe.predict import frequency_predictions, learned_predictions, onehot, recall
from kvkit.moe.synth import cooccurrence_predictions, simple_trace
from kvkit.moe.trace import Trace


def _chained(tokens: int = 400, layers: int = 4, experts: int = 16, seed: int = 0) -> Trace:
    """Layer l's experts are a fixed function of layer l-1's: a learnable structure."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(experts)
    first = np.stack([rng.choice(experts, 2, replace=False) for _ in range(tokens)])
    rows = [first]
    for _ in range(layers - 1):
        rows.append(perm[rows[-1]])
    ex = np.stack(rows, 1)
    meta = {"num_experts": experts, "top_k": 2, "expert_bytes": 1, "model": "chained"}
    return Trace(ex, np.zeros(tokens, dtype=np.int64), None, 0, meta)


def test_recall_counts_named_experts():
    tr = _chained()
    assert recall(tr, tr.experts) == 1.0
    assert recall(tr, np.full_like(tr.experts, -1)) == 0.0
    half = tr.experts.copy()
    half[:, 0] = -1                       # rows without a prediction are not scored
    assert recall(tr, half) == 1.0
    assert onehot(np.array([[1, 3]]), 4).tolist() == [[0, 1, 0, 1]]


def test_learned_predictor_learns_a_chain_and_is_scored_held_out():
    tr = _chained()
    pred, conf = learned_predictions(tr, 1, epochs=200)
    assert pred.lookahead == 1 and pred.lookahead_unit == "layers"
    assert (pred.predicted[:, 0] == -1).all()          # nothing before layer 1
    held = recall(pred, pred.predicted, 200)
    assert conf > 0.95 and held > 0.95
    rng = np.random.default_rng(1)     # each layer's rows shuffled: the chain is broken
    noise = tr.experts.copy()
    for l in range(1, tr.num_layers):
        noise[:, l] = noise[rng.permutation(tr.num_tokens), l]
    _, conf_noise = learned_predictions(Trace(noise, tr.request, None, 0, tr.meta), 1, epochs=200)
    assert conf_noise < 0.5


def test_frequency_predictions_use_the_requests_own_history():
    tr = simple_trace(tokens=120, layers=2, locality=0.9, requests=3)
    pred = frequency_predictions(tr)
    first = np.r_[True, tr.request[1:] != tr.request[:-1]]
    assert (pred.predicted[first] == -1).all() and (pred.predicted[~first] >= 0).all()
    assert pred.lookahead == tr.num_layers
    assert recall(pred, pred.predicted, 60) > 2 * tr.top_k / tr.num_experts


def test_learned_beats_cooccurrence_when_the_previous_token_matters():
    tr = simple_trace(tokens=600, layers=3, num_experts=16, top_k=2, locality=0.9)
    learned, _ = learned_predictions(tr, 1)
    co, _ = cooccurrence_predictions(tr, 1)
    assert recall(learned, learned.predicted, 300) > recall(co, co.predicted, 300)


@pytest.mark.parametrize("kwargs,match", [({"distance": 0}, "distance"),
                                          ({"distance": 4}, "distance"),
                                          ({"fit_tokens": 2}, "fit_tokens")])
def test_learned_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        learned_predictions(_chained(), **kwargs)
    with pytest.raises(ValueError, match="half_life"):
        frequency_predictions(_chained(), half_life=0)
