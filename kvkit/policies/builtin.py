"""The foundation's named policies: dense, streaming, int8."""

from __future__ import annotations

from kvkit.policies.base import Policy
from kvkit.policies.codecs.quant import Int8Codec
from kvkit.policies.evictors.sink_window import SinkWindowEvictor
from kvkit.policies.registry import register


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
