"""KV policies: what each query reads (Selector), what leaves the store (Evictor), and how
pages are stored (Codec), composed per layer and head in a `Policy` and found by name here.

    >>> from kvkit import policies
    >>> policies.names()
    ['dense', 'int8', 'streaming']
    >>> policy = policies.get("streaming", sink=4, window=256)
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from kvkit.policies.base import Codec, Evictor, Policy, Rule, Selector, component
from kvkit.policies.codecs.plain import PlainCodec
from kvkit.policies.codecs.quant import Int8Codec
from kvkit.policies.evictors.none import NoEvictor
from kvkit.policies.evictors.sink_window import SinkWindowEvictor
from kvkit.policies.selectors.full import FullSelector

__all__ = ["Policy", "Rule", "Selector", "Evictor", "Codec", "component", "register", "get", "names",
           "FullSelector", "NoEvictor", "SinkWindowEvictor", "PlainCodec", "Int8Codec"]

_BUILDERS: dict[str, Callable[..., Policy]] = {}


def register(name: str) -> Callable[[Callable[..., Policy]], Callable[..., Policy]]:
    """Decorator: make a policy builder available as `get(name, **params)`. Idempotent."""
    def wrap(builder: Callable[..., Policy]) -> Callable[..., Policy]:
        _BUILDERS[name] = builder
        return builder
    return wrap


def names() -> list[str]:
    """Every registered policy name, sorted."""
    return sorted(_BUILDERS)


def get(name: str, **params: Any) -> Policy:
    """The policy registered as `name`, built with `params`.

    Raises:
        ValueError: unknown name (listing the known ones) or parameters it does not take.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(names())}")
    accepted = list(inspect.signature(_BUILDERS[name]).parameters)
    if unknown := sorted(set(params) - set(accepted)):
        raise ValueError(f"policy {name!r} does not take {unknown}; it takes {accepted}")
    return _BUILDERS[name](**params)


@register("dense")
def dense() -> Policy:
    """Read all, keep all, store K/V as the model computes them. The baseline."""
    return Policy(name="dense")


@register("streaming")
def streaming(sink: int = 4, window: int = 1024) -> Policy:
    """StreamingLLM (arXiv:2309.17453): every head keeps `sink` first and `window` last tokens."""
    return Policy(evictor=SinkWindowEvictor(sink=sink, window=window), name="streaming")


@register("int8")
def int8(group_size: int | None = None) -> Policy:
    """Dense reads over int8 pages with per-token (or per-`group_size`-channel) fp16 scales."""
    return Policy(codec=Int8Codec(group_size=group_size), name="int8")
