"""Expert predictors beyond co-occurrence, each fitted on the first tokens of a trace and scored
on the rest (held-out recall of its top-k against the experts really used).

* `frequency_predictions` - per-request decayed frequency: a request's own experts at a layer
  are the guess for its next token's (known one token, i.e. `layers` steps, ahead).
* `learned_predictions`   - a small learned predictor: per layer, a logistic regression from the
  experts of layer l - d of this token and of layer l of the request's previous token to layer
  l's experts (multi-label, trained by full-batch gradient descent on the fit tokens).
* the Read-ME pre-gating router needs no fitting: its predictions ship in the trace
  (`trace.predicted`, `kvkit/moe/data/readme_*_pregate.npz`); `recall` scores them.

All return a trace whose `predicted` the scheduler turns into hints (`kvkit.moe.sched`).
Shapes: T tokens, L layers, K top_k, E experts, k' predictions per layer.
Limits: predictions for layers < d (learned) are left empty (-1).
"""

from __future__ import annotations

import numpy as np

from kvkit.moe.trace import Trace

__all__ = ["frequency_predictions", "learned_predictions", "recall", "onehot"]


def onehot(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[..., K] expert ids -> [..., E] float indicator."""
    out = np.zeros((*experts.shape[:-1], num_experts))
    np.put_along_axis(out, experts, 1.0, axis=-1)
    return out


def recall(trace: Trace, predicted: np.ndarray, start: int = 0, stop: int | None = None) -> float:
    """Share of the experts used by tokens [start, stop) that `predicted` [T, L, k'] names,
    over the (token, layer) rows with a prediction (layers < d of a d-layer-ahead predictor and
    a request's first token under `frequency_predictions` have none)."""
    used = onehot(trace.experts[start:stop], trace.num_experts)
    pred = predicted[start:stop]
    rows = (pred >= 0).any(-1)                                    # [T', L]
    hit = np.take_along_axis(used, np.maximum(pred, 0), -1) * (pred >= 0)
    return float(hit[rows].sum() / max(used[rows].sum(), 1))


def _previous_in_request(trace: Trace) -> np.ndarray:
    """[T] index of the same request's previous token, -1 for a request's first token."""
    prev = np.full(trace.num_tokens, -1)
    last: dict[int, int] = {}
    for t, r in enumerate(trace.request.tolist()):
        prev[t] = last.get(r, -1)
        last[r] = t
    return prev


def frequency_predictions(trace: Trace, half_life: float = 16.0,
                          k_pred: int | None = None) -> Trace:
    """Top-k' of each request's decayed expert counts per layer before each token (a request's
    first token gets none). Known one token ahead: lookahead = layers, unit "layers"."""
    if not half_life > 0:
        raise ValueError(f"half_life must be > 0 tokens, got {half_life}")
    T, L, K = trace.experts.shape
    k_pred = k_pred or K
    rate = 1.0 - 0.5 ** (1.0 / half_life)
    used = onehot(trace.experts, trace.num_experts)              # [T, L, E]
    pred = np.full((T, L, k_pred), -1, dtype=np.int64)
    freq: dict[int, np.ndarray] = {}
    for t, r in enumerate(trace.request.tolist()):
        if r in freq:
            pred[t] = np.argsort(-freq[r], axis=-1, kind="stable")[:, :k_pred]
            freq[r] += rate * (used[t] - freq[r])
        else:
            freq[r] = used[t].copy()
    return trace.with_predictions(pred, L, "layers")


def learned_predictions(trace: Trace, distance: int = 1, fit_tokens: int | None = None,
                        k_pred: int | None = None, epochs: int = 300, lr: float = 0.5,
                        l2: float = 1e-3) -> tuple[Trace, float]:
    """Fit, per layer l >= distance, a logistic regression [layer l-d experts of this token,
    layer l experts of the request's previous token, 1] -> layer l experts on the first
    first three quarters of the `fit_tokens` tokens (default half of the trace); predict every
    token. Returns the trace with `predicted` (lookahead `distance` layers) and the recall on
    the last quarter of the fit tokens: the confidence a hint may claim without looking at the
    held-out tokens."""
    T, L, K = trace.experts.shape
    E = trace.num_experts
    if not 1 <= distance < L:
        raise ValueError(f"distance must be in [1, layers={L}), got {distance}")
    fit = T // 2 if fit_tokens is None else fit_tokens
    if not 4 <= fit <= T:
        raise ValueError(f"fit_tokens must be in [4, {T}], got {fit}")
    train = fit * 3 // 4
    k_pred = k_pred or K
    used = onehot(trace.experts, E)                              # [T, L, E]
    prev = _previous_in_request(trace)
    prev_used = np.where((prev >= 0)[:, None, None], used[np.maximum(prev, 0)], 0.0)
    pred = np.full((T, L, k_pred), -1, dtype=np.int64)
    for l in range(distance, L):
        x = np.concatenate([used[:, l - distance], prev_used[:, l], np.ones((T, 1))], -1)
        y = used[:, l]                                           # [T, E]
        w = np.zeros((2 * E + 1, E))
        xf, yf = x[:train], y[:train]
        for _ in range(epochs):
            p = 1.0 / (1.0 + np.exp(-(xf @ w)))
            w -= lr * (xf.T @ (p - yf) / len(xf) + l2 * w)
        pred[:, l] = np.argsort(-(x @ w), axis=-1, kind="stable")[:, :k_pred]
    out = trace.with_predictions(pred, distance, "layers")
    return out, recall(out, pred, train, fit)
