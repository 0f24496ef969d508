"""The paged KV store: pages of K and V per layer, page tables per (sequence, layer, KV head).

A *page* holds `page_size` token slots of K and V for one layer and one KV head. Each layer owns
a pool of pages that grows on demand (up to `max_pages`); a sequence owns, per layer and KV head,
a list of pages (its page table) plus the free slots inside them. Heads may keep different
tokens, so streaming heads can hold a few pages while retrieval heads hold all.

Every slot records the position of the token it holds (`-1` when empty). RoPE is applied before
caching, so attention does not care where a token sits; eviction frees single slots and the next
append reuses them, except in a layer whose pages are encoded whole (`encodes_pages`): there a
page is given back once all its tokens are evicted. Pages are reference counted: `fork` shares
them (prefix sharing, beams) and a write to a shared page copies it first.

How a page's bytes are laid out is the business of a *page format* (a Codec of
`kvkit.policies`): it makes a `PageStorage` per layer. The store itself keeps plain tensors with
`DenseStorage` and knows nothing of policies.

Shapes: T tokens, H num_kv_heads, D head_dim, S page_size, N pages in a layer's pool,
P pages in a list, B sequences.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np
import torch

from kvkit.errors import OutOfPages, UnknownSequence

# the key bounds (here and in the vLLM backend) fold new keys in with index_reduce_, whose "beta"
# notice would otherwise greet every user's first decode; its behaviour is pinned by our tests
warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta", category=UserWarning)

__all__ = [
    "PagedKVStore", "PageStorage", "PageFormat", "DenseStorage", "PlainFormat", "Selection",
    "StoreStats", "DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE",
]

DEFAULT_PAGE_SIZE = 16  # tokens per page unless the caller or the policy says otherwise


class PageStorage(Protocol):
    """The bytes of one layer's page pool, as a page format lays them out. A storage that keeps
    per-page state (a codec's scales, staging rows) may define `forget(pages)`: the store calls
    it when pages go back to the free pool, so their next owner does not inherit that state. A
    storage whose class sets `encodes_pages = True` encodes a page as a whole (scales shared by its
    tokens): the store then never writes into a slot that eviction freed in such a layer."""

    def grow(self, num_pages: int) -> None:
        """Make room for `num_pages` pages in all; existing pages keep their content."""

    def write(self, pages: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store tokens: pages, slots `[n]` int64; k, v `[n, D]`. A storage whose class sets
        `takes_positions = True` is also given the tokens' positions: `write(..., positions [n])`."""

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
        self.write_slots(pages * self.k.shape[1] + slots, k, v)

    def write_slots(self, idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store tokens at flat slot ids `idx` `[n]` (page * S + slot): one index_copy each."""
        D, dtype = self.k.shape[-1], self.k.dtype
        self.k.view(-1, D).index_copy_(0, idx, k if k.dtype == dtype else k.to(dtype))
        self.v.view(-1, D).index_copy_(0, idx, v if v.dtype == dtype else v.to(dtype))

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
    lengths: optional `[B, H]` int64 (host): each row reads exactly the first `lengths` slots
        of its listed pages, in list order (every listed page but the last is full). Selectors
        set it when the store says so (`PagedKVStore.prefix_lengths`), and decode then needs
        no per-slot positions; None: the slots' positions decide.
    run: optional (first page, row stride, m): every row's list starts with m pages of
        consecutive ids, row r's at `first + r * stride` (rows sequence-major, then head), so
        decode reads them as one strided view of the pool, without a copy (`shared_run`).

    A Selection may be shared by several layers (`PagedKVStore.read_all`): treat it as read-only.
    """

    pages: torch.Tensor
    slot_mask: torch.Tensor | None = None
    lengths: np.ndarray | None = None
    run: tuple[int, int, int] | None = None

    @property
    def num_pages(self) -> torch.Tensor:
        """Pages selected per (sequence, head): `[B, H]`."""
        return (self.pages >= 0).sum(-1)

    @functools.cached_property
    def uniform_length(self) -> int | None:
        """n when every row reads exactly its first n tokens (`lengths` all equal, n > 0): the
        usual decode step. Computed once per Selection, which `read_all` shares between layers."""
        if self.lengths is None or not self.lengths.size:
            return None
        n = int(self.lengths.max())
        return n if n > 0 and int(self.lengths.min()) == n else None


@dataclass(frozen=True)
class StoreStats:
    """What the store holds now. Bytes are those of tensors really allocated."""

    pages_capacity: int          # pages allocated in all pools
    pages_used: int              # pages owned by at least one sequence
    pages_free: int
    tokens_resident: int         # occupied slots, summed over sequences, layers and KV heads
    nbytes: int                  # == store.nbytes()
    nbytes_dense_equivalent: int  # bf16 K+V of every token appended to the live sequences


MAX_PAGE_SIZE = 4096  # tokens per page; larger pages only waste memory (a pool grows by whole pages)
# A row's first write of plain pages sets 1/HEADROOM of its page count (rounded down) aside after
# them (free, but taken last), so the tokens decode appends land in the same run of page ids (see
# `_Layer.take_pages`): 1/16 more pool for reads in place; a longer decode lays the pool out
# again (`PagedKVStore._relayout`, one copy of the pool per 1/HEADROOM of growth).
HEADROOM = 16


def _locked(method):
    """Run a store method under the store's lock: calls from several threads are serialized.
    A call that raises leaves the store's contents as they were, but not always its free-page
    order: every layer then gets a history of its own (`PagedKVStore._advance`)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            try:
                return method(self, *args, **kwargs)
            except BaseException:
                for pool in self._pools:
                    self._advance(pool, None)
                raise
    return run


def _as_slice(index: np.ndarray) -> np.ndarray | slice:
    """`index` as a slice when it counts up by one (numpy updates a slice faster than a list of
    indices, which a per-layer update of every decode step notices)."""
    if len(index) and (np.diff(index) == 1).all():
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def shared_run(table: np.ndarray, lengths: np.ndarray, S: int) -> tuple[int, int, int] | None:
    """`Selection.run` of page lists `table` `[B, H, P]` (-1 padded) read to `lengths` `[B, H]`
    tokens: (first page, row stride, m) when every row's list starts with m >= 1 pages at
    consecutive ids (at most the pages it reads) and row i's run starts at `first + i * stride`;
    None otherwise. A first prefill lays rows out this way, with room after each row for the
    pages decode appends (`HEADROOM`)."""
    rows = table.reshape(-1, table.shape[-1])
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        return None
    starts = rows[:, 0]
    if starts.min() < 0:
        return None
    consecutive = rows == starts[:, None] + np.arange(rows.shape[1])
    runs = np.where(consecutive.all(1), rows.shape[1], consecutive.argmin(1))
    m = int(np.minimum(runs, -(-lengths.reshape(-1) // S)).min())
    stride = int(starts[1] - starts[0]) if len(starts) > 1 else m
    if m < 1 or stride < m or (len(starts) > 1 and not (np.diff(starts) == stride).all()):
        return None
    return int(starts[0]), stride, m


class _Layer:
    """One layer: its pool of pages (storage, per-slot positions, per-page summaries) and the
    page tables of every (sequence, KV head) row, kept as arrays a kernel can take as they are.

    Row `r = seq_slot * H + head`. `table[r, :npages[r]]` are the row's pages in allocation
    order (-1 after). A *clean* row holds its `resident` tokens in its first `resident` slots,
    so its free slots are the tail of its last page; a row that had tokens evicted keeps an
    explicit list of its free slots (`holes`, flat ids `page * S + slot`, used front first).
    The tables are numpy arrays; `torch.from_numpy` views them without a copy on the CPU.
    """

    def __init__(self, storage: PageStorage, page_size: int, head_dim: int, device: torch.device,
                 key_bounds: bool, slot_scores: bool, bounds_dtype: torch.dtype):
        self.storage = storage
        self.capacity = 0
        self.slot_pos = torch.empty(0, page_size, dtype=torch.int32, device=device)
        self.refcount = np.zeros(0, dtype=np.int32)
        self.free_pages: list[int] = []  # a stack: the lowest ids on top
        self.spare: list[int] = []  # free pages set aside for the row before them, taken last
        self.key_min = torch.empty(0, head_dim, dtype=bounds_dtype, device=device) if key_bounds else None
        self.key_max = torch.empty(0, head_dim, dtype=bounds_dtype, device=device) if key_bounds else None
        self.scores = torch.empty(0, page_size, device=device) if slot_scores else None
        self.table = np.full((0, 0), -1, dtype=np.int32)  # [R, W]
        self.npages = np.zeros(0, dtype=np.int64)         # [R]
        self.resident = np.zeros(0, dtype=np.int64)       # [R]
        self.holes: dict[int, list[int]] = {}
        self.stamp = 0  # the history of the tables: equal stamps, equal tables (PagedKVStore._advance)

    # ---- the pool ----------------------------------------------------------------------------
    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        self.storage.grow(capacity)
        self.slot_pos = torch.cat([self.slot_pos, self.slot_pos.new_full((extra, self.slot_pos.shape[1]), -1)])
        self.refcount = np.concatenate([self.refcount, np.zeros(extra, dtype=np.int32)])
        self.free_pages[:0] = range(capacity - 1, self.capacity - 1, -1)
        if self.key_min is not None:
            self.key_min = torch.cat([self.key_min, self.key_min.new_full((extra, self.key_min.shape[1]), math.inf)])
            self.key_max = torch.cat([self.key_max, self.key_max.new_full((extra, self.key_max.shape[1]), -math.inf)])
        if self.scores is not None:
            self.scores = torch.cat([self.scores, self.scores.new_zeros(extra, self.scores.shape[1])])
        self.capacity = capacity

    def take_pages(self, n: int, after: int = -1) -> list[int]:
        """n free pages. With `after` (a row's last page), each page is the one right after the
        previous when that one is free, so a row grows in place: its pages stay one run of ids,
        which decode reads as a view (`kvkit.attention.fast`)."""
        pages = []
        for _ in range(n):
            nxt = after + 1
            if after >= 0 and nxt < self.capacity and self.refcount[nxt] == 0:
                self._unfree(nxt)
            else:
                nxt = self.free_pages.pop() if self.free_pages else self.spare.pop()
            self.refcount[nxt] = 1
            pages.append(nxt)
            after = nxt
        return pages

    def _unfree(self, page: int) -> None:
        """Take a given free page off its stack (usually its top: a fresh pool's next page)."""
        for stack in (self.free_pages, self.spare):
            if stack and stack[-1] == page:
                stack.pop()
                return
        (self.spare if page in self.spare else self.free_pages).remove(page)

    def set_aside(self, n: int) -> None:
        """Set the next n free pages aside: they stay free (counted, and taken when no other is
        left) for the row that ends just before them to grow into."""
        for _ in range(min(n, len(self.free_pages))):
            self.spare.append(self.free_pages.pop())

    def all_free(self, pages: np.ndarray) -> bool:
        """Whether every page id in `pages` is in the pool and free."""
        inside = pages < self.capacity
        return bool(inside.all()) and bool((self.refcount[pages] == 0).all())

    @property
    def num_free(self) -> int:
        return len(self.free_pages) + len(self.spare)

    def release(self, pages: Iterable[int]) -> None:
        """Drop one reference to each page; pages nobody holds go back to the free stack."""
        gone = []
        for page in pages:
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                gone.append(page)
        if gone:
            idx = torch.tensor(gone, dtype=torch.int64, device=self.slot_pos.device)
            self.slot_pos[idx] = -1
            if self.key_min is not None:
                self.key_min[idx] = math.inf
                self.key_max[idx] = -math.inf
            forget = getattr(self.storage, "forget", None)
            if forget is not None:  # a codec's per-page state: the next owner starts afresh
                forget(idx)
            self.free_pages.extend(gone)

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

    # ---- the page tables ---------------------------------------------------------------------
    def ensure_rows(self, rows: int) -> None:
        if rows > self.table.shape[0]:
            rows = max(rows, 2 * self.table.shape[0])
            self.table = np.concatenate([self.table, np.full((rows - self.table.shape[0], self.table.shape[1]), -1,
                                                             dtype=np.int32)])
            self.npages = np.concatenate([self.npages, np.zeros(rows - self.npages.shape[0], dtype=np.int64)])
            self.resident = np.concatenate([self.resident, np.zeros(rows - self.resident.shape[0], dtype=np.int64)])

    def ensure_width(self, width: int) -> None:
        if width > self.table.shape[1]:
            width = max(width, 2 * self.table.shape[1], 16)
            self.table = np.concatenate([self.table, np.full((self.table.shape[0], width - self.table.shape[1]), -1,
                                                             dtype=np.int32)], axis=1)

    def pages_of(self, row: int) -> list[int]:
        return self.table[row, :self.npages[row]].tolist()

    def set_pages(self, row: int, pages: Sequence[int]) -> None:
        self.ensure_width(len(pages))
        self.table[row] = -1
        self.table[row, :len(pages)] = pages
        self.npages[row] = len(pages)

    def free_slots(self, row: int, S: int) -> list[int]:
        """The row's free slots in the order appends use them."""
        if row in self.holes:
            return self.holes[row]
        n, held = int(self.npages[row]), int(self.resident[row])
        if n * S == held:
            return []
        last = int(self.table[row, n - 1])
        return list(range(last * S + held - (n - 1) * S, last * S + S))

    def clear_row(self, row: int) -> None:
        self.table[row] = -1
        self.npages[row] = 0
        self.resident[row] = 0
        self.holes.pop(row, None)


class PagedKVStore:
    """Pages of K and V for `num_layers` layers of `num_kv_heads` heads.

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention geometry.
        page_size: token slots per page (1..MAX_PAGE_SIZE).
        dtype: the compute dtype K and V are read back in (and stored in, for the plain format).
        page_format: one PageFormat for all layers, or one per layer (default: plain `dtype`).
        max_pages: cap on each layer's pool; None grows without bound. Appends beyond it raise
            `OutOfPages` and change nothing.
        key_bounds: keep per-page min/max of keys (for page-scoring selectors such as Quest), in
            `dtype`: keys are bounded as they read back (rounded to `dtype`), so the bounds are
            exact there, and cost 2/page_size of the key bytes, as in Quest.
        slot_scores: keep a float32 score per slot (for score-based evictors such as H2O).

    Page tables are data: per layer, an int32 `[rows, max_pages]` table (-1 padded) with the
    pages and resident tokens of each (sequence, KV head) row, updated in place by
    append/evict/fork/free/compact (`page_tables` hands out `[B, H, P]` views of it).

    Threads: every public method runs under one lock, so a store may be shared by threads (a
    serving stack's); calls are serialized, not run in parallel. Failure: a call that raises
    (bad input, `OutOfPages`, a codec that cannot encode) leaves the store as it was. The
    store's tensors are made outside inference mode, so it can be filled inside
    `torch.inference_mode()` and freed or appended to outside it.

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
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PagedKVStore.{name} must be an int >= 1, got {value!r}")
        if page_size > MAX_PAGE_SIZE:
            raise ValueError(f"PagedKVStore.page_size must be <= {MAX_PAGE_SIZE} tokens, got {page_size}; "
                             "pages of 8 to 128 tokens are usual")
        if max_pages is not None and (not isinstance(max_pages, int) or max_pages < 1):
            raise ValueError(f"PagedKVStore.max_pages must be None or an int >= 1, got {max_pages!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"PagedKVStore.dtype must be a floating torch dtype, got {dtype}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size, self.dtype, self.device = page_size, dtype, torch.device(device)
        self.max_pages = max_pages
        formats = page_format if isinstance(page_format, (list, tuple)) else [page_format] * num_layers
        if len(formats) != num_layers:
            raise ValueError(f"got {len(formats)} page formats for {num_layers} layers; give one or one per layer")
        with torch.inference_mode(False):  # normal tensors: writable inside and outside inference mode
            self._pools = [
                _Layer((fmt or PlainFormat()).make_storage(page_size, head_dim, dtype, self.device),
                       page_size, head_dim, self.device, key_bounds, slot_scores, bounds_dtype=dtype)
                for fmt in formats
            ]
        self._slots: dict[int, int] = {}  # sequence id -> its slot (rows slot*H .. slot*H+H-1)
        self._free_slots: list[int] = []
        self._length = np.zeros((0, num_layers), dtype=np.int64)  # [seq slots, layers]
        self._policy_state: dict[int, dict] = {}
        self._next_seq = 0
        self._lock = threading.RLock()
        # Layers whose page tables went through the same calls hold the same tables (a model's
        # layers, when nothing evicts): `_advance` gives them one stamp, and what decode derives
        # from the tables (write slots, page lists, runs) is computed once per step for all of them.
        self._stamps: dict[tuple, int] = {}
        self._new_stamp = itertools.count(1)
        self._memo: dict[tuple, object] = {}

    # ---- sequences -------------------------------------------------------------------------
    @_locked
    def add_sequence(self) -> int:
        """Start an empty sequence; returns its id."""
        seq = self._next_seq
        self._next_seq += 1
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = self._length.shape[0]
            self._length = np.concatenate([self._length, np.zeros((max(1, slot), self.num_layers), np.int64)])
            self._free_slots = list(range(self._length.shape[0] - 1, slot, -1))
            for layer in self._pools:
                layer.ensure_rows(self._length.shape[0] * self.num_kv_heads)
        self._slots[seq] = slot
        self._length[slot] = 0
        self._policy_state[seq] = {}
        for pool in self._pools:
            self._advance(pool, ("add", seq, slot))
        return seq

    @_locked
    def fork(self, seq: int) -> int:
        """A new sequence sharing every page of `seq` (copied on the first write to either)."""
        src = self._rows(seq)
        child = self.add_sequence()
        dst = self._rows(child)
        self._length[self._slots[child]] = self._length[self._slots[seq]]
        for layer in self._pools:
            layer.table[dst] = layer.table[src]
            layer.npages[dst] = layer.npages[src]
            layer.resident[dst] = layer.resident[src]
            for s, d in zip(src.tolist(), dst.tolist()):
                if s in layer.holes:
                    layer.holes[d] = list(layer.holes[s])
                np.add.at(layer.refcount, layer.table[s, :layer.npages[s]], 1)
            self._advance(layer, ("fork", seq, child))
        self._policy_state[child] = dict(self._policy_state[seq])
        return child

    @_locked
    def free(self, seq: int) -> None:
        """Drop a sequence; pages no other sequence shares go back to their pools."""
        rows = self._rows(seq)
        for layer in self._pools:
            for row in rows.tolist():
                layer.release(layer.pages_of(row))
                layer.clear_row(row)
            self._advance(layer, ("free", seq))
        self._free_slots.append(self._slots.pop(seq))
        del self._policy_state[seq]

    def policy_state(self, seq: int) -> dict:
        """A per-sequence dict where policies keep what outlives one step (a selection reused
        across steps or layers, decayed scores). Dropped with the sequence; `fork` copies it."""
        self._slot(seq)
        return self._policy_state[seq]

    def sequences(self) -> list[int]:
        return list(self._slots)

    def length(self, seq: int, layer: int = 0) -> int:
        """Positions appended to (seq, layer), evicted ones included."""
        return int(self._length[self._slot(seq), self._check_layer(layer)])

    def lengths(self, seqs: Sequence[int], layer: int = 0) -> np.ndarray:
        """`length` of several sequences: `[B]` int64 (a copy)."""
        return self._length[[self._slot(s) for s in seqs], self._check_layer(layer)]

    # ---- writing ---------------------------------------------------------------------------
    @_locked
    def append(self, seq: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append T tokens' K and V (`[T, H, D]` each) to (seq, layer); returns their positions `[T]`.

        Raises:
            ValueError/TypeError: on shapes or dtypes that do not match the store, or non-finite
                K/V for a layer whose codec encodes them (quantized, low-rank pages).
            OutOfPages: when the pool cannot hold them; the store is then unchanged.
        """
        slot = self._slot(seq)
        pool = self._pools[self._check_layer(layer)]
        self._check_kv(k, v, pool)
        T, S, H = k.shape[0], self.page_size, self.num_kv_heads
        if T == 0:
            return torch.empty(0, dtype=torch.int64)
        rows = [slot * H + h for h in range(H)]
        # Plan first, so that a failure leaves everything as it was.
        plans = []
        for row in rows:
            free = pool.free_slots(row, S)
            shared = sorted({s // S for s in free[:T] if pool.refcount[s // S] > 1})
            plans.append((free, -(-(T - len(free[:T])) // S), shared))
        need = sum(n + len(shared) for _, n, shared in plans)
        plain = type(pool.storage) is DenseStorage  # only plain pages are read in place
        room = [0 if pool.npages[row] or not plain else n // HEADROOM for row, (_, n, _) in zip(rows, plans)]
        if not self._fits(pool, need + sum(room)):
            room = [0] * H  # the headroom is a speed-up, never a reason to fail
        self._reserve(layer, need + sum(room), f"append of {T} tokens to seq {seq}")
        flat: list[int] = []
        taken: list[int] = []
        moves = []  # per row: shared page -> its copy, new pages, the new pages' slots left free
        for row, (free, new_pages, shared), extra in zip(rows, plans, room):
            remap = dict(zip(shared, pool.take_pages(len(shared))))
            n = int(pool.npages[row])
            fresh = pool.take_pages(new_pages, after=int(pool.table[row, n - 1]) if n else -1)
            pool.set_aside(extra)
            taken += [*remap.values(), *fresh]
            fresh_slots = [p * S + i for p in fresh for i in range(S)]
            use = len(free[:T])
            flat += [remap.get(s // S, s // S) * S + s % S for s in free[:T]] + fresh_slots[:T - use]
            moves.append((remap, fresh, fresh_slots[T - use:]))
        idx = torch.tensor(flat, dtype=torch.int64, device=self.device)  # [H*T], head-major
        start = int(self._length[slot, layer])
        positions = torch.arange(start, start + T, dtype=torch.int64, device=self.device)
        try:
            for remap, _, _ in moves:
                for src, dst in remap.items():
                    pool.copy_page(src, dst)
            self._write(pool, idx, positions.repeat(H), k.transpose(0, 1).reshape(-1, self.head_dim),
                        v.transpose(0, 1).reshape(-1, self.head_dim))
        except BaseException:
            pool.release(taken)  # nobody lists them yet: back to the pool
            raise
        for row, (free, _, _), (remap, fresh, spare) in zip(rows, plans, moves):
            if remap:
                pool.set_pages(row, [remap.get(p, p) for p in pool.pages_of(row)])
                pool.refcount[list(remap)] -= 1
            if fresh:
                n = int(pool.npages[row])
                pool.ensure_width(n + len(fresh))
                pool.table[row, n:n + len(fresh)] = fresh
                pool.npages[row] = n + len(fresh)
            if row in pool.holes:  # a clean row stays clean: its free slots are its last page's tail
                pool.holes[row] = [remap.get(s // S, s // S) * S + s % S for s in free[T:]] + spare
            pool.resident[row] += T
        self._length[slot, layer] += T
        self._advance(pool, ("append", seq, T))
        return positions

    @_locked
    def reserve(self, seqs: Sequence[int], tokens: int, layers: Iterable[int] | None = None) -> None:
        """Make sure every layer can take `tokens` more tokens for each of `seqs`, growing pools;
        raises `OutOfPages` (nothing written) if one cannot. A caller about to write a step into
        every layer (a model's forward) checks here first, so no layer is left half written.
        Counts the pages appends would take (new pages, copies of shared ones), before any eviction."""
        S = self.page_size
        for layer in range(self.num_layers) if layers is None else layers:
            pool = self._pools[self._check_layer(layer)]
            need = 0
            for row in self.rows(seqs).reshape(-1).tolist():
                free = pool.free_slots(row, S)
                need += -(-max(0, tokens - len(free)) // S)
                need += len({s // S for s in free[:tokens] if pool.refcount[s // S] > 1})
            self._reserve(layer, need, f"a step of {tokens} tokens for {len(seqs)} sequences")

    @_locked
    def append_step(self, seqs: Sequence[int], layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append one token to each of `seqs` (k, v `[B, H, D]`): the decode step, vectorized
        over sequences and heads when every row is clean (nothing evicted into it, no page
        shared with a fork where the token lands); else one `append` per sequence.

        A step that takes no new page is planned once for every layer with the same history:
        the other layers only write (the slots, from `_memo`) and count.

        Raises as `append`; on `OutOfPages` no sequence got its token.
        """
        pool = self._pools[self._check_layer(layer)]
        B, H, S = len(seqs), self.num_kv_heads, self.page_size
        want = (B, H, self.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"k and v must be [num_seqs, num_kv_heads, head_dim] = {list(want)}, "
                             f"got {list(k.shape)} and {list(v.shape)}")
        if type(pool.storage) is not DenseStorage or not (k.dtype.is_floating_point and v.dtype.is_floating_point):
            self._check_kv(k, v, pool)  # the full checks (finite values for an encoding codec)
        op = ("step", tuple(seqs))
        plan = self._memo.get((op, pool.stamp))
        if plan is not None:  # (rows, slots, flat slots, positions) of this step, from another layer
            rows, slots, idx, pos = plan
            self._write(pool, idx, pos, k.reshape(B * H, -1), v.reshape(B * H, -1))
            pool.resident[rows] += 1
            self._length[slots, layer] += 1
            self._advance(pool, op)
            return
        slots = np.fromiter((self._slot(s) for s in seqs), dtype=np.int64, count=B)
        rows = (slots[:, None] * H + np.arange(H)).reshape(-1)  # [B*H]
        n, held = pool.npages[rows], pool.resident[rows]
        full = n * S == held
        pool.ensure_width(int(n.max()) + 1)
        last = pool.table[rows, np.maximum(n - 1, 0)]
        if B > 1 and len(set(slots.tolist())) != B:
            raise ValueError(f"append_step: a sequence is listed twice in {list(seqs)}")
        clean = not pool.holes or not any(r in pool.holes for r in rows.tolist())
        if not clean or (pool.refcount[last[~full]] > 1).any():  # the target page is shared: copy on write
            return self._append_each(seqs, layer, k, v)
        need = int(full.sum())
        if need:
            after = last[full & (n > 0)] + 1  # where each row would grow in place
            if not pool.all_free(after) and self._relayout(pool):
                self._advance(pool, ("relayout",))
                last = pool.table[rows, np.maximum(n - 1, 0)]
            self._reserve(layer, need, f"decode step of {B} sequences")
            fresh = np.array([pool.take_pages(1, after=int(p))[0] for p in last[full]], dtype=np.int64)
        page = last.astype(np.int64)
        if need:
            page[full] = fresh
        idx = torch.from_numpy(page * S + held % S).to(self.device)  # [B*H] flat slots
        pos = torch.from_numpy(np.repeat(self._length[slots, layer].astype(np.int32), H)).to(self.device)
        try:
            self._write(pool, idx, pos, k.reshape(B * H, -1), v.reshape(B * H, -1))
        except BaseException:
            if need:
                pool.release(fresh.tolist())
            raise
        if need:
            grow = rows[full]
            pool.table[grow, n[full]] = fresh
            pool.npages[grow] += 1
        else:  # no page taken: the same slots serve every layer with this history
            self._memoized((op, pool.stamp), lambda: (_as_slice(rows), _as_slice(slots), idx, pos))
        pool.resident[rows] += 1
        self._length[slots, layer] += 1
        self._advance(pool, op)

    def _append_each(self, seqs: Sequence[int], layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        done = []
        try:
            for b, seq in enumerate(seqs):
                self.append(seq, layer, k[b:b + 1], v[b:b + 1])
                done.append(seq)
        except BaseException:
            for seq in done:  # all or nothing: take the token back from the ones that got it
                self._truncate(seq, layer, self.length(seq, layer) - 1)
            raise

    def _write(self, pool: _Layer, idx: torch.Tensor, positions: torch.Tensor, k_rows: torch.Tensor,
               v_rows: torch.Tensor) -> None:
        """Store tokens at flat slots `idx` `[n]`: K/V through the page format, then positions
        and summaries (after the format, which is the part that can fail)."""
        S = self.page_size
        if type(pool.storage) is DenseStorage:
            pool.storage.write_slots(idx, k_rows, v_rows)
        elif getattr(pool.storage, "takes_positions", False):
            pool.storage.write(idx // S, idx % S, k_rows, v_rows, positions)
        else:
            pool.storage.write(idx // S, idx % S, k_rows, v_rows)
        pool.slot_pos.view(-1).index_copy_(0, idx, positions if positions.dtype == torch.int32 else positions.to(torch.int32))
        if pool.key_min is not None:
            # bound the keys as they are read back (rounded to the store's dtype), not as given
            pages = idx // S
            rows = k_rows.to(self.dtype).to(pool.key_min.dtype)
            pool.key_min.index_reduce_(0, pages, rows, "amin")
            pool.key_max.index_reduce_(0, pages, rows, "amax")
        if pool.scores is not None:
            pool.scores.view(-1)[idx] = 0.0

    @_locked
    def truncate(self, seq: int, layer: int, length: int) -> None:
        """Forget positions `length ..` of (seq, layer) and set its length back to `length`: the
        undo of a step that failed in a later layer. Pages left empty go back to the pool."""
        if not 0 <= length <= self.length(seq, layer):
            raise ValueError(f"truncate: length must be in [0, {self.length(seq, layer)}], got {length}")
        self._truncate(seq, layer, length)

    def _truncate(self, seq: int, layer: int, length: int) -> None:
        slot = self._slot(seq)
        for head in range(self.num_kv_heads):
            pos = self.positions(seq, layer, head)
            gone = pos[pos >= length]
            if gone.numel():
                self.evict(seq, layer, head, gone)
        self._length[slot, layer] = length
        self._advance(self._pools[layer], None)

    @_locked
    def evict(self, seq: int, layer: int, head: int, positions: torch.Tensor | Iterable[int]) -> int:
        """Free the slots holding `positions` of (seq, layer, head); returns how many were freed.

        Pages left empty go back to the pool. Raises ValueError (store unchanged) when a
        position is not resident.
        """
        row = self._row(seq, layer, head)
        pool, S = self._pools[layer], self.page_size
        want = torch.as_tensor(list(positions) if not torch.is_tensor(positions) else positions,
                               dtype=torch.int64, device=self.device).unique()
        if want.numel() == 0:
            return 0
        table = pool.pages_of(row)
        pages = torch.tensor(table, dtype=torch.int64, device=self.device)
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
        free = pool.free_slots(row, S)
        remap = dict(zip(shared, pool.take_pages(len(shared))))
        for src, dst in remap.items():
            pool.copy_page(src, dst)
        flat_pages = [remap.get(p, p) for p in pages[p_idx].tolist()]
        idx = torch.tensor(flat_pages, dtype=torch.int64, device=self.device) * S + s_idx
        pool.slot_pos.view(-1)[idx] = -1
        if pool.scores is not None:
            pool.scores.view(-1)[idx] = 0.0
        if remap:
            pool.refcount[list(remap)] -= 1
            table = [remap.get(p, p) for p in table]
            free = [remap.get(s // S, s // S) * S + s % S for s in free]
        # A slot freed in a page encoded whole is not refilled: re-encoding would quantize its
        # other tokens again from their decoded values. The page returns when its last token goes.
        pool.holes[row] = free if getattr(pool.storage, "encodes_pages", False) else free + idx.tolist()
        pool.set_pages(row, table)
        pool.resident[row] -= int(want.numel())
        self._release_empty(pool, row, {remap.get(p, p) for p in touched})
        self._advance(pool, None)
        return int(want.numel())

    @_locked
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
        with torch.inference_mode(False):  # the shrunk pool: normal tensors, writable in any mode
            for layer in range(self.num_layers) if layers is None else layers:
                pool = self._pools[self._check_layer(layer)]
                if not isinstance(pool.storage, DenseStorage):
                    continue
                for slot in self._slots.values():
                    for row in range(slot * self.num_kv_heads, (slot + 1) * self.num_kv_heads):
                        self._pack(pool, row)
                self._shrink(pool)
                self._advance(pool, None)
        for state in self._policy_state.values():
            state.clear()
        return before - self.nbytes()

    # ---- reading ---------------------------------------------------------------------------
    def page_table(self, seq: int, layer: int, head: int) -> list[int]:
        """The pages of (seq, layer, head), in allocation order (a copy)."""
        return self._pools[layer].pages_of(self._row(seq, layer, head))

    @_locked
    def page_tables(self, seqs: Sequence[int], layer: int,
                    heads: Sequence[int] | None = None) -> torch.Tensor:
        """Page tables of several sequences: `[B, H, P]` int64, `-1` padded (P: the longest)."""
        pool = self._pools[self._check_layer(layer)]
        rows = self.rows(seqs, heads)  # [B, H]
        width = int(pool.npages[rows].max()) if rows.size else 0
        return torch.from_numpy(pool.table[rows, :width].astype(np.int64)).to(self.device)  # no copy on the CPU

    def rows(self, seqs: Sequence[int], heads: Sequence[int] | None = None) -> np.ndarray:
        """`[B, H]` the page-table rows of (sequence, KV head): `slot * num_kv_heads + head`."""
        slots = np.array([self._slot(s) for s in seqs], dtype=np.int64)
        heads = np.arange(self.num_kv_heads) if heads is None else np.asarray(list(heads), dtype=np.int64)
        return slots[:, None] * self.num_kv_heads + heads[None, :]

    def table_arrays(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`layer`'s page tables as they are kept: table `[R, W]` int32 (-1 padded), pages `[R]`
        and resident tokens `[R]` per row (see `rows`). Views, not copies: read, don't write."""
        pool = self._pools[self._check_layer(layer)]
        return pool.table, pool.npages, pool.resident

    def nothing_evicted(self, seqs: Sequence[int], layer: int, heads: Sequence[int] | None = None) -> bool:
        """Whether every listed (seq, KV head) of `layer` still holds every position appended to
        it. Then entry j of its page table holds positions `j*S .. j*S+S-1` (appends fill free
        slots in order, copy-on-write keeps slot offsets), so selectors can work from the lengths
        alone instead of per-slot positions."""
        pool = self._pools[self._check_layer(layer)]
        rows = self.rows(seqs, heads)
        lengths = self._length[rows[:, 0] // self.num_kv_heads, layer]
        return bool((pool.resident[rows] == lengths[:, None]).all())

    def prefix_lengths(self, seqs: Sequence[int], layer: int, heads: Sequence[int] | None = None,
                       pages_read: int | np.ndarray | None = None) -> np.ndarray | None:
        """`[B, H]` tokens each row reads when it reads `pages_read` pages of its list (an int or
        `[B, H]`; all when None), its last page among them and listed last, every other one full; None unless
        every row is clean (no evicted holes: its tokens fill the first slots of its pages in
        list order). What selectors hand decode as `Selection.lengths`."""
        pool = self._pools[self._check_layer(layer)]
        rows = self.rows(seqs, heads)
        if pool.holes and any(r in pool.holes for r in rows.reshape(-1).tolist()):
            return None
        held = pool.resident[rows]
        if pages_read is None:
            return held
        n = pool.npages[rows]
        return np.minimum(n, pages_read) * self.page_size - (n * self.page_size - held)

    @_locked
    def read_all(self, seqs: Sequence[int], layer: int, heads: Sequence[int] | None = None) -> Selection:
        """Every page each (seq, KV head) holds, as a Selection: `page_tables`, with
        `prefix_lengths` and the in-place `run` when the rows are clean. Computed once for all
        layers whose tables have the same history (the dense read of a decode step); read-only."""
        pool = self._pools[self._check_layer(layer)]

        def make() -> Selection:
            pages = self.page_tables(seqs, layer, heads)
            lengths = self.prefix_lengths(seqs, layer, heads)
            run = shared_run(pages.numpy(), lengths, self.page_size) if lengths is not None and not pages.is_cuda else None
            return Selection(pages, lengths=lengths, run=run)
        return self._memoized(("read_all", pool.stamp, tuple(seqs), None if heads is None else tuple(heads)), make)

    def num_resident(self, seq: int, layer: int, head: int) -> int:
        """Tokens (seq, layer, head) holds now."""
        return int(self._pools[layer].resident[self._row(seq, layer, head)])

    def positions(self, seq: int, layer: int, head: int) -> torch.Tensor:
        """Resident positions of (seq, layer, head), ascending: `[n]` int64."""
        return self.read(seq, layer, head, with_kv=False)[0]

    @_locked
    def read(self, seq: int, layer: int, head: int, with_kv: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Resident tokens of (seq, layer, head) in position order: positions `[n]`, k, v `[n, D]`."""
        pool = self._pools[layer]
        pages = torch.tensor(pool.pages_of(self._row(seq, layer, head)), dtype=torch.int64, device=self.device)
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

    @_locked
    def stats(self) -> StoreStats:
        capacity = sum(p.capacity for p in self._pools)
        free = sum(p.num_free for p in self._pools)
        resident = sum(int(p.resident.sum()) for p in self._pools)
        appended = int(self._length[list(self._slots.values())].sum()) if self._slots else 0
        return StoreStats(
            pages_capacity=capacity, pages_used=capacity - free, pages_free=free,
            tokens_resident=resident, nbytes=self.nbytes(),
            nbytes_dense_equivalent=appended * self.num_kv_heads * self.head_dim * 2 * 2,
        )

    # ---- internals -------------------------------------------------------------------------
    def _slot(self, seq: int) -> int:
        try:
            return self._slots[seq]
        except (KeyError, TypeError):
            raise UnknownSequence(f"sequence {seq!r} is not in the store (known: {sorted(self._slots)[:16]})") from None

    def _rows(self, seq: int) -> np.ndarray:
        slot = self._slot(seq)
        return np.arange(slot * self.num_kv_heads, (slot + 1) * self.num_kv_heads)

    def _check_layer(self, layer: int) -> int:
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return int(layer)

    def _row(self, seq: int, layer: int, head: int) -> int:
        slot = self._slot(seq)
        self._check_layer(layer)
        if not isinstance(head, (int, np.integer)) or not 0 <= head < self.num_kv_heads:
            raise ValueError(f"head must be an int in [0, {self.num_kv_heads}), got {head!r}")
        return slot * self.num_kv_heads + int(head)

    def _check_kv(self, k: torch.Tensor, v: torch.Tensor, pool: _Layer) -> None:
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
            if not isinstance(pool.storage, DenseStorage) and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} holds NaN or inf; {type(pool.storage).__name__} pages cannot encode "
                                 "them (check the model's activations). The store is unchanged.")
        if k.shape[0] != v.shape[0]:
            raise ValueError(f"k has {k.shape[0]} tokens, v {v.shape[0]}; they must match")

    def _advance(self, pool: _Layer, op: tuple | None) -> None:
        """Record a change of `pool`'s tables. `op` names a change that depends only on the
        tables and its arguments (an append of T tokens, a decode step of these sequences):
        layers with equal stamps that make the same change get equal stamps again. None (an
        eviction, which depends on scores, or a failed call): a stamp of its own."""
        if op is None:
            pool.stamp = next(self._new_stamp)
            return
        if len(self._stamps) > 4096:  # old histories: forgetting them only costs recomputation
            self._stamps.clear()
        key = (pool.stamp, op)
        pool.stamp = self._stamps.get(key) or self._stamps.setdefault(key, next(self._new_stamp))

    def _memoized(self, key: tuple, make):
        """`make()` once per key (keys hold a stamp); forgotten in bulk now and then."""
        value = self._memo.get(key)
        if value is None:
            if len(self._memo) > 256:
                self._memo.clear()
            value = self._memo[key] = make()
        return value

    def _fits(self, pool: _Layer, pages: int) -> bool:
        """Whether `pages` more pages fit under `max_pages`."""
        return self.max_pages is None or pool.capacity - pool.num_free + pages <= self.max_pages

    def _reserve(self, layer: int, pages: int, what: str) -> None:
        """Make sure `pages` free pages exist in `layer`'s pool, growing it; else raise OutOfPages."""
        pool = self._pools[layer]
        if pages <= pool.num_free:
            return
        limit = self.max_pages if self.max_pages is not None else math.inf
        if not self._fits(pool, pages):
            free = pool.num_free + (self.max_pages - pool.capacity)
            raise OutOfPages(f"{what} needs {pages} pages; {free} free in layer {layer} "
                             f"(max_pages={self.max_pages}). Free sequences, evict, or build the store "
                             "with more pages. The store is unchanged.")
        short = pages - pool.num_free
        # grow by 1/HEADROOM, and by at least 16 pages' worth of 16-token pages (fewer big pages):
        # free pages are resident bytes, so a budgeted (compressed) store must not grow by much
        # more than it needs; the copy a growth costs comes once per 1/HEADROOM of tokens
        target = max(pool.capacity + short, pool.capacity + -(-pool.capacity // HEADROOM),
                     pool.capacity + max(1, 256 // self.page_size))
        with torch.inference_mode(False):  # see __init__
            pool.grow(int(min(target, limit)))
        self._advance(pool, ("grow", pool.capacity))

    def _pack(self, pool: _Layer, row: int) -> None:
        """Move a row's resident tokens, in position order, to the front of its own pages;
        release the pages left empty. Skipped when a page is shared."""
        S, D = self.page_size, self.head_dim
        table = pool.pages_of(row)
        held = int(pool.resident[row])
        need = -(-held // S)
        if (need == len(table) and row not in pool.holes) or any(pool.refcount[p] > 1 for p in table):
            return
        pages = torch.tensor(table, dtype=torch.int64, device=self.device)
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
        pool.release(table[need:])
        pool.set_pages(row, table[:need])
        pool.holes.pop(row, None)  # packed: clean again

    def _shrink(self, pool: _Layer) -> None:
        """Drop the free pages of a pool and renumber the pages in use, in order."""
        used = np.flatnonzero(pool.refcount > 0)
        if len(used) < pool.capacity:
            self._renumber(pool, used)

    def _relayout(self, pool: _Layer) -> bool:
        """Lay the pool out again so that each row's pages are one run of ids with room after
        it (1/HEADROOM of its pages, at least one), rows in order: decode then keeps reading
        each row in place as it grows. Only for plain pages, clean rows and no page shared;
        False (nothing done) otherwise or when the pool may not grow so far. Page ids change,
        so the selections policies keep (`policy_state`) are dropped, as `compact` does."""
        if type(pool.storage) is not DenseStorage or pool.holes or (pool.refcount > 1).any():
            return False
        live = np.flatnonzero(pool.npages > 0)
        n = pool.npages[live]
        room = np.maximum(1, n // HEADROOM)
        if not self._fits(pool, int((n + room).sum()) - (pool.capacity - pool.num_free)):
            return False
        src = np.concatenate([np.concatenate([pool.table[row, :k], np.full(h, -1, dtype=np.int32)])
                              for row, k, h in zip(live, n, room)])  # each row's pages, then its room
        self._renumber(pool, src)
        for state in self._policy_state.values():
            state.clear()
        return True

    def _renumber(self, pool: _Layer, src: np.ndarray) -> None:
        """Rebuild `pool` so that page i holds what page `src[i]` held (-1: an empty page, left
        free); page tables, holes and reference counts follow. Plain pages only."""
        keep = src >= 0
        idx = torch.from_numpy(np.maximum(src, 0).astype(np.int64)).to(self.device)
        empty = torch.from_numpy(~keep).to(self.device)

        def pick(t: torch.Tensor, fill: float) -> torch.Tensor:
            out = t.index_select(0, idx)
            return out.masked_fill_(empty.view(-1, *[1] * (t.dim() - 1)), fill) if not keep.all() else out
        with torch.inference_mode(False):  # see __init__
            pool.storage.k, pool.storage.v = pick(pool.storage.k, 0.0), pick(pool.storage.v, 0.0)
            pool.slot_pos = pick(pool.slot_pos, -1)
            if pool.key_min is not None:
                pool.key_min, pool.key_max = pick(pool.key_min, math.inf), pick(pool.key_max, -math.inf)
            if pool.scores is not None:
                pool.scores = pick(pool.scores, 0.0)
        new_id = np.full(pool.capacity + 1, -1, dtype=np.int32)  # old id -> new; -1 stays -1 (index -1)
        new_id[src[keep]] = np.flatnonzero(keep).astype(np.int32)
        pool.refcount = np.where(keep, pool.refcount[np.maximum(src, 0)], 0).astype(np.int32)
        pool.table = new_id[pool.table]
        S = self.page_size
        for row, free in pool.holes.items():
            pool.holes[row] = [int(new_id[s // S]) * S + s % S for s in free]
        pool.capacity = len(src)
        pool.free_pages, pool.spare = [], np.flatnonzero(~keep)[::-1].tolist()

    def _release_empty(self, pool: _Layer, row: int, pages: set[int]) -> None:
        empty = [p for p in pages if not bool((pool.slot_pos[p] >= 0).any())]
        if not empty:
            return
        S, gone = self.page_size, set(empty)
        pool.set_pages(row, [p for p in pool.pages_of(row) if p not in gone])
        pool.holes[row] = [s for s in pool.holes[row] if s // S not in gone]
        pool.release(empty)
