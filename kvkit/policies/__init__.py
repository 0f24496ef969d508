"""KV policies: what each query reads (Selector), what leaves the store (Evictor), and how
pages are stored (Codec), composed per layer and head in a `Policy` and found by name here.

    >>> from kvkit import policies
    >>> policy = policies.get("streaming", sink=4, window=256)
    >>> "quest" in policies.names()
    True

`names()` lists every registered policy (each built-in module below registers its own on
import); `describe(name)` and `kvkit policies` give each one's parameters and defaults.
"""

from __future__ import annotations

from kvkit.policies.base import Codec, Evictor, Policy, Rule, Selector, component
from kvkit.policies.registry import describe, get, names, register

# Every built-in module registers its components and policies on import, so names() is complete.
from kvkit.policies import builtin  # noqa: E402,F401  (dense, streaming, int8)
from kvkit.policies.codecs.plain import PlainCodec  # noqa: E402
from kvkit.policies.codecs.quant import Int8Codec  # noqa: E402
from kvkit.policies.evictors.none import NoEvictor  # noqa: E402
from kvkit.policies.evictors.sink_window import SinkWindowEvictor  # noqa: E402
from kvkit.policies.selectors.full import FullSelector  # noqa: E402
# -- more built-in policy modules: one import line each, below --
from kvkit.policies.selectors import quest as _quest  # noqa: E402,F401  (quest, lserve)
from kvkit.policies.selectors import tidal as _tidal  # noqa: E402,F401  (tidal)
from kvkit.policies.evictors import h2o as _h2o  # noqa: E402,F401  (h2o, a2sf)
from kvkit.policies import duo as _duo  # noqa: E402,F401  (duo: DuoAttention heads)
from kvkit.policies.codecs import gear as _gear  # noqa: E402,F401  (gear, kivi)
from kvkit.policies.codecs import cskv as _cskv  # noqa: E402,F401  (cskv)

__all__ = ["Policy", "Rule", "Selector", "Evictor", "Codec", "component", "register", "get", "names", "describe",
           "FullSelector", "NoEvictor", "SinkWindowEvictor", "PlainCodec", "Int8Codec"]
