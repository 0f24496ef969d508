"""What each decoder layer runs in kvkit's vLLM backend: its index in vLLM's layer name, its
selector (full, or a page selector the virtual batch runs), the sub-page size of its key bounds,
and the policy of this process. Shared by the builder (metadata.py), the impl (impl.py), the
memory planning (memory.py) and the streaming specs (streaming.py); it imports none of them.
"""

from __future__ import annotations

import re

from kvkit.policies import FullSelector, Policy
from kvkit.policies.selectors.quest import LServeSelector, QuestSelector
from kvkit.integrations.vllm import plugin

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def current_policy() -> Policy:
    """The policy this process runs: the one `plugin.register()` installed, else the one
    `$KVKIT_POLICY` names, else dense."""
    policy = plugin.active_policy()
    if policy is None:  # a process where the backend was registered but register() did not run
        policy = plugin.load_policy() or Policy(name="dense")
    return policy


def layer_index(layer_name: str) -> int:
    """The decoder layer index in a vLLM layer name (`model.layers.7.self_attn.attn` -> 7)."""
    m = _LAYER_RE.search(layer_name)
    if m is None:
        raise ValueError(f"kvkit: cannot find a layer index in vLLM layer name {layer_name!r}")
    return int(m.group(1))


PageSelector = QuestSelector | LServeSelector  # the selectors the virtual batch runs


def layer_selector(policy: Policy, layer: int, num_kv_heads: int) -> FullSelector | PageSelector:
    groups = policy.selectors(layer, num_kv_heads)
    if len(groups) != 1:  # plugin.check_supported rejects per-head selector rules
        raise NotImplementedError("kvkit's vLLM backend needs one selector per layer")
    return groups[0][0]


SUB_PAGE = 8  # tokens per sub-page when the policy names no page size: see sub_page_size


def sub_page_size(policy: Policy, block_size: int) -> int:
    """Tokens per sub-page of the key bounds in a vLLM block: the policy's page size (8 when it
    names none) when it divides the block size, else the whole block.

    8, not kvkit's default page of 16: on SmolLM2 at 7.2K tokens and a 1K budget, lserve in vLLM
    kept 5/6 needles with 16-token sub-pages and 6/6 with 8-token ones (NOTES.md)."""
    sub = policy.page_size or SUB_PAGE
    if sub >= block_size or block_size % sub:
        return block_size
    return sub

