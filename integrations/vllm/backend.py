"""kvkit's vLLM CPU attention backend: vLLM's Backend / MetadataBuilder / Impl split, each a
subclass of vLLM's CPU_ATTN class, one module each.

- `KVKitCPUAttentionBackend` (here) names the two classes below and otherwise is CPU_ATTN.
- `metadata.KVKitCPUAttentionMetadataBuilder`: per step, the stock metadata plus what all layers
  share (the virtual batch of the decode rows, the listed pages and their forcing, LServe's
  refresh rows, trimmed and compacted block tables).
- `impl.KVKitCPUAttentionImpl`: per layer call, the KV write (plus the key boxes the page choice
  scores) and the attention: the chosen pages (`kvkit.scoring` through `selection.py`), the
  streaming layers' sink and window blocks, or the blocks a score evictor kept.
- `layers.py`: what each layer runs (its selector, its sub-page size), below all of them.

Page selection (quest, lserve), streaming layers and score eviction are described in the
modules that run them and in NOTES.md.
"""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from kvkit.integrations.vllm.impl import KVKitCPUAttentionImpl
from kvkit.integrations.vllm.metadata import KVKitCPUAttentionMetadataBuilder


class KVKitCPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU_ATTN backend with kvkit's builder and impl; its name stays CPU_ATTN."""

    @staticmethod
    def get_impl_cls() -> type[KVKitCPUAttentionImpl]:
        return KVKitCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVKitCPUAttentionMetadataBuilder]:
        return KVKitCPUAttentionMetadataBuilder
