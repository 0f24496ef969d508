import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvkit import OutOfPages, PagedKVStore, UnknownSequence
from kvkit.store import HEADROOM

H, D, S = 2, 8, 4


def kv(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, H, D, generator=g), torch.randn(t, H, D, generator=g)


def make(**kw):
    return PagedKVStore(num_layers=2, num_kv_heads=H, head_dim=D, page_size=S, dtype=torch.float32, **kw)


def test_append_reads_back_in_position_order():
    store = make()
    seq = store.add_sequence()
    k, v = kv(10)
    assert store.append(seq, 0, k, v).tolist() == list(range(10))
    for h in range(H):
        pos, rk, rv = store.read(seq, 0, h)
        assert pos.tolist() == list(range(10))
        assert torch.equal(rk, k[:, h]) and torch.equal(rv, v[:, h])
    assert len(store.page_table(seq, 0, 0)) == 3  # 10 tokens in pages of 4
    assert store.num_resident(seq, 1, 0) == 0 and store.length(seq, 1) == 0


def test_evicted_slots_are_reused_before_new_pages():
    store = make()
    seq = store.add_sequence()
    store.append(seq, 0, *kv(8))
    pages = store.page_table(seq, 0, 0)
    assert store.evict(seq, 0, 0, [1, 2]) == 2
    store.append(seq, 0, *kv(2, seed=1))
    assert store.page_table(seq, 0, 0) == pages  # holes filled, no new page
    assert store.positions(seq, 0, 0).tolist() == [0, 3, 4, 5, 6, 7, 8, 9]


def test_emptied_page_returns_to_pool():
    store = make()
    seq = store.add_sequence()
    store.append(seq, 0, *kv(8))
    used = store.stats().pages_used
    store.evict(seq, 0, 1, [0, 1, 2, 3])
    assert store.stats().pages_used == used - 1
    assert len(store.page_table(seq, 0, 1)) == 1


def test_fork_shares_pages_and_copies_on_write():
    store = make()
    a = store.add_sequence()
    k, v = kv(6)
    store.append(a, 0, k, v)
    used = store.stats().pages_used
    b = store.fork(a)
    assert store.stats().pages_used == used  # shared, not copied
    k2, v2 = kv(1, seed=5)
    store.append(b, 0, k2, v2)  # writes into the shared partial page -> copy
    assert store.positions(a, 0, 0).tolist() == list(range(6))
    pos, rk, _ = store.read(b, 0, 0)
    assert pos.tolist() == list(range(7)) and torch.equal(rk[6], k2[0, 0])
    _, ak, _ = store.read(a, 0, 0)
    assert torch.equal(ak, k[:, 0])
    store.evict(b, 0, 0, [0])  # eviction from a shared page copies too
    assert store.positions(a, 0, 0).tolist() == list(range(6))
    store.free(a)
    store.free(b)
    assert store.stats().pages_used == 0


def test_out_of_pages_leaves_store_unchanged():
    store = make(max_pages=4)
    seq = store.add_sequence()
    store.append(seq, 0, *kv(4))  # 1 page per head -> 2 pages
    before = store.stats()
    with pytest.raises(OutOfPages, match=r"needs 4 pages; 2 free in layer 0.*unchanged"):
        store.append(seq, 0, *kv(8))
    assert store.stats() == before and store.length(seq, 0) == 4
    store.append(seq, 0, *kv(4))  # still usable: fills the 2 remaining pages
    assert store.num_resident(seq, 0, 1) == 8


@pytest.mark.parametrize("shape,match", [((3, H + 1, D), r"\[T, num_kv_heads, head_dim\] = \[T, 2, 8\]"),
                                         ((3, H, D, 1), "got \\[3, 2, 8, 1\\]")])
def test_bad_shapes_are_rejected(shape, match):
    store = make()
    seq = store.add_sequence()
    with pytest.raises(ValueError, match=match):
        store.append(seq, 0, torch.zeros(shape), torch.zeros(shape))
    assert store.stats().tokens_resident == 0


