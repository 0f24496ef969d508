"""kvkit inside Hugging Face transformers.

    from kvkit.integrations.hf import KVKitCache
    out = model.generate(ids, past_key_values=KVKitCache(model, "streaming"), max_new_tokens=32)

`KVKitCache` is a `transformers.Cache` whose layers write into a `PagedKVStore`; the attention
function registered as "kvkit" reads through the policy. With the "dense" policy the output
equals plain transformers (SDPA).
"""

from kvkit.integrations.hf.cache import KVKitCache, register

__all__ = ["KVKitCache", "register"]
