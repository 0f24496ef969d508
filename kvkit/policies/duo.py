"""DuoAttention (arXiv:2410.10819): retrieval heads keep the whole cache, streaming heads keep
only attention sinks and a recent window.

Which KV heads are retrieval heads is decided offline: `kvkit identify-heads MODEL`
(`kvkit.tools.duo_train`) optimises one gate per KV head in [0, 1] that mixes full and
streaming attention, and writes a *pattern file*. The policy ranks heads by gate and makes the
top `retrieval_ratio` of them (or every head with gate >= `threshold`) retrieval heads; the rest
get a `SinkWindowEvictor` through per-head `Rule`s, so the store really frees their pages.
SmolLM2-135M's pattern ships in `kvkit/data/duo_smollm2.json`.

A pattern file is JSON (never pickle):

    {"format": "kvkit-duo-pattern", "version": 1, "model": "SmolLM2-135M-Instruct",
     "num_layers": 30, "num_kv_heads": 3, "gates": [[g_0_0, g_0_1, g_0_2], ...],
     "sink": 16, "window": 128, "training": {...}}

`gates[layer][head]` are floats in [0, 1]; `sink`/`window` are the streaming shape the gates were
trained for (the policy's defaults); `training` is free-form metadata. Files from elsewhere
(e.g. DuoAttention's own `full_attention_heads.tsv`, converted to this JSON) work as long as
they validate.

Limits: prefill stays dense for every head (DuoAttention also runs streaming heads sparsely in
prefill; here only memory after each prefill chunk and decode reads shrink). The pattern must
match the model's layers and KV heads: the policy keeps the pattern's shape as
`Policy.model_shape`, so `Policy.check_fits` (run by `make_store` and `KVKitCache`) refuses
another model, larger or smaller, even where the rules alone would fit it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from kvkit.errors import ConfigError
from kvkit.policies.base import Policy, Rule, _component_from_config
from kvkit.policies.evictors.sink_window import SinkWindowEvictor
from kvkit.policies.registry import register

__all__ = ["DuoPattern", "load_pattern", "shipped_pattern", "duo", "PATTERN_FORMAT"]

PATTERN_FORMAT = "kvkit-duo-pattern"
SHIPPED = "duo_smollm2.json"
_KEYS = {"format", "version", "model", "num_layers", "num_kv_heads", "gates", "sink", "window", "training"}
_REQUIRED = ("model", "num_layers", "num_kv_heads", "gates", "sink", "window")


@dataclass(frozen=True)
class DuoPattern:
    """Per-(layer, KV head) gates and the streaming shape they were found with."""

    model: str
    num_layers: int
    num_kv_heads: int
    gates: tuple[tuple[float, ...], ...]  # [num_layers][num_kv_heads], each in [0, 1]
    sink: int
    window: int
    training: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"duo pattern: {name} must be an int >= 1, got {v!r}")
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise ConfigError(f"duo pattern: sink must be an int >= 0, got {self.sink!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"duo pattern: model must be a non-empty string, got {self.model!r}")
        gates = self.gates
        if not isinstance(gates, (list, tuple)) or len(gates) != self.num_layers:
            got = len(gates) if isinstance(gates, (list, tuple)) else type(gates).__name__
            raise ConfigError(f"duo pattern: gates must be a list of num_layers={self.num_layers} rows, got {got}")
        rows = []
        for layer, row in enumerate(gates):
            if not isinstance(row, (list, tuple)) or len(row) != self.num_kv_heads:
                raise ConfigError(f"duo pattern: gates[{layer}] must hold num_kv_heads={self.num_kv_heads} "
                                  f"floats, got {row!r}")
            for head, g in enumerate(row):
                if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) \
                        or not 0.0 <= g <= 1.0:
                    raise ConfigError(f"duo pattern: gates[{layer}][{head}] must be a number in [0, 1], got {g!r}")
            rows.append(tuple(float(g) for g in row))
        object.__setattr__(self, "gates", tuple(rows))
        if not isinstance(self.training, dict):
            raise ConfigError(f"duo pattern: training must be a JSON object, got {type(self.training).__name__}")

    # ---- files -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any, source: str = "duo pattern") -> DuoPattern:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: a duo pattern is a JSON object, got {type(d).__name__}")
        if d.get("format", PATTERN_FORMAT) != PATTERN_FORMAT:
            raise ConfigError(f"{source}: format must be {PATTERN_FORMAT!r}, got {d.get('format')!r}")
        if d.get("version", 1) != 1:
            raise ConfigError(f"{source}: version {d.get('version')!r} is not supported (1 is)")
        if missing := [k for k in _REQUIRED if k not in d]:
            raise ConfigError(f"{source}: missing keys {missing}; a pattern has {sorted(_KEYS)}")
        if unknown := sorted(set(d) - _KEYS):
            raise ConfigError(f"{source}: unknown keys {unknown}; a pattern has {sorted(_KEYS)}")
        try:
            return cls(**{k: d[k] for k in _REQUIRED}, training=d.get("training") or {})
        except ConfigError as e:
            raise ConfigError(f"{source}: {str(e).removeprefix('duo pattern: ')}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"format": PATTERN_FORMAT, "version": 1, "model": self.model, "num_layers": self.num_layers,
                "num_kv_heads": self.num_kv_heads, "sink": self.sink, "window": self.window,
                "gates": [[round(g, 6) for g in row] for row in self.gates], "training": self.training}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = ",\n    ".join(json.dumps(r) for r in self.to_dict()["gates"])
        head = {k: v for k, v in self.to_dict().items() if k not in ("gates", "training")}
        text = (json.dumps(head, indent=1)[:-2] + ',\n "gates": [\n    ' + rows + '\n ],\n "training": '
                + json.dumps(self.training, sort_keys=True) + "\n}\n")
        json.loads(text)  # written by hand for one row per layer; make sure it is valid JSON
        path.write_text(text)
        return path

    # ---- choosing heads ----------------------------------------------------------------------
    def retrieval_heads(self, retrieval_ratio: float | None = None,
                        threshold: float | None = None) -> set[tuple[int, int]]:
        """(layer, head) pairs that keep everything: the top `retrieval_ratio` of all KV heads by
        gate (ties: lower layer, then lower head first), or every head with gate >= `threshold`."""
        if (retrieval_ratio is None) == (threshold is None):
            raise ValueError("give exactly one of retrieval_ratio and threshold")
        heads = [(g, layer, h) for layer, row in enumerate(self.gates) for h, g in enumerate(row)]
        if threshold is not None:
            return {(layer, h) for g, layer, h in heads if g >= threshold}
        k = round(retrieval_ratio * len(heads))
        ranked = sorted(heads, key=lambda t: (-t[0], t[1], t[2]))
        return {(layer, h) for _, layer, h in ranked[:k]}

    def check_fits(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise ConfigError unless the pattern was made for this geometry."""
        if (num_layers, num_kv_heads) != (self.num_layers, self.num_kv_heads):
            raise ConfigError(f"duo pattern for {self.model} has {self.num_layers} layers x {self.num_kv_heads} "
                              f"KV heads; the model has {num_layers} x {num_kv_heads}. Run "
                              "`kvkit identify-heads MODEL` for this model")