def test_bad_dtype_layer_and_sequence_are_rejected():
    store = make()
    seq = store.add_sequence()
    with pytest.raises(TypeError, match="floating"):
        store.append(seq, 0, torch.zeros(1, H, D, dtype=torch.int32), torch.zeros(1, H, D, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\)"):
        store.append(seq, 2, *kv(1))
    with pytest.raises(UnknownSequence, match="sequence 99 is not in the store"):
        store.append(99, 0, *kv(1))
    with pytest.raises(ValueError, match="not resident"):
        store.evict(seq, 0, 0, [0])
    with pytest.raises(ValueError, match="page_size must be an int >= 1"):
        PagedKVStore(1, 1, 8, page_size=0)


def test_compact_packs_holes_and_gives_the_bytes_back():
    store = make(key_bounds=True)
    seq = store.add_sequence()
    k, v = kv(40)
    store.append(seq, 0, k, v)
    for h in range(H):
        store.evict(seq, 0, h, range(1, 40, 2))  # every other token: 10 pages, each half full
    before = store.nbytes()
    assert store.stats().pages_used == 2 * 10
    released = store.compact()
    assert released > 0 and store.nbytes() == before - released
    assert store.stats().pages_capacity == store.stats().pages_used == 2 * 5  # layer 0 packed, layer 1 empty
    for h in range(H):
        pos, kk, vv = store.read(seq, 0, h)
        assert pos.tolist() == list(range(0, 40, 2))
        assert torch.equal(kk, k[0::2, h]) and torch.equal(vv, v[0::2, h])
    store.append(seq, 0, *kv(3, seed=1))  # goes on after the packed tokens
    assert store.positions(seq, 0, 0).tolist()[-3:] == [40, 41, 42]
    other = make()  # nothing evicted: compact gives back the pool's growth slack, then nothing
    s2 = other.add_sequence()
    other.append(s2, 0, *kv(9))
    assert other.compact() > 0 and other.stats().pages_capacity == 2 * 3
    assert other.compact() == 0


def test_nbytes_counts_allocated_tensors():
    store = make()
    assert store.nbytes() == 0
    seq = store.add_sequence()
    store.append(seq, 0, *kv(1))
    st_ = store.stats()
    # K and V float32 + int32 slot positions for every allocated slot of layer 0's pool
    assert store.nbytes() == st_.pages_capacity * S * (2 * D * 4 + 4)
    assert st_.nbytes_dense_equivalent == 1 * H * D * 2 * 2


class StoreMachine(RuleBasedStateMachine):
    """Any sequence of append/evict/fork/free/compact: no page leaks or has two owners, every
    resident token reads back exactly as written, and the key bounds bound every resident key."""

    def __init__(self):
        super().__init__()
        self.store = make(max_pages=40, key_bounds=True, slot_scores=True)
        self.model: dict[int, dict[int, dict[int, torch.Tensor]]] = {}  # seq -> head -> pos -> k|v
        self.counter = 0

    @rule()
    def add(self):
        self.model[self.store.add_sequence()] = {h: {} for h in range(H)}

    @precondition(lambda self: self.model)
    @rule(data=st.data(), t=st.integers(0, 9))
    def append(self, data, t):
        seq = data.draw(st.sampled_from(sorted(self.model)))
        self.counter += 1
        k, v = kv(t, seed=self.counter)
        try:
            pos = self.store.append(seq, 0, k, v)
        except OutOfPages:
            return
        for h in range(H):
            for i, p in enumerate(pos.tolist()):
                self.model[seq][h][p] = torch.cat([k[i, h], v[i, h]])

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def evict(self, data):
        seq = data.draw(st.sampled_from(sorted(self.model)))
        head = data.draw(st.integers(0, H - 1))
        resident = sorted(self.model[seq][head])
        if not resident:
            return
        gone = data.draw(st.lists(st.sampled_from(resident), max_size=5, unique=True))
        try:
            self.store.evict(seq, 0, head, gone)
        except OutOfPages:
            return
        for p in gone:
            del self.model[seq][head][p]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def fork(self, data):
        seq = data.draw(st.sampled_from(sorted(self.model)))
        child = self.store.fork(seq)
        self.model[child] = {h: dict(d) for h, d in self.model[seq].items()}

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.model)))
        self.store.free(seq)
        del self.model[seq]

    @rule()
    def compact(self):
        self.store.compact()
        pool = self.store._pools[0]
        assert not pool.num_free and pool.capacity == sum(1 for r in pool.refcount if r > 0)
        for seq in self.model:
            for h in range(H):
                table = self.store.page_table(seq, 0, h)
                if all(pool.refcount[p] == 1 for p in table):  # its own pages: packed
                    assert len(table) == -(-len(self.model[seq][h]) // S)

    @invariant()
    def key_bounds_bound_every_resident_key(self):
        kmin, kmax = self.store.key_bounds(0)
        for seq in self.model:
            for h in range(H):
                pages = torch.tensor(self.store.page_table(seq, 0, h), dtype=torch.int64)
                if pages.numel() == 0:
                    continue
                filled = self.store.slot_positions(0)[pages] >= 0  # [P, S]
                k = self.store.storage(0).k[pages]  # [P, S, D]
                assert (k >= kmin[pages][:, None] - 0)[filled].all()
                assert (k <= kmax[pages][:, None])[filled].all()

    @invariant()
    def pages_have_consistent_owners(self):
        pool = self.store._pools[0]
        owners: dict[int, int] = {}
        for seq in self.model:
            for h in range(H):
                table = self.store.page_table(seq, 0, h)
                assert len(set(table)) == len(table)
                for p in table:
                    owners[p] = owners.get(p, 0) + 1
        for p in range(pool.capacity):
            assert pool.refcount[p] == owners.get(p, 0), f"page {p} refcount"
        assert sorted(pool.free_pages + pool.spare) == [p for p in range(pool.capacity) if p not in owners]

    @invariant()
    def nothing_evicted_means_positions_in_place(self):
        for seq, heads in self.model.items():
            length = self.store.length(seq, 0)
            whole = all(len(heads[h]) == length for h in range(H))
            assert self.store.nothing_evicted([seq], 0) == whole
            if not whole:
                continue
            for h in range(H):  # entry j holds positions j*S .. j*S+S-1, in slot order
                table = torch.tensor(self.store.page_table(seq, 0, h), dtype=torch.int64)
                if table.numel():
                    sp = self.store.slot_positions(0)[table].reshape(-1)
                    assert torch.equal(sp[:length], torch.arange(length, dtype=sp.dtype))
                    assert (sp[length:] == -1).all()

    @invariant()
    def tokens_read_back(self):
        for seq, heads in self.model.items():
            for h, tokens in heads.items():
                pos, k, v = self.store.read(seq, 0, h)
                assert pos.tolist() == sorted(tokens)
                for i, p in enumerate(pos.tolist()):
                    assert torch.equal(torch.cat([k[i], v[i]]), tokens[p])
                assert self.store.num_resident(seq, 0, h) == len(tokens)


StoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_store_state_machine = StoreMachine.TestCase


# ---- the decode step, threads, failures ------------------------------------------------------------
def test_append_step_equals_one_append_per_sequence():
    """The vectorized decode write lands every token where `append` would, page by page,
    across page boundaries, ragged lengths and a fork's shared page. (Page ids may differ: a
    decode step may lay the pool out again so rows keep growing in place.)"""
    a, b = make(key_bounds=True), make(key_bounds=True)
    for store in (a, b):
        for n in (3, 4, 9):
            s = store.add_sequence()
            store.append(s, 0, *kv(n, seed=n))
        store.fork(0)
    seqs = a.sequences()
    for step in range(6):
        k, v = kv(len(seqs), seed=100 + step)
        a.append_step(seqs, 0, k, v)
        for i, s in enumerate(seqs):
            b.append(s, 0, k[i:i + 1], v[i:i + 1])
    for s in seqs:
        for h in range(H):
            ta, tb = a.page_table(s, 0, h), b.page_table(s, 0, h)
            assert len(ta) == len(tb)
            for store, table in ((a, ta), (b, tb)):  # the same tokens in the same slots of each page
                assert store.slot_positions(0)[table].tolist() == b.slot_positions(0)[tb].tolist()
                assert torch.equal(store.storage(0).k[table], b.storage(0).k[tb])
                assert torch.equal(store.key_bounds(0)[0][table], b.key_bounds(0)[0][tb])
            pa, ka, va = a.read(s, 0, h)
            pb, kb, vb = b.read(s, 0, h)
            assert torch.equal(pa, pb) and torch.equal(ka, kb) and torch.equal(va, vb)


def test_append_step_out_of_pages_gives_no_sequence_its_token():
    store = make(max_pages=4)
    s1, s2 = store.add_sequence(), store.add_sequence()
    store.append(s1, 0, *kv(4))
    store.append(s2, 0, *kv(4))  # 4 pages, all full
    before = store.stats()
    with pytest.raises(OutOfPages, match="unchanged"):
        store.append_step([s1, s2], 0, *kv(2))
    assert store.stats() == before and store.length(s1, 0) == store.length(s2, 0) == 4


def test_threads_appending_to_different_sequences_read_back_exactly():
    """Two threads per trial, each appending and evicting its own sequences while the pool
    grows: every token reads back as written."""
    import threading

    for trial in range(4):
        store = make()
        errors, written = [], {}

        def work(worker):
            try:
                seqs = [store.add_sequence() for _ in range(3)]
                for step in range(12):
                    for s in seqs:
                        k, v = kv(1 + (step + s) % 5, seed=1000 * worker + 10 * step + s)
                        pos = store.append(s, 0, k, v)
                        written.setdefault(s, {}).update({int(p): (k[i], v[i]) for i, p in enumerate(pos)})
                    store.append_step(seqs, 1, *kv(3, seed=worker + step))
                    if step % 4 == 3:
                        gone = store.positions(seqs[0], 0, 0)[:2]
                        for h in range(H):
                            store.evict(seqs[0], 0, h, gone)
                        for p in gone.tolist():
                            del written[seqs[0]][p]
                fork = store.fork(seqs[1])
                store.append(fork, 0, *kv(2, seed=worker))
                store.free(fork)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for s, tokens in written.items():
            for h in range(H):
                pos, k, v = store.read(s, 0, h)
                assert pos.tolist() == sorted(tokens)
                for i, p in enumerate(pos.tolist()):
                    assert torch.equal(k[i], tokens[p][0][h]) and torch.equal(v[i], tokens[p][1][h])


def test_a_store_filled_in_inference_mode_frees_and_appends_outside_it():
    store = make(key_bounds=True)
    with torch.inference_mode():
        seq = store.add_sequence()
        store.append(seq, 0, *kv(9))
    store.free(seq)
    assert store.stats().pages_used == 0
    seq = store.add_sequence()
    store.append(seq, 0, *kv(5))  # outside inference mode, into a pool grown inside it
    assert store.positions(seq, 0, 1).tolist() == list(range(5))
    with pytest.raises(UnknownSequence):
        store.free(seq + 100)


def test_nan_keys_into_an_encoding_codec_are_refused_and_change_nothing():
    from kvkit.policies.codecs.quant import Int8Codec
    store = PagedKVStore(1, H, D, page_size=S, dtype=torch.float32, page_format=Int8Codec())
    seq = store.add_sequence()
    store.append(seq, 0, *kv(3))
    before = store.stats()
    k, v = kv(6, seed=1)
    k[4, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf.*unchanged"):
        store.append(seq, 0, k, v)
    assert store.stats() == before and store.length(seq, 0) == 3


def test_page_size_is_bounded_and_the_pool_grows_in_proportion():
    with pytest.raises(ValueError, match="page_size must be <= 4096"):
        PagedKVStore(1, 1, 8, page_size=65536)
    store = PagedKVStore(1, 3, 64, page_size=4096, dtype=torch.bfloat16)
    seq = store.add_sequence()
    store.append(seq, 0, torch.randn(297, 3, 64), torch.randn(297, 3, 64))
    assert store.stats().pages_capacity == 3  # one page per head, not a 16-page slab


def test_a_full_pool_grows_by_a_sixteenth_not_a_quarter():
    """Free pages are resident bytes: a quantized store filled by its prefill takes about
    1/HEADROOM more pages when decode needs one, not a quarter more (budgeted policies pay for
    every free page)."""
    from kvkit import policies

    store = policies.get("gear", bits=4).make_store(1, 3, 64)
    seq = store.add_sequence()
    store.append(seq, 0, torch.randn(2400, 3, 64), torch.randn(2400, 3, 64))
    before = store.stats().pages_capacity
    store.append_step([seq], 0, torch.randn(1, 3, 64), torch.randn(1, 3, 64))
    grown = store.stats().pages_capacity - before
    assert 1 <= grown <= max(-(-before // HEADROOM), 256 // store.page_size)
