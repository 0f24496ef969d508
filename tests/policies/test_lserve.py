"""LServeSelector: two-level selection, reuse across decode steps, invariants, full budget = dense."""

import json
import math

import pytest
import torch

from kvkit import policies
from kvkit.attention import decode
from kvkit.policies import FullSelector, Policy
from kvkit.policies.selectors.quest import LServeSelector, QuestSelector
from kvkit.store import Selection
from kvkit.testing import random_store as make_store, tiny_llama_generate


def append_one(store, seqs, seed):
    g = torch.Generator().manual_seed(seed)
    for seq in seqs:
        store.append(seq, 0, 0.1 * torch.randn(1, 3, 16, generator=g), torch.randn(1, 3, 16, generator=g))


def chosen(sel, b=0, h=0):
    return sorted(p for p in sel.pages[b, h].tolist() if p >= 0)


def test_page_whose_bound_must_win_is_read_through_both_levels():
    store, (seq,) = make_store([256])  # 32 pages of 8, 8 logical pages of 4
    q = torch.zeros(1, 9, 16)
    q[0, :3, 2] = 1.0
    page = store.page_table(seq, 0, 0)[17]
    key = torch.zeros(16)
    key[2] = 40.0
    store.storage(0).k[page, 3] = key
    store.key_bounds(0)[1][page] = torch.maximum(store.key_bounds(0)[1][page], key)
    sel = LServeSelector(budget=32, sink=4, window=8, group=4, coarse=1).select(store, [seq], 0, q, [0, 1, 2])
    assert page in chosen(sel)


def test_selection_is_reused_for_reuse_steps_then_refreshed():
    store, seqs = make_store([200, 203], seed=1)
    sel = LServeSelector(budget=40, sink=4, window=8, reuse_steps=3)
    first = sel.select(store, seqs, 0, torch.randn(2, 9, 16), [0, 1, 2])
    for step in range(2):  # two more steps reuse it, whatever the query
        append_one(store, seqs, step)
        again = sel.select(store, seqs, 0, torch.randn(2, 9, 16) * 5, [0, 1, 2])
        for b in range(2):
            for h in range(3):
                scored = set(chosen(first, b, h))
                now = set(chosen(again, b, h))
                newest = store.page_table(seqs[b], 0, h)[-1]
                assert now - {newest} <= scored | {newest}
    state = store.policy_state(seqs[0])[("lserve", 0, (0, 1, 2))]
    assert state[0] == 200
    append_one(store, seqs, 9)
    sel.select(store, seqs, 0, torch.randn(2, 9, 16), [0, 1, 2])  # 3 steps later: refreshed
    assert store.policy_state(seqs[0])[("lserve", 0, (0, 1, 2))][0] == 203


def test_reused_selection_never_returns_a_freed_page():
    store, (seq,) = make_store([256], seed=2)
    sel = LServeSelector(budget=48, sink=4, window=8, reuse_steps=8)
    first = sel.select(store, [seq], 0, torch.randn(1, 9, 16), [0, 1, 2])
    victims = [p for p in chosen(first, 0, 1) if p not in store.page_table(seq, 0, 1)[:1] + store.page_table(seq, 0, 1)[-1:]]
    assert victims
    pos = store.slot_positions(0)[victims[0]]
    store.evict(seq, 0, 1, pos[pos >= 0])  # the page goes back to the pool
    append_one(store, [seq], 0)
    again = sel.select(store, [seq], 0, torch.randn(1, 9, 16), [0, 1, 2])
    assert victims[0] not in chosen(again, 0, 1)
    assert set(chosen(again, 0, 1)) <= set(store.page_table(seq, 0, 1))


@pytest.mark.parametrize("budget,group,coarse", [(32, 4, 1), (48, 2, 2), (80, 8, 3)])
def test_invariants_budget_sinks_window(budget, group, coarse):
    store, seqs = make_store([150, 301, 64], seed=3)
    sel = LServeSelector(budget=budget, sink=4, window=8, group=group, coarse=coarse, reuse_steps=2)
    for step in range(3):
        pages = sel.select(store, seqs, 0, torch.randn(3, 9, 16), [0, 1, 2]).pages
        for b, seq in enumerate(seqs):
            n = store.length(seq, 0)
            for h in range(3):
                got = [p for p in pages[b, h].tolist() if p >= 0]
                table = store.page_table(seq, 0, h)
                assert len(got) == len(set(got)) and set(got) <= set(table)
                assert len(got) <= budget // 8 or len(got) == len(table)
                sp = store.slot_positions(0)[got]
                held = set(sp[sp >= 0].tolist())
                assert {0, 1, 2, 3} <= held and set(range(n - 8, n)) <= held
        append_one(store, seqs, step)


def test_coarse_enough_equals_quest():
    store, seqs = make_store([300, 177], seed=4, scale=1.0)
    q = torch.randn(2, 9, 16)
    two = LServeSelector(budget=64, sink=4, window=8, group=4, coarse=100).select(store, seqs, 0, q, [0, 1, 2])
    one = QuestSelector(budget=64, sink=4, window=8).select(store, seqs, 0, q, [0, 1, 2])
    assert torch.equal(two.pages, one.pages)


def test_full_budget_equals_dense():
    store, seqs = make_store([90, 37], seed=5, scale=1.0)
    q = torch.randn(2, 9, 16)
    sel = LServeSelector(budget=1024, sink=4, window=8).select(store, seqs, 0, q, [0, 1, 2])
    full = FullSelector().select(store, seqs, 0, q, [0, 1, 2])
    torch.testing.assert_close(decode(q, store, seqs, 0, sel)[0], decode(q, store, seqs, 0, full)[0])


