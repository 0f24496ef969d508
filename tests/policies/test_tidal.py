"""TidalSelector: selection layers choose by real attention, later layers read those tokens only."""

import json

import pytest
import torch

from kvkit import PagedKVStore, policies
from kvkit.attention import decode
from kvkit.policies import FullSelector, Policy
from kvkit.policies.selectors.tidal import TidalSelector
from kvkit.testing import tiny_llama_generate

LAYERS = 4


def make_store(lengths, page_size=8, seed=0, shuffle=True):
    """Every layer gets the same tokens, appended in a different page order (shuffle)."""
    g = torch.Generator().manual_seed(seed)
    store = PagedKVStore(LAYERS, 3, 16, page_size=page_size, dtype=torch.float32)
    seqs = [store.add_sequence() for _ in lengths]
    for layer in range(LAYERS):
        if shuffle and layer % 2:  # take some pages first, so this layer's page ids differ
            junk = store.add_sequence()
            store.append(junk, layer, torch.zeros(3 * page_size, 3, 16), torch.zeros(3 * page_size, 3, 16))
        for seq, n in zip(seqs, lengths):
            store.append(seq, layer, 0.3 * torch.randn(n, 3, 16, generator=g), torch.randn(n, 3, 16, generator=g))
    return store, seqs


def read_positions(store, seq_idx, seq, layer, sel, head):
    pages = sel.pages[seq_idx, head]
    sp = store.slot_positions(layer)[pages.clamp(min=0)]
    ok = (sp >= 0) & (pages >= 0)[:, None]
    if sel.slot_mask is not None:
        ok &= sel.slot_mask[seq_idx, head]
    return set(sp[ok].tolist())


def test_token_with_highest_attention_is_reused_by_later_layers():
    store, (seq,) = make_store([200])
    q = torch.zeros(1, 9, 16)
    q[0, :, 7] = 3.0
    for h in range(3):  # position 77 has a key along channel 7 in the selection layer
        page = store.page_table(seq, 1, h)[77 // 8]
        store.storage(1).k[page, 77 % 8, 7] = 20.0
    sel = TidalSelector(budget=24, sink=4, window=8, selection_layers=(1,))
    assert sel.select(store, [seq], 0, q, [0, 1, 2]).slot_mask is None  # dense before
    at_sel = sel.select(store, [seq], 1, q, [0, 1, 2])
    assert int(at_sel.num_pages.min()) == len(store.page_table(seq, 1, 0))  # the selection layer reads all
    for layer in (2, 3):
        later = sel.select(store, [seq], layer, torch.randn(1, 9, 16), [0, 1, 2])
        for h in range(3):
            got = read_positions(store, 0, seq, layer, later, h)
            assert 77 in got
            assert {0, 1, 2, 3} <= got and set(range(192, 200)) <= got
            assert len(got) <= 24


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("budget", [16, 40, 100])
def test_invariants_budget_group_shares_no_freed_page(shared, budget):
    store, seqs = make_store([150, 97, 260], seed=1)
    sel = TidalSelector(budget=budget, sink=4, window=8, selection_layers=(1,), shared=shared)
    q = torch.randn(3, 9, 16)
    sel.select(store, seqs, 1, q, [0, 1, 2])
    for layer in (2, 3):
        out = sel.select(store, seqs, layer, q, [0, 1, 2])
        assert out.slot_mask is not None and out.slot_mask.shape == (*out.pages.shape, 8)
        for b, seq in enumerate(seqs):
            n = store.length(seq, layer)
            sets = []
            for h in range(3):
                got = read_positions(store, b, seq, layer, out, h)
                assert set(p for p in out.pages[b, h].tolist() if p >= 0) <= set(store.page_table(seq, layer, h))
                assert len(got) <= budget
                if n > budget:
                    assert {0, 1, 2, 3} <= got and set(range(n - 8, n)) <= got
                sets.append(got)
            if shared:
                assert sets[0] == sets[1] == sets[2]


def test_stale_choice_is_not_reused():
    store, (seq,) = make_store([120], seed=2)
    sel = TidalSelector(budget=16, sink=4, window=8, selection_layers=(1,))
    sel.select(store, [seq], 1, torch.randn(1, 9, 16), [0, 1, 2])
    for layer in range(LAYERS):  # the next decode step: one more token everywhere
        store.append(seq, layer, torch.randn(1, 3, 16), torch.randn(1, 3, 16))
    out = sel.select(store, [seq], 3, torch.randn(1, 9, 16), [0, 1, 2])  # layer 1 was skipped
    assert out.slot_mask is None  # it selected for itself (reads all)
    assert store.policy_state(seq)[("tidal", (0, 1, 2))][:2] == (121, 3)


def test_full_budget_equals_dense():
    store, seqs = make_store([90, 37], seed=3)
    q = torch.randn(2, 9, 16)
    sel = TidalSelector(budget=1024, selection_layers=(1,))
    sel.select(store, seqs, 1, q, [0, 1, 2])
    got = sel.select(store, seqs, 2, q, [0, 1, 2])
    full = FullSelector().select(store, seqs, 2, q, [0, 1, 2])
    torch.testing.assert_close(decode(q, store, seqs, 2, got)[0], decode(q, store, seqs, 2, full)[0])


def test_budget_covering_all_tokens_reads_exactly_dense_through_slot_mask():
    store, seqs = make_store([90], seed=4)
    q = torch.randn(1, 9, 16)
    sel = TidalSelector(budget=89, sink=4, window=8, selection_layers=(1,))  # 1 token short
    sel.select(store, seqs, 1, q, [0, 1, 2])
    out = sel.select(store, seqs, 2, q, [0, 1, 2])
    assert all(len(read_positions(store, 0, seqs[0], 2, out, h)) == 89 for h in range(3))


@pytest.mark.parametrize("bad,match", [(dict(selection_layers=()), "selection_layers"),
                                       (dict(budget=0), "budget"), (dict(budget=8, window=8), "exceed")])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        TidalSelector(**bad)


def test_registry_cli_and_config_round_trip():
    p = policies.get("tidal", budget=256, selection_layers="2,9")
    assert p.selector.selection_layers == (2, 9)
    assert Policy.from_config(json.loads(json.dumps(p.to_config()))) == p


def test_tiny_llama_full_budget_equals_dense_and_small_budget_runs():
    dense, _ = tiny_llama_generate("dense")
    assert torch.equal(tiny_llama_generate("tidal", budget=4096, selection_layers=[1])[0], dense)
    small, cache = tiny_llama_generate("tidal", budget=40, window=16, selection_layers=[1])
    assert small.shape == dense.shape
    n, layer, chosen = cache.store.policy_state(cache.seqs[1])[("tidal", (0, 1))]
    assert layer == 1 and chosen.shape == (1, 40) and n == 120 + 11


@pytest.mark.slow
def test_smollm2_passkey_at_one_eighth_budget():
    """About a minute on 2 idle cores: one needle at 2.4K tokens, 300-token budget."""
    from kvkit.evaluate import load, passkey
    model, tok = load()
    results = passkey(model, tok, policies.get("tidal", budget=2400 // 8), context_tokens=2400,
                      depths=(0.5,), progress=False)
    assert all(r.correct for r in results), [(r.key, r.answer) for r in results]
