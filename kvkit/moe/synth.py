"""Synthetic routing traces calibrated to published real routing, and the statistics that
check them.

Real traces of big MoE models do not ship with kvkit, so the simulator runs on synthetic ones
whose statistics are fitted to published measurements of DeepSeek-V2-Lite-Chat (64 experts,
top-6, 26 MoE layers; "Not All Models Suit Expert Offloading", arXiv:2505.16056), gathered in
`CALIBRATION`. No simulated number is reported before
`check_calibration()` reproduces the LRU and Belady hit-rate curves within 3 points.

Generative model (per token t of request r; L layers, E experts, C latent token types):

    c_t     = c_{t-1} with prob. `type_stickiness`, else ~ q_r          (q_r ~ Dirichlet(alpha))
    logit_l = pop_l + a_{r,l} + type_strength * W_l[c_t] + recency_gain * h_l
              (pop_l ~ N(0, pop_sigma), a_{r,l} ~ N(0, request_sigma): the request's own
              expert preference, its working set)
    S_{t,l} = top_k of (logit_l + Gumbel noise)                        (sampling w/o replacement)
    h_l     = recency_decay * h_l + onehot(S_{t,l})

The latent type is what a hidden state carries from layer to layer (so a co-occurrence
predictor from layer l recovers part of layer l+d), stickiness and the recency term give the
short-term reuse, request-level type mixes give the slower, domain-dependent locality.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from importlib import resources
from typing import Any

import numpy as np

from kvkit.moe.cache import CacheConfig, replay
from kvkit.moe.trace import Trace

# DeepSeek-V2-Lite-Chat, per-layer cache, warm: the published hit rates the synthetic traces must reproduce.
CALIBRATION: dict[str, Any] = {
    "model": "DeepSeek-V2-Lite-Chat", "num_experts": 64, "top_k": 6, "num_layers": 26,
    "lru": {8: 0.32, 16: 0.48, 32: 0.72},
    "belady": {8: 0.40, 16: 0.66, 32: 0.86},
    "overlap": {1: 0.265, 2: 0.202, 16: 0.154},      # shared experts with the token `lag` back
    "predictor_recall": {1: 0.47, 4: 0.43},          # co-occurrence predictor, layer l -> l+d
    "max_over_mean": (1.3, 2.6),                     # per-layer popularity skew
}
TOLERANCE = 0.03
# one DeepSeek-V2-Lite routed expert: gate, up, down of 2048 x 1408 in bf16
DEEPSEEK_V2_LITE_EXPERT_BYTES = 3 * 2048 * 1408 * 2

__all__ = ["SynthConfig", "generate", "simple_trace", "preset", "routing_stats", "cache_curves",
           "check_calibration", "cooccurrence_predictions", "noisy_oracle_predictions",
           "CALIBRATION", "TOLERANCE"]


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the generator (see the module docstring for the model)."""

    num_experts: int = 64
    top_k: int = 6
    num_layers: int = 26
    expert_bytes: int = DEEPSEEK_V2_LITE_EXPERT_BYTES
    num_types: int = 32
    pop_sigma: float = 0.5
    request_sigma: float = 0.0
    type_strength: float = 2.0
    type_stickiness: float = 0.5
    request_alpha: float = 0.2
    recency_gain: float = 1.0
    recency_decay: float = 0.5
    request_tokens: int = 512
    model: str = "synthetic-deepseek-v2-lite"

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"SynthConfig needs 1 <= top_k <= num_experts, got top_k="
                             f"{self.top_k}, num_experts={self.num_experts}")
        for name in ("num_layers", "num_types", "request_tokens", "expert_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"SynthConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("type_stickiness", "recency_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"SynthConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.request_alpha <= 0 or min(self.pop_sigma, self.request_sigma,
                                          self.type_strength, self.recency_gain) < 0:
            raise ValueError("SynthConfig needs request_alpha > 0 and non-negative pop_sigma, "
                             "request_sigma, type_strength, recency_gain")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SynthConfig":
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"SynthConfig does not take {unknown}; it takes {sorted(known)}")
        return cls(**d)


def preset(name: str = "deepseek-v2-lite") -> SynthConfig:
    """A fitted parameter set shipped in `kvkit/moe/data/synth_<name>.json`
    (written by `bench/moe_calibrate.py`; the file records the command and fit quality)."""
    fname = f"synth_{name.replace('-', '_')}.json"
    try:
        text = resources.files("kvkit.moe").joinpath("data", fname).read_text()
    except FileNotFoundError as err:
        raise ValueError(f"no synthetic preset {name!r} (looked for kvkit/moe/data/{fname}); "
                         f"fit one with bench/moe_calibrate.py") from err
    return SynthConfig.from_dict(json.loads(text)["config"])


def _topk_gumbel(logits: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sample k of E without replacement, probabilities softmax(logits): [L, E] -> [L, k],
    each row ordered by perturbed logit (the "gate order")."""
    z = logits + rng.gumbel(size=logits.shape)
    top = np.argpartition(-z, k - 1, axis=-1)[:, :k]
    order = np.argsort(-np.take_along_axis(z, top, -1), axis=-1)
    return np.take_along_axis(top, order, -1)


def generate(cfg: SynthConfig, num_tokens: int, seed: int = 0,
             num_layers: int | None = None) -> Trace:
    """A synthetic trace of `num_tokens` tokens (requests of `cfg.request_tokens` each).

    `num_layers` overrides cfg.num_layers (layers are statistically alike; calibration uses a
    few to go faster)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    rng = np.random.default_rng(seed)
    layers, E, C, K = num_layers or cfg.num_layers, cfg.num_experts, cfg.num_types, cfg.top_k
    pop = cfg.pop_sigma * rng.standard_normal((layers, E))
    W = cfg.type_strength * rng.standard_normal((layers, C, E))
    experts = np.empty((num_tokens, layers, K), dtype=np.int64)
    request = np.arange(num_tokens) // cfg.request_tokens
    h = np.zeros((layers, E))
    rows = np.arange(layers)[:, None]
    c, q, base = 0, None, pop
    for t in range(num_tokens):
        if t % cfg.request_tokens == 0:           # new request: new type mix, fresh state
            q = rng.dirichlet(np.full(C, cfg.request_alpha))
            base = pop + cfg.request_sigma * rng.standard_normal((layers, E))
            c = int(rng.choice(C, p=q))
            h[:] = 0.0
        elif rng.random() >= cfg.type_stickiness:
            c = int(rng.choice(C, p=q))
        sel = _topk_gumbel(base + W[:, c] + cfg.recency_gain * h, K, rng)
        experts[t] = sel
        h *= cfg.recency_decay
        h[rows, sel] += 1.0
    meta = {"num_experts": E, "top_k": K, "expert_bytes": cfg.expert_bytes, "model": cfg.model,
            "synthetic": True, "seed": seed, "synth_config": asdict(cfg)}
    return Trace(experts, request, None, 0, meta)


# -- statistics -----------------------------------------------------------------------------
def routing_stats(trace: Trace, lags: tuple[int, ...] = (1, 2, 16)) -> dict[str, Any]:
    """Overlap with the token `lag` back (same request, share of top_k), popularity max/mean
    per layer (range over layers)."""
    ex, K, E = trace.experts, trace.top_k, trace.num_experts
    onehot = np.zeros((trace.num_tokens, trace.num_layers, E), dtype=bool)
    np.put_along_axis(onehot, ex, True, axis=-1)
    overlap = {}
    for lag in lags:
        same = trace.request[lag:] == trace.request[:-lag]
        shared = (onehot[lag:] & onehot[:-lag]).sum(-1)[same]
        overlap[lag] = float(shared.mean() / K) if shared.size else float("nan")
    counts = onehot.sum(0)                                           # [L, E]
    ratio = counts.max(-1) / counts.mean(-1)
    return {"overlap": overlap, "random_overlap": K / E,
            "max_over_mean": (float(ratio.min()), float(ratio.max()))}


def cache_curves(trace: Trace, capacities: tuple[int, ...] = (8, 16, 32),
                 policies: tuple[str, ...] = ("lru", "belady"),
                 warmup_tokens: int | None = None) -> dict[str, dict[int, float]]:
    """Warm per-layer hit rates of `policies` at each capacity."""
    warm = trace.num_tokens // 10 if warmup_tokens is None else warmup_tokens
    return {p: {c: replay(trace, p, CacheConfig(c, warmup_tokens=warm)).hit_rate
                for c in capacities} for p in policies}


def check_calibration(trace: Trace, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Compare a trace's LRU/Belady curves with `CALIBRATION`; `ok` iff all within tolerance."""
    curves = cache_curves(trace, tuple(CALIBRATION["lru"]))
    worst = max(abs(curves[p][c] - CALIBRATION[p][c]) for p in ("lru", "belady")
                for c in CALIBRATION[p])
    return {"curves": curves, "target": {p: CALIBRATION[p] for p in ("lru", "belady")},
            "max_abs_error": worst, "ok": worst <= tolerance}


# -- predictions for traces without a pre-gating router ----------------------------------------
def cooccurrence_predictions(trace: Trace, distance: int = 1, k_pred: int | None = None,
                             fit_tokens: int | None = None) -> tuple[Trace, dict[int, float]]:
    """Predict layer l's experts from layer l-distance's with co-occurrence counts.

    Counts are fitted on the first `fit_tokens` tokens (default: half) and applied to all;
    layers < distance get no prediction (-1). Returns the trace with `predicted`
    ([T, L, k_pred], lookahead=`distance` layers) and the recall on the held-out tokens.
    """
    T, L, K = trace.experts.shape
    E = trace.num_experts
    if not 1 <= distance < L:
        raise ValueError(f"distance must be in [1, layers={L}), got {distance}")
    k_pred = k_pred or K
    fit = fit_tokens if fit_tokens is not None else T // 2
    onehot = np.zeros((T, L, E), dtype=np.float64)
    np.put_along_axis(onehot, trace.experts, 1.0, axis=-1)
    pred = np.full((T, L, k_pred), -1, dtype=np.int64)
    recall: dict[int, float] = {}
    hits = total = 0
    for l in range(distance, L):
        src, dst = onehot[:fit, l - distance], onehot[:fit, l]
        co = src.T @ dst + 1e-3 * dst.sum(0)                      # [E, E] + popularity prior
        co /= co.sum(-1, keepdims=True)
        score = onehot[:, l - distance] @ co                       # [T, E]
        top = np.argsort(-score, axis=-1)[:, :k_pred]
        pred[:, l] = top
        held = slice(fit, T)
        got = np.take_along_axis(onehot[held, l], top[held], -1).sum()
        hits, total = hits + got, total + (T - fit) * K
    recall[distance] = float(hits / max(total, 1))
    return trace.with_predictions(pred, distance, "layers"), recall


def noisy_oracle_predictions(trace: Trace, accuracy: float = 1.0, lookahead: int = 1,
                             unit: str = "tokens", seed: int = 0) -> Trace:
    """Stand-in for a pre-gating router (Read-ME): the true experts, each replaced with
    probability 1 - accuracy by a random expert not already in the row."""
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
    rng = np.random.default_rng(seed)
    pred = trace.experts.copy()
    wrong = rng.random(pred.shape) >= accuracy
    for t, l, j in np.argwhere(wrong):
        row = set(pred[t, l].tolist())
        choices = [e for e in range(trace.num_experts) if e not in row]
        if choices:
            pred[t, l, j] = choices[int(rng.integers(len(choices)))]
    return trace.with_predictions(pred, lookahead, unit)


def simple_trace(tokens: int = 200, layers: int = 3, num_experts: int = 16, top_k: int = 2,
                 seed: int = 0, locality: float = 0.5, requests: int = 1,
                 expert_bytes: int = 1000) -> Trace:
    """A small uncalibrated trace for tests and examples: each expert of a token repeats one of
    the previous token's with probability `locality`, else is drawn from a skewed popularity."""
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(num_experts, 0.5), size=layers)
    experts = np.zeros((tokens, layers, top_k), dtype=np.int64)
    for t in range(tokens):
        for l in range(layers):
            row: list[int] = []
            prev = experts[t - 1, l].tolist() if t else []
            while len(row) < top_k:
                if prev and rng.random() < locality:
                    e = int(prev[int(rng.integers(len(prev)))])
                else:
                    e = int(rng.choice(num_experts, p=pop[l]))
                if e not in row:
                    row.append(e)
            experts[t, l] = row
    request = np.arange(tokens) * requests // tokens
    meta = {"num_experts": num_experts, "top_k": top_k, "expert_bytes": expert_bytes,
            "model": "simple"}
    return Trace(experts, request, None, 0, meta)
