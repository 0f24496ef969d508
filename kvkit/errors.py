"""Errors a caller of kvkit may want to catch. Caller mistakes raise ValueError/TypeError."""


class KVKitError(Exception):
    """Base class of the conditions kvkit reports that a caller may handle."""


class OutOfPages(KVKitError):
    """The page pool of a layer cannot hold what was asked; the store is unchanged."""


class UnknownSequence(KVKitError, KeyError):
    """A sequence id that the store does not hold (never added, or already freed)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class ConfigError(KVKitError, ValueError):
    """A policy config (dict, JSON file) that cannot be used as it is."""
