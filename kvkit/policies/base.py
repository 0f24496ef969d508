"""The three roles a policy composes, and the Policy that composes them per layer and head.

- A **Selector** picks, at each decode step, the pages each KV head reads.
- An **Evictor** frees slots after each step so the store stays within its budget.
- A **Codec** decides how a page's K and V are stored (it is the store's page format).

A `Policy` has a default of each role plus `rules` that override them for some layers and/or KV
heads (DuoAttention's streaming heads, dense first layers, a codec on some layers). Every
component is a frozen dataclass registered under a short `type` name, so a policy round-trips
through plain JSON: `Policy.from_config(policy.to_config()) == policy`.

Shapes: B sequences, Hq/Hkv query/KV heads, G = Hq // Hkv, P pages, S page_size, D head_dim.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from kvkit.errors import ConfigError
from kvkit.policies.codecs.plain import PlainCodec
from kvkit.policies.evictors.none import NoEvictor
from kvkit.policies.registry import get as get_policy
from kvkit.policies.roles import COMPONENTS, Codec, Evictor, Selector, component
from kvkit.policies.selectors.full import FullSelector
from kvkit.store import DEFAULT_PAGE_SIZE, PagedKVStore, Selection

if TYPE_CHECKING:
    from kvkit.stats import AttentionStats

__all__ = ["Policy", "Rule", "Selector", "Evictor", "Codec", "component"]

def _component_config(obj: Any) -> dict[str, Any]:
    return {"type": obj.type_name, **{f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}}


def _component_from_config(role: str, cfg: Any) -> Any:
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ConfigError(f"a {role} config must be a dict with a 'type' key, got {cfg!r}")
    known = COMPONENTS[role]
    cls = known.get(cfg["type"])
    if cls is None:
        raise ConfigError(f"unknown {role} type {cfg['type']!r}; known: {', '.join(sorted(known))}")
    params = {k: v for k, v in cfg.items() if k != "type"}
    fields = [f.name for f in dataclasses.fields(cls)]
    if unknown := sorted(set(params) - set(fields)):
        raise ConfigError(f"{role} {cfg['type']!r} does not take {unknown}; it takes {fields}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad {role} {cfg['type']!r} config {params}: {e}") from e


@dataclass(frozen=True)
class Rule:
    """Override some roles for some layers and/or KV heads (None: all of them)."""

    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    selector: Selector | None = None
    evictor: Evictor | None = None
    codec: Codec | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "heads"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(value)
                if not all(isinstance(i, int) and i >= 0 for i in value):
                    raise ValueError(f"Rule.{name} must be non-negative ints, got {value!r}")
                object.__setattr__(self, name, value)
        if self.codec is not None and self.heads is not None:
            raise ValueError("a codec applies to whole layers (a layer's pages share one pool); "
                             "drop `heads` from a rule that sets a codec")

    def matches(self, layer: int, head: int) -> bool:
        return ((self.layers is None or layer in self.layers)
                and (self.heads is None or head in self.heads))


@dataclass(frozen=True)
class Policy:
    """A Selector, an Evictor and a Codec, with per-layer/per-head overrides.

    Build one by name (`kvkit.policies.get("streaming", window=512)`), from a config
    (`Policy.from_config(d)`), or directly:

        Policy(evictor=SinkWindowEvictor(sink=4, window=256),
               rules=(Rule(layers=(0, 1), evictor=NoEvictor()),))
    """

    selector: Selector = field(default_factory=FullSelector)
    evictor: Evictor = field(default_factory=NoEvictor)
    codec: Codec = field(default_factory=PlainCodec)
    rules: tuple[Rule, ...] = ()
    name: str = "custom"
    page_size: int | None = None  # tokens per page this policy was tuned for; None: the caller's
    # (num_layers, num_kv_heads) of the one model this policy was made for (a duo pattern's);
    # None: any model whose layers and heads its rules name.
    model_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        if self.model_shape is not None:
            shape = tuple(self.model_shape) if isinstance(self.model_shape, (list, tuple)) else ()
            if len(shape) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                          for n in shape):
                raise ValueError("Policy.model_shape must be (num_layers, num_kv_heads), two ints >= 1, "
                                 f"or None; got {self.model_shape!r}")
            object.__setattr__(self, "model_shape", shape)
        if self.page_size is not None and (not isinstance(self.page_size, int) or self.page_size < 1):
            raise ValueError(f"Policy.page_size must be a positive int or None, got {self.page_size!r}")
        for role, base in (("selector", Selector), ("evictor", Evictor), ("codec", Codec)):
            if not isinstance(getattr(self, role), base):
                raise TypeError(f"Policy.{role} must be a {base.__name__}, got {getattr(self, role)!r}")

    # ---- resolution per layer and head -------------------------------------------------------
    def _resolve(self, role: str, layer: int, head: int) -> Any:
        chosen = getattr(self, role)
        for rule in self.rules:
            if getattr(rule, role) is not None and rule.matches(layer, head):
                chosen = getattr(rule, role)
        return chosen

    def _groups(self, role: str, layer: int, num_kv_heads: int) -> list[tuple[Any, list[int]]]:
        """The components of `role` in `layer` and the KV heads each serves; cached per policy,
        since every layer of every decode step asks (a Policy is frozen; hashing it costs more
        than the lookup). Callers must not mutate the lists."""
        key = (role, layer, num_kv_heads)
        groups = self._group_cache.get(key)
        if groups is None:
            groups = self._group_cache[key] = _head_groups(self, role, layer, num_kv_heads)
        return groups

    @functools.cached_property
    def _group_cache(self) -> dict[tuple[str, int, int], list[tuple[Any, list[int]]]]:
        return {}

    def selectors(self, layer: int, num_kv_heads: int) -> list[tuple[Selector, list[int]]]:
        """The selectors of `layer` and the KV heads each one serves."""
        return self._groups("selector", layer, num_kv_heads)

    def reads_everything(self, layer: int, num_kv_heads: int) -> bool:
        """Whether every KV head of `layer` reads all it holds (one `FullSelector`) and nothing
        is evicted: decode can then read the store as it is (`kvkit.attention.decode.decode_in_place`)."""
        groups = self.selectors(layer, num_kv_heads)
        return len(groups) == 1 and type(groups[0][0]) is FullSelector and not self.evicts

    def evictors(self, layer: int, num_kv_heads: int) -> list[tuple[Evictor, list[int]]]:
        return self._groups("evictor", layer, num_kv_heads)

    def codec_for(self, layer: int) -> Codec:
        return self._resolve("codec", layer, 0)

    def components(self) -> list[Any]:
        rules = [c for r in self.rules for c in (r.selector, r.evictor, r.codec) if c is not None]
        return [self.selector, self.evictor, self.codec, *rules]

    @functools.cached_property
    def evicts(self) -> bool:
        """Whether any evictor of this policy can free tokens (anything but `NoEvictor`)."""
        return any(isinstance(c, Evictor) and not isinstance(c, NoEvictor) for c in self.components())

    @functools.cached_property
    def needs_attention(self) -> bool:
        """Whether an evictor of this policy scores by attention (decode returns statistics)."""
        return any(isinstance(c, Evictor) and c.needs_attention for c in self.components())

    def resolve_page_size(self, page_size: int | None = None) -> int:
        """The page size a store for this policy gets: the caller's if given, else the policy's
        own (`quest` is tuned for 8-token pages), else `DEFAULT_PAGE_SIZE`."""
        if page_size is not None:
            return page_size
        return self.page_size if self.page_size is not None else DEFAULT_PAGE_SIZE

    def check_fits(self, num_layers: int, num_kv_heads: int) -> None:
        """Check this policy against a model (or store) of `num_layers` layers and `num_kv_heads` KV heads.

        A rule naming a layer or head the model lacks would be silently ignored, and a policy
        made for one model (`model_shape`, e.g. duo's head pattern) would put its streaming heads
        on the wrong heads of another, so both are refused.

        Raises:
            ConfigError: naming the rule (or the policy's shape), the offending value and the model's.
        """
        model = f"the model has {num_layers} layers x {num_kv_heads} KV heads"
        if self.model_shape is not None and self.model_shape != (num_layers, num_kv_heads):
            layers, heads = self.model_shape
            raise ConfigError(f"policy {self.name!r} was made for {layers} layers x {heads} KV heads; {model}. "
                              "Build the policy for this model (duo: a pattern from `kvkit identify-heads MODEL`)")
        for i, rule in enumerate(self.rules):
            for axis, limit in (("layers", num_layers), ("heads", num_kv_heads)):
                if beyond := [j for j in getattr(rule, axis) or () if j >= limit]:
                    raise ConfigError(f"policy {self.name!r} rules[{i}].{axis} names {max(beyond)}, but {model} "
                                      f"(indices from 0); fix or drop that rule")

    def make_store(self, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int | None = None,
                   dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                   max_pages: int | None = None) -> PagedKVStore:
        """A store laid out for this policy: its codecs per layer, the summaries its parts need.
        `page_size` None: `resolve_page_size()`.

        Raises:
            ConfigError: the policy does not fit `num_layers` x `num_kv_heads` (`check_fits`).
        """
        self.check_fits(num_layers, num_kv_heads)
        return PagedKVStore(
            num_layers, num_kv_heads, head_dim, page_size=self.resolve_page_size(page_size), dtype=dtype, device=device,
            page_format=[self.codec_for(layer) for layer in range(num_layers)], max_pages=max_pages,
            key_bounds=any(isinstance(c, Selector) and c.needs_key_bounds for c in self.components()),
            slot_scores=any(isinstance(c, Evictor) and c.needs_attention for c in self.components()),
        )

    # ---- the two steps around attention ------------------------------------------------------
    def select(self, store: PagedKVStore, seqs: Sequence[int], layer: int, q: torch.Tensor) -> Selection:
        """Pages every KV head of `layer` reads: `[B, Hkv, P]`, merged from the head groups."""
        groups = self.selectors(layer, store.num_kv_heads)
        if len(groups) == 1:
            return groups[0][0].select(store, seqs, layer, q, groups[0][1])
        G = q.shape[1] // store.num_kv_heads
        B, D = q.shape[0], q.shape[-1]
        qh = q.view(B, store.num_kv_heads, G, D)  # each selector sees only its heads' queries
        parts = [(heads, sel.select(store, seqs, layer, qh[:, heads].reshape(B, -1, D), heads))
                 for sel, heads in groups]
        width = max(s.pages.shape[-1] for _, s in parts)
        pages = torch.full((len(seqs), store.num_kv_heads, width), -1, dtype=torch.int64, device=q.device)
        masked = any(s.slot_mask is not None for _, s in parts)
        mask = (torch.ones(*pages.shape, store.page_size, dtype=torch.bool, device=q.device)
                if masked else None)
        for heads, s in parts:
            n = s.pages.shape[-1]
            pages[:, heads, :n] = s.pages
            if mask is not None and s.slot_mask is not None:
                mask[:, heads, :n] = s.slot_mask
        return Selection(pages, mask)

    def evict(self, store: PagedKVStore, seqs: Sequence[int], layer: int,
              stats: AttentionStats | None) -> int:
        """Run the evictors of `layer`; returns tokens evicted."""
        return sum(ev.step(store, seqs, layer, heads, stats)
                   for ev, heads in self.evictors(layer, store.num_kv_heads))

    # ---- configs -----------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """Plain JSON-able dict; `Policy.from_config` turns it back into an equal Policy."""
        rules = []
        for r in self.rules:
            d: dict[str, Any] = {"layers": list(r.layers) if r.layers is not None else None,
                                 "heads": list(r.heads) if r.heads is not None else None}
            for role in ("selector", "evictor", "codec"):
                if getattr(r, role) is not None:
                    d[role] = _component_config(getattr(r, role))
            rules.append(d)
        return {"name": self.name, "selector": _component_config(self.selector),
                "evictor": _component_config(self.evictor), "codec": _component_config(self.codec),
                "rules": rules, "page_size": self.page_size,
                **({"model_shape": list(self.model_shape)} if self.model_shape is not None else {})}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Policy:
        """Build a policy from `to_config()` output, or from `{"name": ..., "params": {...}}`.

        Raises ConfigError naming the offending key and the accepted ones.
        """
        if not isinstance(cfg, dict):
            raise ConfigError(f"a policy config must be a dict, got {type(cfg).__name__}")
        if "params" in cfg or set(cfg) == {"name"}:
            if unknown := sorted(set(cfg) - {"name", "params"}):
                raise ConfigError(f"policy config by name takes 'name' and 'params', not {unknown}")
            try:
                return get_policy(cfg["name"], **(cfg.get("params") or {}))
            except (TypeError, ValueError) as e:
                raise ConfigError(str(e)) from e
        known = {"name", "selector", "evictor", "codec", "rules", "page_size", "model_shape"}
        if unknown := sorted(set(cfg) - known):
            raise ConfigError(f"policy config does not take {unknown}; it takes {sorted(known)}")
        kwargs: dict[str, Any] = {role: _component_from_config(role, cfg[role])
                                  for role in ("selector", "evictor", "codec") if role in cfg}
        rules = []
        for i, r in enumerate(cfg.get("rules") or []):
            if not isinstance(r, dict):
                raise ConfigError(f"rules[{i}] must be a dict, got {r!r}")
            rule_known = {"layers", "heads", "selector", "evictor", "codec"}
            if unknown := sorted(set(r) - rule_known):
                raise ConfigError(f"rules[{i}] does not take {unknown}; it takes {sorted(rule_known)}")
            parts = {role: _component_from_config(role, r[role])
                     for role in ("selector", "evictor", "codec") if r.get(role) is not None}
            try:
                rules.append(Rule(layers=r.get("layers"), heads=r.get("heads"), **parts))
            except ValueError as e:
                raise ConfigError(f"rules[{i}]: {e}") from e
        try:
            return cls(**kwargs, rules=tuple(rules), name=str(cfg.get("name", "custom")),
                       page_size=cfg.get("page_size"), model_shape=cfg.get("model_shape"))
        except ValueError as e:
            raise ConfigError(str(e)) from e

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        """Read a JSON policy config (never pickle) and validate it.

        Raises:
            ConfigError: naming `path`, when it is not UTF-8 JSON, is nested too deep for Python's
                parser, or is not a valid policy config.
        """
        try:
            cfg = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); a policy file is a JSON object "
                              "as written by `policy.to_config()`") from e
        except RecursionError:
            raise ConfigError(f"{path} is nested too deep to parse; a policy file is a JSON object "
                              "a few levels deep, as written by `policy.to_config()`") from None
        return cls.from_config(cfg)


def _head_groups(policy: Policy, role: str, layer: int, num_kv_heads: int) -> list[tuple[Any, list[int]]]:
    """The components of `role` in `layer` and the KV heads each serves (see `Policy._groups`).
    Equal components are one group, whichever rules they come from: a tuned policy writes one rule
    per (KV head, window), and a layer whose heads all stream alike is then one streaming layer."""
    groups: list[tuple[Any, list[int]]] = []
    for head in range(num_kv_heads):
        comp = policy._resolve(role, layer, head)
        same = next((heads for c, heads in groups if c is comp or c == comp), None)
        if same is None:
            groups.append((comp, [head]))
        else:
            same.append(head)
    return groups