def load_pattern(path: str | Path) -> DuoPattern:
    """Read and validate a pattern file (JSON only).

    Raises:
        FileNotFoundError: no such file.
        ConfigError: not JSON, or not a valid pattern (says which key and what was expected).
    """
    path = Path(path)
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); a duo pattern is the JSON that "
                          "`kvkit identify-heads` writes") from None
    return DuoPattern.from_dict(d, source=str(path))


def shipped_pattern() -> DuoPattern:
    """SmolLM2-135M-Instruct's pattern, shipped in `kvkit/data/duo_smollm2.json`."""
    text = resources.files("kvkit").joinpath("data", SHIPPED).read_text()
    return DuoPattern.from_dict(json.loads(text), source=f"kvkit/data/{SHIPPED}")


@register("duo")
def duo(pattern: str | None = None, retrieval_ratio: float | None = None, threshold: float | None = None,
        sink: int | None = None, window: int | None = None, retrieval_selector: dict | None = None,
        retrieval_evictor: dict | None = None, codec: dict | None = None) -> Policy:
    """DuoAttention (arXiv:2410.10819): retrieval heads keep all, streaming heads sink + window.

    pattern: a pattern file (None: SmolLM2's shipped one). retrieval_ratio / threshold: which
    heads are retrieval heads (default: the top 25% by gate). sink / window: the streaming heads'
    shape (default: the pattern's). retrieval_selector / retrieval_evictor: component configs
    (e.g. `{"type": "quest", "budget": 1024}`) for the retrieval heads; codec: a codec config for
    every layer (e.g. `{"type": "int8"}`), so one JSON config declares a whole composition.
    """
    pat = shipped_pattern() if pattern is None else load_pattern(pattern)
    if retrieval_ratio is None and threshold is None:
        retrieval_ratio = 0.25
    if retrieval_ratio is not None and (isinstance(retrieval_ratio, bool) or
                                        not isinstance(retrieval_ratio, (int, float)) or
                                        not 0.0 <= retrieval_ratio <= 1.0):
        raise ValueError(f"duo: retrieval_ratio must be in [0, 1], got {retrieval_ratio!r}")
    if threshold is not None and (not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0):
        raise ValueError(f"duo: threshold must be in [0, 1], got {threshold!r}")
    retrieval = pat.retrieval_heads(retrieval_ratio, threshold)
    streaming = SinkWindowEvictor(sink=pat.sink if sink is None else sink,
                                  window=pat.window if window is None else window)
    rules = []
    for head in range(pat.num_kv_heads):
        layers = tuple(layer for layer in range(pat.num_layers) if (layer, head) not in retrieval)
        if layers:
            # Only the evictor differs: a retrieval_selector also serves the streaming heads of a
            # layer (one call per layer, so GQA groups stay whole); with a budget >= sink + window
            # it reads everything they hold.
            rules.append(Rule(layers=layers, heads=(head,), evictor=streaming))
    kwargs: dict[str, Any] = {}
    for role, cfg in (("selector", retrieval_selector), ("evictor", retrieval_evictor), ("codec", codec)):
        if cfg is not None:
            kwargs[role] = _component_from_config(role, cfg)
    return Policy(**kwargs, rules=tuple(rules), name="duo", model_shape=(pat.num_layers, pat.num_kv_heads))
