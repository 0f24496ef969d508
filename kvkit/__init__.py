"""kvkit: long-context KV-cache management.

The store owns pages of K and V; selectors choose what a query reads; evictors free slots;
codecs decide how a page is stored; `attention` runs over whatever the policy kept.

    >>> from kvkit import PagedKVStore, policies, attention
"""

from kvkit import attention, policies
from kvkit.errors import ConfigError, KVKitError, OutOfPages, UnknownSequence
from kvkit.store import PagedKVStore, Selection, StoreStats

__version__ = "0.1.0"
__all__ = ["PagedKVStore", "Selection", "StoreStats", "policies", "attention", "KVKitError",
           "OutOfPages", "UnknownSequence", "ConfigError"]
