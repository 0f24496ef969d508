"""Attention over the paged store.

`ref` holds the plain-PyTorch definition (the oracle the Triton kernels match), `decode` runs
one decode step over a policy's selection, `paged` runs a whole layer (append, attend, evict)
and offers `PagedAttention`, an nn.Module that owns its store.
"""

from kvkit.attention.decode import decode
from kvkit.attention.paged import PagedAttention, attention_step
from kvkit.attention.ref import causal_prefill_ref, sparse_decode_ref
from kvkit.stats import AttentionStats, PrefillStats

__all__ = ["decode", "attention_step", "PagedAttention", "AttentionStats", "PrefillStats", "sparse_decode_ref",
           "causal_prefill_ref"]
