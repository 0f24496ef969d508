"""The one registry of named policies: `register(name)`, `get(name, **params)`, `names()`."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from kvkit.policies.base import Policy

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


def builder(name: str) -> Callable[..., Policy]:
    """The builder function registered as `name` (its docstring describes the policy)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(names())}")
    return _BUILDERS[name]


def get(name: str, **params: Any) -> Policy:
    """The policy registered as `name`, built with `params`.

    Raises:
        ValueError: unknown name (listing the known ones) or parameters it does not take.
    """
    build = builder(name)
    accepted = list(inspect.signature(build).parameters)
    if unknown := sorted(set(params) - set(accepted)):
        raise ValueError(f"policy {name!r} does not take {unknown}; it takes {accepted}")
    return build(**params)


def describe(name: str) -> dict[str, Any]:
    """`{"name", "description", "params"}` of a registered policy: the first sentence of its
    builder's docstring, and each parameter with its default (None where it has none).

    Raises:
        ValueError: unknown name (listing the known ones).
    """
    build = builder(name)
    paragraph = " ".join((inspect.getdoc(build) or "").split("\n\n")[0].split())
    head, sep, _ = paragraph.partition(". ")
    params = {p.name: None if p.default is inspect.Parameter.empty else p.default
              for p in inspect.signature(build).parameters.values()}
    return {"name": name, "description": head + ("." if sep else ""), "params": params}
