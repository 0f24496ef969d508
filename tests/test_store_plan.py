"""The per-step plan of the store: layers with one history share what decode derives from their
page tables (write slots, `read_all`), rows grow in place, and a relayout keeps every token.

Every test checks what it relies on against what was written: a plan shared by mistake would
put one layer's tokens in another's slots, which the read-back comparisons catch."""
import numpy as np
import pytest
import torch

from kvkit import PagedKVStore
from kvkit.store import HEADROOM

H, D, S, L = 2, 8, 4, 3


def make(**kw) -> PagedKVStore:
    return PagedKVStore(num_layers=L, num_kv_heads=H, head_dim=D, page_size=S, dtype=torch.float32, **kw)


class Model:
    """Writes distinct random k/v per (layer, token) into a store and keeps them to compare with."""

    def __init__(self, store: PagedKVStore, seqs: list[int]):
        self.store, self.seqs = store, seqs
        self.k = {(s, layer): [] for s in seqs for layer in range(L)}
        self.v = {(s, layer): [] for s in seqs for layer in range(L)}
        self.gen = torch.Generator().manual_seed(0)

    def prefill(self, seq: int, t: int, layers=range(L)) -> None:
        for layer in layers:
            k, v = torch.randn(t, H, D, generator=self.gen), torch.randn(t, H, D, generator=self.gen)
            self.store.append(seq, layer, k, v)
            self.k[seq, layer] += list(k)
            self.v[seq, layer] += list(v)

    def step(self, layers=range(L)) -> None:
        for layer in layers:
            k = torch.randn(len(self.seqs), H, D, generator=self.gen)
            v = torch.randn(len(self.seqs), H, D, generator=self.gen)
            self.store.append_step(self.seqs, layer, k, v)
            for i, s in enumerate(self.seqs):
                self.k[s, layer].append(k[i])
                self.v[s, layer].append(v[i])

    def check(self, evicted=()) -> None:
        """Every (seq, layer, head) reads back what was written, but for (seq, layer, head, pos)
        in `evicted`; `read_all`'s pages hold exactly those tokens."""
        for s in self.seqs:
            for layer in range(L):
                want_k = torch.stack(self.k[s, layer])
                want_v = torch.stack(self.v[s, layer])
                for h in range(H):
                    keep = [p for p in range(len(want_k)) if (s, layer, h, p) not in evicted]
                    pos, k, v = self.store.read(s, layer, h)
                    assert pos.tolist() == keep
                    assert torch.equal(k, want_k[keep, h]) and torch.equal(v, want_v[keep, h])
        for layer in range(L):
            sel = self.store.read_all(self.seqs, layer)
            assert torch.equal(sel.pages, self.store.page_tables(self.seqs, layer))
            lengths = self.store.prefix_lengths(self.seqs, layer)
            assert (sel.lengths is None) == (lengths is None)
            if lengths is not None:
                assert np.array_equal(sel.lengths, lengths)


def test_layers_with_one_history_share_one_plan_and_keep_their_own_tokens():
    store = make()
    seqs = [store.add_sequence(), store.add_sequence()]
    model = Model(store, seqs)
    model.prefill(seqs[0], 9)
    model.prefill(seqs[1], 14)
    for _ in range(6):  # fills pages and takes new ones: both paths of append_step
        model.step()
    model.check()
    first = store.read_all(seqs, 0)
    assert all(store.read_all(seqs, layer) is first for layer in range(1, L))  # computed once


def test_an_eviction_gives_its_layer_a_plan_of_its_own():
    store = make()
    seqs = [store.add_sequence(), store.add_sequence()]
    model = Model(store, seqs)
    for s in seqs:
        model.prefill(s, 10)
    model.step()
    store.evict(seqs[0], 1, 0, [2, 3, 5])  # two layers evict differently: no stamp in common
    store.evict(seqs[0], 2, 0, [6])
    assert store.read_all(seqs, 1) is not store.read_all(seqs, 0)
    assert store.read_all(seqs, 1) is not store.read_all(seqs, 2)
    for _ in range(7):  # layers 1 and 2 fill their holes, layer 0 takes pages
        model.step()
    model.check(evicted={(seqs[0], 1, 0, p) for p in (2, 3, 5)} | {(seqs[0], 2, 0, 6)})


def test_a_failed_write_does_not_leave_a_shared_plan_behind(monkeypatch):
    # A write that raises after the store took pages for it gives them back, though not in the
    # order they were taken: layer 0 must then stop sharing layer 1's plan.
    store = make()
    seqs = [store.add_sequence(), store.add_sequence()]
    model = Model(store, seqs)
    storage = store.storage(0)
    write = storage.write_slots

    def fail_once(*args):
        monkeypatch.setattr(storage, "write_slots", write)
        raise RuntimeError("device lost")
    monkeypatch.setattr(storage, "write_slots", fail_once)
    with pytest.raises(RuntimeError, match="device lost"):
        model.prefill(seqs[0], 5 * S + 1, layers=[0])
    for s in seqs:
        model.prefill(s, 5 * S + 1)
    model.check()
    for _ in range(S - 1):  # into the pages the prompts left room in: the steps' shared plan
        model.step()
    model.check()


def test_decode_rows_stay_one_run_of_pages_past_their_headroom():
    store = make()
    seqs = [store.add_sequence() for _ in range(3)]
    model = Model(store, seqs)
    for s in seqs:
        model.prefill(s, 16 * S)  # 16 pages a row: 16 // HEADROOM pages of room after each
    for _ in range((16 // HEADROOM + 3) * S):  # past the room: the pool is laid out again
        model.step()
    model.check()
    for layer in range(L):
        sel = store.read_all(seqs, layer)
        assert sel.run is not None and sel.run[2] == sel.pages.shape[-1]  # every page, in place


def test_a_relayout_forgets_the_page_ids_policies_kept():
    store = make()
    seqs = [store.add_sequence(), store.add_sequence()]
    model = Model(store, seqs)
    for s in seqs:
        model.prefill(s, 8 * S)
    store.policy_state(seqs[0])["chosen"] = [1, 2, 3]  # page ids a selector remembers
    for _ in range(3 * S):
        model.step()
    model.check()
    assert store.policy_state(seqs[0]) == {}


def test_the_headroom_never_makes_an_append_fail():
    # Exactly the pages the prompts need: no room is set aside, and nothing fails.
    store = make(max_pages=2 * H * 16)
    seqs = [store.add_sequence(), store.add_sequence()]
    model = Model(store, seqs)
    for s in seqs:
        model.prefill(s, 16 * S)
    model.check()
    assert store.stats().pages_free == 0