@pytest.mark.parametrize("bad,match", [(dict(group=0), "group must be"), (dict(reuse_steps=0), "reuse_steps"),
                                       (dict(budget=8, window=8), "exceed the budget")])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        LServeSelector(**bad)


def test_registry_and_config_round_trip():
    p = policies.get("lserve", budget=256, reuse_steps=2)
    assert Policy.from_config(json.loads(json.dumps(p.to_config()))) == p


def test_tiny_llama_full_budget_equals_dense_and_small_budget_runs():
    dense, _ = tiny_llama_generate("dense")
    assert torch.equal(tiny_llama_generate("lserve", budget=4096)[0], dense)
    small, cache = tiny_llama_generate("lserve", budget=48, window=16, reuse_steps=3, dense_layers=1)
    assert small.shape == dense.shape
    assert ("lserve", 2, (0, 1)) in cache.store.policy_state(cache.seqs[0])


@pytest.mark.slow
def test_smollm2_passkey_at_one_eighth_budget():
    """About a minute on 2 idle cores: one needle at 2.4K tokens, 300-token budget."""
    from kvkit.evaluate import load, passkey
    model, tok = load()
    results = passkey(model, tok, policies.get("lserve", budget=2400 // 8), context_tokens=2400,
                      depths=(0.5,), progress=False)
    assert all(r.correct for r in results), [(r.key, r.answer) for r in results]


@pytest.mark.parametrize("reduce", ["max", "sum", "softmax"])
@pytest.mark.parametrize("name", ["quest", "lserve"])
def test_a_short_sequence_scores_the_same_alone_and_in_a_ragged_batch(name, reduce):
    """Padding entries of a ragged batch take no part in a sequence's scores (softmax included)."""
    from kvkit import scoring

    batch, seqs = make_store([200, 37], seed=3)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 16, generator=g)

    def scores_of(ids, qq):
        pages = batch.page_tables(ids, 0)
        boxes = scoring.signed_boxes(*batch.key_bounds(0), pages)
        if name == "lserve":
            return scoring.lserve_scores(qq, boxes, 6, 2, 2, reduce)
        return QuestSelector(budget=48, sink=4, window=8, reduce=reduce).scores(batch, ids, 0, qq, pages)
    scores, single = scores_of(seqs, q), scores_of(seqs[1:], q[1:])
    P = single.shape[-1]
    assert torch.isinf(scores[1, :, P:]).all() and (scores[1, :, P:] < 0).all()
    torch.testing.assert_close(scores[1:, :, :P], single)


def test_lean_reuse_drops_a_page_a_fork_copied_on_write():
    """A fork shares its parent's last page; the child's next append copies it to a new page,
    so the kept choice names a page the child no longer lists. The reuse must not read it."""
    store, (parent,) = make_store([203], seed=6)
    sel = LServeSelector(budget=48, sink=4, window=8, reuse_steps=8)
    sel.select(store, [parent], 0, torch.randn(1, 9, 16), [0, 1, 2])
    child = store.fork(parent)
    old_last = store.page_table(child, 0, 0)[-1]
    append_one(store, [child], 0)
    new_last = store.page_table(child, 0, 0)[-1]
    assert new_last != old_last and store.nothing_evicted([child], 0)
    again = sel.select(store, [child], 0, torch.randn(1, 9, 16), [0, 1, 2])
    assert store.policy_state(child)[("lserve", 0, (0, 1, 2))][0] == 203  # reused, not refreshed
    assert new_last in chosen(again) and old_last not in chosen(again)
    assert set(chosen(again)) <= set(store.page_table(child, 0, 0))


@pytest.mark.parametrize("lengths", [[203], [203, 150], [60, 203, 9]])  # rows gain pages at different steps
def test_reuse_as_kept_reads_what_the_general_reuse_reads(lengths):
    """Between refreshes, while no page has come since the choice, the kept pages are the
    choice (read with host lengths); it must read exactly what the general reuse (forced
    pages, kept pages, top-k) reads, and step aside once a new page appears."""
    from kvkit.attention import decode
    from kvkit.scoring import forced_pages, is_listed, top_pages
    store, seqs = make_store(lengths, seed=9)
    sel = LServeSelector(budget=48, sink=4, window=8, reuse_steps=16)
    g = torch.Generator().manual_seed(1)
    sel.select(store, seqs, 0, torch.randn(len(seqs), 9, 16, generator=g), [0, 1, 2])
    saw_lean = saw_general = False
    for step in range(10):
        append_one(store, seqs, step)
        q = torch.randn(len(seqs), 9, 16, generator=g)
        got = sel.select(store, seqs, 0, q, [0, 1, 2])
        pages = store.page_tables(seqs, 0)
        kept = torch.nn.utils.rnn.pad_sequence([store.policy_state(s)[("lserve", 0, (0, 1, 2))][1].T for s in seqs],
                                               padding_value=-1).permute(1, 2, 0)
        forced = forced_pages(tuple(store.length(s, 0) for s in seqs), pages.shape[-1], 8, 4, 8, "cpu")
        scores = torch.where(forced != 0, forced, torch.where(is_listed(pages, kept), 0.0, -math.inf))
        want = top_pages(scores, pages, 6)
        assert [sorted(set(r) - {-1}) for r in got.pages.reshape(-1, got.pages.shape[-1]).tolist()] == \
            [sorted(set(r) - {-1}) for r in want.reshape(-1, want.shape[-1]).tolist()]
        out, _ = decode(q, store, seqs, 0, got)
        ref, _ = decode(q, store, seqs, 0, Selection(want), backend="ref")
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        saw_lean |= got.lengths is not None
        saw_general |= got.lengths is None
    assert saw_lean and saw_general
