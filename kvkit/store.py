"""The paged KV store: pages of K and V per layer, page tables per (sequence, layer, KV head).

A *page* holds `page_size` token slots of K and V for one layer and one KV head. Each layer owns
a pool of pages that grows on demand (up to `max_pages`); a sequence owns, per layer and KV head,
a list of pages (its page table) plus the free slots inside them. Heads may keep different
tokens, so streaming heads can hold a few pages while retrieval heads hold all.

Every slot records the position of the token it holds (`-1` when empty). RoPE is applied before
caching, so attention does not care where a token sits; eviction frees single slots and the next
append reuses them. Pages are reference counted: `fork` shares them (prefix sharing, beams) and
a write to a shared page copies it first.

How a page's bytes are laid out is the business of a *page format* (a Codec of
`kvkit.policies`): it makes a `PageStorage` per layer. The store itself keeps plain tensors with
`DenseStorage` and knows nothing of policies.

Shapes: T tokens, H num_kv_heads, D head_dim, S page_size, N pages in a layer's pool,
P pages in a list, B sequences.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

import numpy as np
import torch

from kvkit.errors import OutOfPages, UnknownSequence

# the key bounds (here and in the vLLM backend) fold new keys in with index_reduce_, whose "beta"
# notice would otherwise greet every user's first decode; its behaviour is pinned by our tests
warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta", category=UserWarning)

__all__ = [
    "PagedKVStore", "PageStorage", "PageFormat", "DenseStorage", "PlainFormat", "Selection",
    "StoreStats", "DEFAULT_PAGE_SIZE",
]

DEFAULT_PAGE_SIZE = 16  # tokens per page unless the caller or the policy says otherwise


class PageStorage(Protocol):
    """The bytes of one layer's page pool, as a page format lays them out."""

    def grow(self, num_pages: int) -> None:
        """Make room for `num_pages` pages in all; existing pages keep their content."""

    def write(self, pages: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store tokens: pages, slots `[n]` int64; k, v `[n, D]`."""

    def read(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `pages` `[P]`, each `[P, S, D]`, in the compute dtype. Empty slots hold junk."""

    def copy_page(self, src: int, dst: int) -> None:
        """Copy page `src` onto page `dst` (copy-on-write of shared pages)."""

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this storage allocated, for byte accounting."""


class PageFormat(Protocol):
    """Anything that can make a layer's PageStorage (the Codecs of kvkit.policies)."""

    def make_storage(self, page_size: int, head_dim: int, dtype: torch.dtype,
                     device: torch.device) -> PageStorage: ...


class DenseStorage:
    """K and V kept as they come: two `[N, S, D]` tensors of one dtype."""

    def __init__(self, page_size: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.k = torch.empty(0, page_size, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    def grow(self, num_pages: int) -> None:
        extra = num_pages - self.k.shape[0]
        pad = self.k.new_zeros(extra, *self.k.shape[1:])
        self.k = torch.cat([self.k, pad])
        self.v = torch.cat([self.v, pad])

    def write(self, pages: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[pages, slots] = k.to(self.k.dtype)
        self.v[pages, slots] = v.to(self.v.dtype)

    def read(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[pages], self.v[pages]

    def copy_page(self, src: int, dst: int) -> None:
        self.k[dst] = self.k[src]
        self.v[dst] = self.v[src]

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]


@dataclass(frozen=True)
class PlainFormat:
    """Store K and V in `dtype` (None: the dtype of the appended tensors)."""

    dtype: torch.dtype | None = None

    def make_storage(self, page_size: int, head_dim: int, dtype: torch.dtype,
                     device: torch.device) -> DenseStorage:
        return DenseStorage(page_size, head_dim, self.dtype or dtype, device)


@dataclass
class Selection:
    """The pages each (sequence, KV head) reads in one decode step of one layer.

    pages: `[B, H, P]` int64 page ids into the layer's pool, `-1` where a list is shorter.
    slot_mask: optional `[B, H, P, S]` bool, to read only some tokens of a page (token-level
        selection); empty slots are masked out by the store in any case.
    """

    pages: torch.Tensor
    slot_mask: torch.Tensor | None = None

    @property
    def num_pages(self) -> torch.Tensor:
        """Pages selected per (sequence, head): `[B, H]`."""
        return (self.pages >= 0).sum(-1)


@dataclass(frozen=True)
class StoreStats:
    """What the store holds now. Bytes are those of tensors really allocated."""

    pages_capacity: int          # pages allocated in all pools
    pages_used: int              # pages owned by at least one sequence
    pages_free: int
    tokens_resident: int         # occupied slots, summed over sequences, layers and KV heads
    nbytes: int                  # == store.nbytes()
    nbytes_dense_equivalent: int  # bf16 K+V of every token appended to the live sequences


@dataclass
class _HeadTable:
    """One (sequence, layer, KV head): its pages and the free slots inside them (flat ids)."""

    pages: list[int] = field(default_factory=list)
    free_slots: list[int] = field(default_factory=list)  # page * S + slot, used front first

    def resident(self, page_size: int) -> int:
        """Tokens held: every slot of its pages but the free ones."""
        return len(self.pages) * page_size - len(self.free_slots)


@dataclass
class _SeqLayer:
    length: int                  # positions appended so far; the next token gets this one
    heads: list[_HeadTable]


class _Pool:
    """One layer's pages: storage plus per-slot positions and per-page metadata."""

    def __init__(self, storage: PageStorage, page_size: int, head_dim: int, device: torch.device,
                 key_bounds: bool, slot_scores: bool, bounds_dtype: torch.dtype = torch.float32):
        self.storage = storage
        self.capacity = 0
        self.slot_pos = torch.empty(0, page_size, dtype=torch.int32, device=device)
        self.refcount = [0] * 0
        self.free_pages: list[int] = []
        self.key_min = torch.empty(0, head_dim, dtype=bounds_dtype, device=device) if key_bounds else None
        self.key_max = torch.empty(0, head_dim, dtype=bounds_dtype, device=device) if key_bounds else None
        self.scores = torch.empty(0, page_size, device=device) if slot_scores else None

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        self.storage.grow(capacity)
        self.slot_pos = torch.cat([self.slot_pos, self.slot_pos.new_full((extra, self.slot_pos.shape[1]), -1)])
        self.refcount.extend([0] * extra)
        # lowest new ids at the end of the stack, so they are used first
        self.free_pages[:0] = range(capacity - 1, self.capacity - 1, -1)
        if self.key_min is not None:
            self.key_min = torch.cat([self.key_min, self.key_min.new_full((extra, self.key_min.shape[1]), math.inf)])
            self.key_max = torch.cat([self.key_max, self.key_max.new_full((extra, self.key_max.shape[1]), -math.inf)])
        if self.scores is not None:
            self.scores = torch.cat([self.scores, self.scores.new_zeros(extra, self.scores.shape[1])])
        self.capacity = capacity

    def take_page(self) -> int:
        page = self.free_pages.pop()
        self.refcount[page] = 1
        return page

    def release(self, page: int) -> None:
        self.refcount[page] -= 1
        if self.refcount[page] == 0:
            self.slot_pos[page] = -1
            if self.key_min is not None:
                self.key_min[page] = math.inf
                self.key_max[page] = -math.inf
            self.free_pages.append(page)

    def copy_page(self, src: int, dst: int) -> None:
        self.storage.copy_page(src, dst)
        self.slot_pos[dst] = self.slot_pos[src]
        if self.key_min is not None:
            self.key_min[dst] = self.key_min[src]
            self.key_max[dst] = self.key_max[src]
        if self.scores is not None:
            self.scores[dst] = self.scores[src]

    def tensors(self) -> list[torch.Tensor]:
        extra = [t for t in (self.key_min, self.key_max, self.scores) if t is not None]
        return [*self.storage.tensors(), self.slot_pos, *extra]


class PagedKVStore:
    """Pages of K and V for `num_layers` layers of `num_kv_heads` heads.

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention geometry.
        page_size: token slots per page.
        dtype: the compute dtype K and V are read back in (and stored in, for the plain format).
        page_format: one PageFormat for all layers, or one per layer (default: plain `dtype`).
        max_pages: cap on each layer's pool; None grows without bound. Appends beyond it raise
            `OutOfPages` and change nothing.
        key_bounds: keep per-page min/max of keys (for page-scoring selectors such as Quest), in
            `dtype`: keys are bounded as they read back (rounded to `dtype`), so the bounds are
            exact there, and cost 2/page_size of the key bytes, as in Quest.
        slot_scores: keep a float32 score per slot (for score-based evictors such as H2O).

    Example:
        >>> store = PagedKVStore(num_layers=2, num_kv_heads=3, head_dim=64, page_size=16)
        >>> seq = store.add_sequence()
        >>> store.append(seq, 0, torch.randn(20, 3, 64), torch.randn(20, 3, 64))
        >>> store.page_table(seq, 0, 0)
        [0, 1]
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int = DEFAULT_PAGE_SIZE,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 page_format: PageFormat | Sequence[PageFormat] | None = None,
                 max_pages: int | None = None, key_bounds: bool = False, slot_scores: bool = False):
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("page_size", page_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PagedKVStore.{name} must be an int >= 1, got {value!r}")
        if max_pages is not None and (not isinstance(max_pages, int) or max_pages < 1):
            raise ValueError(f"PagedKVStore.max_pages must be None or an int >= 1, got {max_pages!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"PagedKVStore.dtype must be a floating dtype, got {dtype}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size, self.dtype, self.device = page_size, dtype, torch.device(device)
        self.max_pages = max_pages
        formats = page_format if isinstance(page_format, (list, tuple)) else [page_format] * num_layers
        if len(formats) != num_layers:
            raise ValueError(f"got {len(formats)} page formats for {num_layers} layers; give one or one per layer")
        self._pools = [
            _Pool((fmt or PlainFormat()).make_storage(page_size, head_dim, dtype, self.device),
                  page_size, head_dim, self.device, key_bounds, slot_scores, bounds_dtype=dtype)
            for fmt in formats
        ]
        self._seqs: dict[int, list[_SeqLayer]] = {}
        self._policy_state: dict[int, dict] = {}
        self._next_seq = 0

    # ---- sequences -------------------------------------------------------------------------
    def add_sequence(self) -> int:
        """Start an empty sequence; returns its id."""
        seq = self._next_seq
        self._next_seq += 1
        self._seqs[seq] = [_SeqLayer(0, [_HeadTable() for _ in range(self.num_kv_heads)])
                           for _ in range(self.num_layers)]
        self._policy_state[seq] = {}
        return seq

    def fork(self, seq: int) -> int:
        """A new sequence sharing every page of `seq` (copied on the first write to either)."""
        src = self._seq(seq)
        child = self._next_seq
        self._next_seq += 1
        self._seqs[child] = [
            _SeqLayer(sl.length, [_HeadTable(list(h.pages), list(h.free_slots)) for h in sl.heads])
            for sl in src
        ]
        for pool, sl in zip(self._pools, src):
            for head in sl.heads:
                for page in head.pages:
                    pool.refcount[page] += 1
        self._policy_state[child] = dict(self._policy_state[seq])
        return child

    def free(self, seq: int) -> None:
        """Drop a sequence; pages no other sequence shares go back to their pools."""
        layers = self._seq(seq)
        for pool, sl in zip(self._pools, layers):
            for head in sl.heads:
                for page in head.pages:
                    pool.release(page)
        del self._seqs[seq]
        del self._policy_state[seq]

    def policy_state(self, seq: int) -> dict:
        """A per-sequence dict where policies keep what outlives one step (a selection reused
        across steps or layers, decayed scores). Dropped with the sequence; `fork` copies it."""
        self._seq(seq)
        return self._policy_state[seq]

    def sequences(self) -> list[int]:
        return list(self._seqs)

    def length(self, seq: int, layer: int = 0) -> int:
        """Positions appended to (seq, layer), evicted ones included."""
        return self._seq(seq)[self._check_layer(layer)].length

    # ---- writing ---------------------------------------------------------------------------
    def append(self, seq: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append T tokens' K and V (`[T, H, D]` each) to (seq, layer); returns their positions `[T]`.

        Raises:
            ValueError/TypeError: on shapes or dtypes that do not match the store.
            OutOfPages: when the pool cannot hold them; the store is then unchanged.
        """
        sl = self._seq(seq)[self._check_layer(layer)]
        self._check_kv(k, v)
        T, S = k.shape[0], self.page_size
        if T == 0:
            return torch.empty(0, dtype=torch.int64)
        pool = self._pools[layer]
        # Plan first, so that a failure leaves everything as it was.
        plans = []
        for head in sl.heads:
            reuse = head.free_slots[:T]
            new_pages = -(-(T - len(reuse)) // S)
            shared = {s // S for s in reuse if pool.refcount[s // S] > 1}
            plans.append((new_pages, shared))
        needed = sum(n + len(shared) for n, shared in plans)
        self._reserve(layer, needed, f"append of {T} tokens to seq {seq}")
        flat: list[int] = []
        for head, (new_pages, shared) in zip(sl.heads, plans):
            for page in shared:
                self._copy_on_write(pool, head, page)
            for _ in range(new_pages):
                page = pool.take_page()
                head.pages.append(page)
                head.free_slots.extend(range(page * S, page * S + S))
            flat.extend(head.free_slots[:T])
            del head.free_slots[:T]
        idx = torch.tensor(flat, dtype=torch.int64, device=self.device)  # [H*T], head-major
        pages, slots = idx // S, idx % S
        k_rows = k.transpose(0, 1).reshape(-1, self.head_dim)  # [H*T, D]
        v_rows = v.transpose(0, 1).reshape(-1, self.head_dim)
        pool.storage.write(pages, slots, k_rows, v_rows)
        positions = torch.arange(sl.length, sl.length + T, dtype=torch.int64, device=self.device)
        pool.slot_pos.view(-1)[idx] = positions.repeat(self.num_kv_heads).to(torch.int32)
        if pool.key_min is not None:
            # bound the keys as they are read back (rounded to the store's dtype), not as given
            rows = k_rows.to(self.dtype).to(pool.key_min.dtype)
            pool.key_min.index_reduce_(0, pages, rows, "amin")
            pool.key_max.index_reduce_(0, pages, rows, "amax")
        if pool.scores is not None:
            pool.scores.view(-1)[idx] = 0.0
        sl.length += T
        return positions

    def evict(self, seq: int, layer: int, head: int, positions: torch.Tensor | Iterable[int]) -> int:
        """Free the slots holding `positions` of (seq, layer, head); returns how many were freed.

        Pages left empty go back to the pool. Raises ValueError (store unchanged) when a
        position is not resident.
        """
        table = self._head(seq, layer, head)
        want = torch.as_tensor(list(positions) if not torch.is_tensor(positions) else positions,
                               dtype=torch.int64, device=self.device).unique()
        if want.numel() == 0:
            return 0
        pool, S = self._pools[layer], self.page_size
        pages = torch.tensor(table.pages, dtype=torch.int64, device=self.device)
        sp = pool.slot_pos[pages].to(torch.int64)  # [P, S]
        hit = torch.isin(sp, want) & (sp >= 0)
        if int(hit.sum()) != want.numel():
            missing = want[~torch.isin(want, sp[hit])][:8].tolist()
            raise ValueError(f"evict: positions {missing} are not resident in seq {seq}, layer {layer}, "
                             f"head {head}; the store is unchanged")
        p_idx, s_idx = hit.nonzero(as_tuple=True)
        touched = sorted(set(pages[p_idx].tolist()))
        shared = [p for p in touched if pool.refcount[p] > 1]
        self._reserve(layer, len(shared), f"evict from shared pages of seq {seq}")
        remap = {p: self._copy_on_write(pool, table, p) for p in shared}
        flat_pages = [remap.get(p, p) for p in pages[p_idx].tolist()]
        idx = torch.tensor(flat_pages, dtype=torch.int64, device=self.device) * S + s_idx
        pool.slot_pos.view(-1)[idx] = -1
        if pool.scores is not None:
            pool.scores.view(-1)[idx] = 0.0
        table.free_slots.extend(idx.tolist())
        self._release_empty(pool, table, {remap.get(p, p) for p in touched})
        return int(want.numel())

    def compact(self, layers: Iterable[int] | None = None) -> int:
        """Give back the memory eviction left unused; returns the bytes released.

        In each layer with plain K/V pages: every (sequence, KV head) whose pages are its own
        (not shared with a fork) gets its resident tokens packed, in position order, into as few
        of its pages as they need, and the rest are released; then the pool shrinks to the pages
        in use (page ids are renumbered). Slot-level eviction (H2O, A2SF) leaves holes in pages,
        and the pool never shrinks on its own, so without this their savings stay on paper.
        Key bounds of packed pages are recomputed (tight again). Layers with other page formats
        are left as they are (moving a token between quantized pages would re-encode it).
        Selections that policies reuse across steps (`policy_state`) are dropped: page ids change.
        """
        before = self.nbytes()
        for layer in range(self.num_layers) if layers is None else layers:
            pool = self._pools[self._check_layer(layer)]
            if not isinstance(pool.storage, DenseStorage):
                continue
            for seq_layers in self._seqs.values():
                for table in seq_layers[layer].heads:
                    self._pack(pool, table)
            self._shrink(pool, layer)
        for state in self._policy_state.values():
            state.clear()
        return before - self.nbytes()

    # ---- reading ---------------------------------------------------------------------------
    def page_table(self, seq: int, layer: int, head: int) -> list[int]:
        """The pages of (seq, layer, head), in allocation order (a copy)."""
        return list(self._head(seq, layer, head).pages)

    def page_tables(self, seqs: Sequence[int], layer: int,
                    heads: Sequence[int] | None = None) -> torch.Tensor:
        """Page tables of several sequences: `[B, H, P]` int64, `-1` padded."""
        heads = range(self.num_kv_heads) if heads is None else heads
        rows = [[self._head(s, layer, h).pages for h in heads] for s in seqs]
        width = max((len(p) for r in rows for p in r), default=0)
        out = np.full((len(rows), len(heads), width), -1, dtype=np.int64)  # numpy takes lists ~3x faster
        for b, r in enumerate(rows):
            for h, p in enumerate(r):
                out[b, h, :len(p)] = p
        return torch.from_numpy(out).to(self.device)

    def nothing_evicted(self, seqs: Sequence[int], layer: int, heads: Sequence[int] | None = None) -> bool:
        """Whether every listed (seq, KV head) of `layer` still holds every position appended to
        it. Then entry j of its page table holds positions `j*S .. j*S+S-1` (appends fill free
        slots in order, copy-on-write keeps slot offsets), so selectors can work from the lengths
        alone instead of per-slot positions."""
        heads = range(self.num_kv_heads) if heads is None else heads
        for s in seqs:
            sl = self._seq(s)[self._check_layer(layer)]
            if any(sl.heads[h].resident(self.page_size) != sl.length for h in heads):
                return False
        return True

    def num_resident(self, seq: int, layer: int, head: int) -> int:
        """Tokens (seq, layer, head) holds now."""
        table = self._head(seq, layer, head)
        return table.resident(self.page_size)

    def positions(self, seq: int, layer: int, head: int) -> torch.Tensor:
        """Resident positions of (seq, layer, head), ascending: `[n]` int64."""
        return self.read(seq, layer, head, with_kv=False)[0]

    def read(self, seq: int, layer: int, head: int, with_kv: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Resident tokens of (seq, layer, head) in position order: positions `[n]`, k, v `[n, D]`."""
        table, pool = self._head(seq, layer, head), self._pools[layer]
        pages = torch.tensor(table.pages, dtype=torch.int64, device=self.device)
        sp = pool.slot_pos[pages].reshape(-1).to(torch.int64)  # [P*S]
        keep = (sp >= 0).nonzero(as_tuple=True)[0]
        order = keep[sp[keep].argsort()]
        if not with_kv:
            return sp[order], None, None
        k, v = pool.storage.read(pages)  # [P, S, D]
        return sp[order], k.reshape(-1, self.head_dim)[order], v.reshape(-1, self.head_dim)[order]

    def storage(self, layer: int) -> PageStorage:
        """The page storage of `layer` (read pages with `.read(page_ids)`)."""
        return self._pools[self._check_layer(layer)].storage

    def slot_positions(self, layer: int) -> torch.Tensor:
        """`[N, S]` int32 position held by each slot of `layer`'s pool, `-1` when empty."""
        return self._pools[self._check_layer(layer)].slot_pos

    def key_bounds(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-page min and max of the keys written, `[N, D]` each in the store's dtype (an upper
        bound after eviction, tight again after `compact`)."""
        pool = self._pools[self._check_layer(layer)]
        if pool.key_min is None:
            raise ValueError("this store keeps no key bounds; build it with key_bounds=True")
        return pool.key_min, pool.key_max

    def slot_scores(self, layer: int) -> torch.Tensor:
        """`[N, S]` float32 per-slot scores of `layer` (zeroed on write); evictors accumulate here."""
        pool = self._pools[self._check_layer(layer)]
        if pool.scores is None:
            raise ValueError("this store keeps no slot scores; build it with slot_scores=True")
        return pool.scores

    # ---- accounting ------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of every tensor the store allocated: K/V storage, slot positions, summaries."""
        return sum(t.numel() * t.element_size() for pool in self._pools for t in pool.tensors())

    def stats(self) -> StoreStats:
        capacity = sum(p.capacity for p in self._pools)
        free = sum(len(p.free_pages) for p in self._pools)
        resident = sum(h.resident(self.page_size) for layers in self._seqs.values() for sl in layers for h in sl.heads)
        appended = sum(sl.length for layers in self._seqs.values() for sl in layers)
        return StoreStats(
            pages_capacity=capacity, pages_used=capacity - free, pages_free=free,
            tokens_resident=resident, nbytes=self.nbytes(),
            nbytes_dense_equivalent=appended * self.num_kv_heads * self.head_dim * 2 * 2,
        )

    # ---- internals -------------------------------------------------------------------------
    def _seq(self, seq: int) -> list[_SeqLayer]:
        try:
            return self._seqs[seq]
        except (KeyError, TypeError):
            raise UnknownSequence(f"sequence {seq!r} is not in the store (known: {sorted(self._seqs)[:16]})") from None

    def _check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    def _head(self, seq: int, layer: int, head: int) -> _HeadTable:
        sl = self._seq(seq)[self._check_layer(layer)]
        if not isinstance(head, int) or not 0 <= head < self.num_kv_heads:
            raise ValueError(f"head must be an int in [0, {self.num_kv_heads}), got {head!r}")
        return sl.heads[head]

    def _check_kv(self, k: torch.Tensor, v: torch.Tensor) -> None:
        for name, t in (("k", k), ("v", v)):
            if not torch.is_tensor(t):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or tuple(t.shape[1:]) != (self.num_kv_heads, self.head_dim):
                raise ValueError(f"{name} must be [T, num_kv_heads, head_dim] = [T, {self.num_kv_heads}, "
                                 f"{self.head_dim}], got {list(t.shape)}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
            if t.device != self.device and not (t.device.type == self.device.type == "cpu"):
                raise ValueError(f"{name} is on {t.device}, the store on {self.device}")
        if k.shape[0] != v.shape[0]:
            raise ValueError(f"k has {k.shape[0]} tokens, v {v.shape[0]}; they must match")

    def _reserve(self, layer: int, pages: int, what: str) -> None:
        """Make sure `pages` free pages exist in `layer`'s pool, growing it; else raise OutOfPages."""
        pool = self._pools[layer]
        if pages <= len(pool.free_pages):
            return
        limit = self.max_pages if self.max_pages is not None else math.inf
        if pool.capacity - len(pool.free_pages) + pages > limit:
            free = len(pool.free_pages) + (self.max_pages - pool.capacity)
            raise OutOfPages(f"{what} needs {pages} pages; {free} free in layer {layer} "
                             f"(max_pages={self.max_pages}). Free sequences, evict, or build the store "
                             "with more pages. The store is unchanged.")
        short = pages - len(pool.free_pages)
        target = max(pool.capacity + short, math.ceil(pool.capacity * 1.25), pool.capacity + 16)
        pool.grow(int(min(target, limit)))

    def _copy_on_write(self, pool: _Pool, table: _HeadTable, page: int) -> int:
        new = pool.take_page()
        pool.copy_page(page, new)
        pool.refcount[page] -= 1
        table.pages[table.pages.index(page)] = new
        S = self.page_size
        table.free_slots = [new * S + s % S if s // S == page else s for s in table.free_slots]
        return new

    def _pack(self, pool: _Pool, table: _HeadTable) -> None:
        """Move (seq, layer, head)'s resident tokens, in position order, to the front of its own
        pages; release the pages left empty. Skipped when a page is shared."""
        S, D = self.page_size, self.head_dim
        held = table.resident(S)
        need = -(-held // S)
        if need == len(table.pages) or any(pool.refcount[p] > 1 for p in table.pages):
            return
        pages = torch.tensor(table.pages, dtype=torch.int64, device=self.device)
        sp = pool.slot_pos[pages].reshape(-1).to(torch.int64)
        live = (sp >= 0).nonzero(as_tuple=True)[0]
        order = live[sp[live].argsort()]
        src = pages[order // S] * S + order % S  # [held] flat slots, position order
        keep = pages[:need]
        dst = (keep[:, None] * S + torch.arange(S, device=self.device)).reshape(-1)[:held]
        k, v = pool.storage.k.view(-1, D), pool.storage.v.view(-1, D)
        k_rows, v_rows, pos = k[src].clone(), v[src].clone(), pool.slot_pos.view(-1)[src].clone()
        scores = pool.scores.view(-1)[src].clone() if pool.scores is not None else None
        pool.slot_pos[keep] = -1
        k[dst], v[dst] = k_rows, v_rows
        pool.slot_pos.view(-1)[dst] = pos
        if scores is not None:
            pool.scores[keep] = 0.0
            pool.scores.view(-1)[dst] = scores
        if pool.key_min is not None:
            filled = (pool.slot_pos[keep] >= 0)[..., None]
            rows = pool.storage.k[keep].to(pool.key_min.dtype)  # [need, S, D]
            pool.key_min[keep] = torch.where(filled, rows, math.inf).amin(1)
            pool.key_max[keep] = torch.where(filled, rows, -math.inf).amax(1)
        for page in table.pages[need:]:
            pool.release(page)
        table.pages = table.pages[:need]
        table.free_slots = [table.pages[-1] * S + s for s in range(held - (need - 1) * S, S)] if need else []

    def _shrink(self, pool: _Pool, layer: int) -> None:
        """Drop the free pages of a pool and renumber the pages in use, in order."""
        used = [p for p in range(pool.capacity) if pool.refcount[p] > 0]
        if len(used) == pool.capacity:
            return
        idx = torch.tensor(used, dtype=torch.int64, device=self.device)
        pool.storage.k = pool.storage.k.index_select(0, idx)
        pool.storage.v = pool.storage.v.index_select(0, idx)
        pool.slot_pos = pool.slot_pos.index_select(0, idx)
        for name in ("key_min", "key_max", "scores"):
            if getattr(pool, name) is not None:
                setattr(pool, name, getattr(pool, name).index_select(0, idx))
        pool.refcount = [pool.refcount[p] for p in used]
        pool.free_pages, pool.capacity = [], len(used)
        new_id, S = {old: i for i, old in enumerate(used)}, self.page_size
        for seq_layers in self._seqs.values():
            for table in seq_layers[layer].heads:
                table.pages = [new_id[p] for p in table.pages]
                table.free_slots = [new_id[s // S] * S + s % S for s in table.free_slots]

    def _release_empty(self, pool: _Pool, table: _HeadTable, pages: set[int]) -> None:
        empty = [p for p in pages if not bool((pool.slot_pos[p] >= 0).any())]
        if not empty:
            return
        S, gone = self.page_size, set(empty)
        table.pages = [p for p in table.pages if p not in gone]
        table.free_slots = [s for s in table.free_slots if s // S not in gone]
        for p in empty:
            pool.release(p)
