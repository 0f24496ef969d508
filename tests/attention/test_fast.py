"""kvkit.attention.fast against the reference (kvkit.attention.ref)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvkit.attention.fast import dense_decode_fast, sparse_decode_fast
from kvkit.attention.ref import sparse_decode_ref
from kvkit.testing import TOL, random_paged_case


@pytest.mark.parametrize("seq_len", [1, 15, 16, 17, 97])
@pytest.mark.parametrize("num_qo_heads,num_kv_heads", [(4, 4), (9, 3)])
@pytest.mark.parametrize("budget_pages", [0, 1, 4, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode_fast_matches_ref(seq_len, num_qo_heads, num_kv_heads, budget_pages, dtype):
    case = random_paged_case(seq_len, num_qo_heads, num_kv_heads, page_size=16, budget_pages=budget_pages,
                             shuffle_pages=True, dtype=dtype, seed=seq_len)
    args = {k: case[k] for k in ("q", "k_cache", "v_cache", "page_table", "slot_valid")}
    ref, _ = sparse_decode_ref(**args)
    got = sparse_decode_fast(**args)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)


def test_sparse_decode_fast_slot_mask_matches_ref():
    case = random_paged_case(70, 9, 3, page_size=8, seed=1)
    args = {k: case[k] for k in ("q", "k_cache", "v_cache", "page_table", "slot_valid")}
    mask = torch.rand(*case["page_table"].shape, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    ref, _ = sparse_decode_ref(**args, slot_mask=mask)
    torch.testing.assert_close(sparse_decode_fast(**args, slot_mask=mask), ref, atol=1e-5, rtol=1e-5)


def test_dense_decode_fast_equals_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 9, 64, generator=g), torch.randn(2, 3, 300, 64, generator=g), torch.randn(2, 3, 300, 64, generator=g)
    want = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(dense_decode_fast(q, k, v), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [200, 203, 64])
@pytest.mark.parametrize("budget", [32, 64, 4096])
@pytest.mark.parametrize("crowded", [False, True])  # True: other sequences' pages fill the pool
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # both score in float32
def test_quest_decode_fast_matches_the_general_selection_and_ref(length, budget, crowded, dtype):
    from kvkit import PagedKVStore, Selection
    from kvkit.attention import decode
    from kvkit.policies.selectors.quest import QuestSelector, top_pages
    g = torch.Generator().manual_seed(length)
    store = PagedKVStore(1, 3, 16, page_size=8, dtype=dtype, key_bounds=True)
    if crowded:
        other = store.add_sequence()
        store.append(other, 0, torch.randn(3 * length, 3, 16, generator=g), torch.randn(3 * length, 3, 16, generator=g))
    seq = store.add_sequence()
    store.append(seq, 0, torch.randn(length, 3, 16, generator=g), torch.randn(length, 3, 16, generator=g))
    q = torch.randn(1, 9, 16, generator=g)
    table = store.page_tables([seq], 0)
    selector = QuestSelector(budget=budget, sink=4, window=8)  # its general path: per-slot positions
    sel = Selection(top_pages(selector.scores(store, [seq], 0, q, table), table, budget // 8))
    want, _ = decode(q, store, [seq], 0, sel, backend="ref")
    out, top = quest_decode_fast_call(store, seq, q, table, length, budget)
    chosen = table.gather(-1, top).sort(-1).values
    assert torch.equal(chosen, sel.pages.sort(-1).values)
    atol, rtol = TOL[dtype]  # the reference reads the pages in float32, the fast path in the store's dtype
    torch.testing.assert_close(out, want, atol=atol, rtol=rtol)


def quest_decode_fast_call(store, seq, q, table, length, budget):
    from kvkit.attention.fast import quest_decode_fast
    kmin, kmax = store.key_bounds(0)
    return quest_decode_fast(q, store.storage(0).k, store.storage(0).v, kmin, kmax, table, [length],
                             budget // store.page_size, sink=4, window=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["all", "masked", "padded", "empty"])
def test_decode_auto_on_cpu_runs_the_fast_path_for_plain_pages(dtype, case, monkeypatch):
    import kvkit.attention.fast as fast
    from kvkit import PagedKVStore, Selection
    from kvkit.attention import decode
    from kvkit.policies.codecs.quant import Int8Codec
    g = torch.Generator().manual_seed(7)
    store = PagedKVStore(1, 3, 64, page_size=16, dtype=dtype)
    quant = PagedKVStore(1, 3, 64, page_size=16, dtype=dtype, page_format=Int8Codec(group_size=32))
    seqs = []
    for st in (store, quant):
        seqs = [st.add_sequence() for _ in range(2)]
        for s, n in zip(seqs, (75, 30)):  # ragged, with a part-filled last page
            st.append(s, 0, torch.randn(n, 3, 64, generator=g), torch.randn(n, 3, 64, generator=g))
        st.evict(seqs[0], 0, 2, range(10, 50))  # holes: slots that hold no token
    q = torch.randn(2, 9, 64, generator=g).to(dtype)
    table = store.page_tables(seqs, 0)
    sel = {"all": Selection(table),
           "masked": Selection(table[..., [0, 2]], slot_mask=torch.rand(2, 3, 2, 16, generator=g) > 0.3),
           "padded": Selection(torch.where(torch.arange(table.shape[-1]) < 2, table, -1)),
           "empty": Selection(torch.full_like(table, -1))}[case]
    calls = []
    real = fast.sparse_decode_fast
    monkeypatch.setattr(fast, "sparse_decode_fast", lambda *a, **k: calls.append(1) or real(*a, **k))
    got, _ = decode(q, store, seqs, 0, sel)
    want, _ = decode(q, store, seqs, 0, sel, backend="ref")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    if case == "empty":
        assert not got.any()
    assert calls == [1]
    decode(q, quant, seqs, 0, Selection(quant.page_tables(seqs, 0)))  # int8 pages: the reference
    decode(q, store, seqs, 0, sel, return_stats=True)  # evictors' stats: the reference
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[75], [75, 75], [64], [75, 30]])  # [75, 30]: rows differ, the mask stays
def test_decode_slices_a_valid_prefix_instead_of_masking(dtype, lengths, monkeypatch):
    """Nothing evicted, pages in list order: each row reads its first `length` slots, so the fast
    path reads a slice (no mask); rows of different lengths keep the mask. Both match the reference."""
    import kvkit.attention.fast as fast
    from kvkit import PagedKVStore, Selection
    from kvkit.attention import decode
    g = torch.Generator().manual_seed(len(lengths))
    store = PagedKVStore(1, 3, 64, page_size=16, dtype=dtype)
    seqs = [store.add_sequence() for _ in lengths]
    for s, n in zip(seqs, lengths):
        store.append(s, 0, torch.randn(n, 3, 64, generator=g), torch.randn(n, 3, 64, generator=g))
    q = torch.randn(len(lengths), 9, 64, generator=g).to(dtype)
    prefixes = []
    real = fast._valid_prefix
    monkeypatch.setattr(fast, "_valid_prefix", lambda valid: prefixes.append(real(valid)) or prefixes[-1])
    got, _ = decode(q, store, seqs, 0, Selection(store.page_tables(seqs, 0)))
    want, _ = decode(q, store, seqs, 0, Selection(store.page_tables(seqs, 0)), backend="ref")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    assert prefixes == [lengths[0] if len(set(lengths)) == 1 else None]


def test_valid_prefix_only_for_equal_true_prefixes():
    from kvkit.attention.fast import _valid_prefix
    rows = torch.zeros(2, 3, 8, dtype=torch.bool)
    rows[..., :5] = True
    assert _valid_prefix(rows) == 5
    rows[1, 2, 4] = False  # one row shorter
    assert _valid_prefix(rows) is None
    rows[1, 2, 4], rows[0, 0, 1], rows[0, 0, 5] = True, False, True  # same count, a hole
    assert _valid_prefix(rows) is None
    assert _valid_prefix(torch.zeros(1, 3, 8, dtype=torch.bool)) is None  # nothing to read: the mask path's zeros
    assert _valid_prefix(torch.ones(1, 1, 4, dtype=torch.bool)) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[75, 30], [64, 64], [1, 17], [16, 33, 48]])
@pytest.mark.parametrize("name", ["dense", "quest"])
def test_host_prefix_lengths_read_what_the_positions_read(dtype, lengths, name):
    """On clean rows the selectors hand decode `Selection.lengths` (no per-slot positions); it
    must read exactly the tokens the reference reads from the slots' positions, ragged batches,
    page boundaries and one-token rows included; rows with evicted holes get no lengths."""
    from kvkit import policies
    from kvkit.attention import decode
    g = torch.Generator().manual_seed(sum(lengths))
    policy = policies.get(name) if name == "dense" else policies.get(name, budget=24, window=8, dense_layers=0)
    store = policy.make_store(1, 3, 64, page_size=8, dtype=dtype)
    seqs = [store.add_sequence() for _ in lengths]
    for s, n in zip(seqs, lengths):
        store.append(s, 0, torch.randn(n, 3, 64, generator=g), torch.randn(n, 3, 64, generator=g))
    q = torch.randn(len(lengths), 9, 64, generator=g).to(dtype)
    sel = policy.select(store, seqs, 0, q)
    assert sel.lengths is not None
    got, _ = decode(q, store, seqs, 0, sel)
    want, _ = decode(q, store, seqs, 0, type(sel)(sel.pages), backend="ref")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    store.evict(seqs[0], 0, 1, [0])
    assert policy.select(store, seqs, 0, q).lengths is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths,steps", [([300], 0), ([300], 5), ([300, 300], 21), ([256, 256], 1), ([129], 40)])
def test_runs_read_in_place_match_the_reference(dtype, lengths, steps, monkeypatch):
    """Rows prefilled in one piece hold their pages in one run per row; decode reads the runs as
    a strided view of the pool and gathers only the pages after them (a tail that ends on a
    page boundary, a partial one, or none), merging the two by log-sum-exp."""
    from kvkit import policies
    from kvkit.attention import decode
    from kvkit.attention import fast
    from kvkit.store import shared_run
    monkeypatch.setattr(fast, "MIN_RUN_TOKENS", 64)  # small cases, the long-context path
    g = torch.Generator().manual_seed(sum(lengths) + steps)
    policy = policies.get("dense")
    store = policy.make_store(1, 3, 64, page_size=16, dtype=dtype)
    seqs = [store.add_sequence() for _ in lengths]
    for s, n in zip(seqs, lengths):
        store.append(s, 0, torch.randn(n, 3, 64, generator=g), torch.randn(n, 3, 64, generator=g))
    for _ in range(steps):
        store.append_step(seqs, 0, torch.randn(len(seqs), 3, 64, generator=g), torch.randn(len(seqs), 3, 64, generator=g))
    q = torch.randn(len(lengths), 9, 64, generator=g).to(dtype)
    sel = policy.select(store, seqs, 0, q)
    assert shared_run(sel.pages.numpy(), sel.lengths, store.page_size) is not None
    got, _ = decode(q, store, seqs, 0, sel)
    want, _ = decode(q, store, seqs, 0, type(sel)(sel.pages), backend="ref")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def test_rows_not_laid_out_in_one_run_are_gathered(monkeypatch):
    from kvkit.attention import fast
    from kvkit.store import shared_run
    monkeypatch.setattr(fast, "MIN_RUN_TOKENS", 128)  # 8 pages of 16
    table = np.arange(40).reshape(1, 2, 20)
    assert shared_run(table, np.array([[320, 320]]), 16) == (0, 20, 20)
    table[0, 1] = np.arange(100, 120)  # row 1 elsewhere: two rows always have one stride
    assert shared_run(table, np.array([[320, 320]]), 16) == (0, 100, 20)
    table[0, 1, 5] = 7  # a broken run: 5 pages in place; the rest is a tail to gather
    assert shared_run(table, np.array([[320, 320]]), 16) == (0, 100, 5)
    assert shared_run(table, np.array([[320, 60]]), 16) == (0, 100, 4)  # at most the pages a row reads
    assert shared_run(table, np.array([[320, 0]]), 16) is None  # an empty row: nothing in place
    rows = np.arange(60).reshape(1, 3, 20)
    rows[0, 2] += 5  # starts 0, 20, 45: no single stride
    assert shared_run(rows, np.array([[320, 320, 320]]), 16) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_qo_heads,num_kv_heads", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("lengths,steps", [([1], 0), ([16], 0), ([16], 1), ([300], 5), ([33, 33], 15), ([64, 64, 64], 1)])
def test_decode_in_place_matches_the_reference(dtype, num_qo_heads, num_kv_heads, lengths, steps):
    """The dense step's own path (`decode_in_place`: the store read as one strided view) gives
    the reference's output over the same pages, at page boundaries (16, 16 + 1, 64 + 1) and
    with rows that grew by decode into the room after them."""
    from kvkit import policies
    from kvkit.attention.decode import decode, decode_in_place
    g = torch.Generator().manual_seed(sum(lengths) + steps + num_kv_heads)
    policy = policies.get("dense")
    store = policy.make_store(2, num_kv_heads, 64, page_size=16, dtype=dtype)
    seqs = [store.add_sequence() for _ in lengths]
    for s, n in zip(seqs, lengths):
        store.append(s, 1, torch.randn(n, num_kv_heads, 64, generator=g), torch.randn(n, num_kv_heads, 64, generator=g))
    for _ in range(steps):
        kv = [torch.randn(len(seqs), num_kv_heads, 64, generator=g) for _ in range(2)]
        store.append_step(seqs, 1, *kv)
    q = torch.randn(len(lengths), num_qo_heads, 64, generator=g).to(dtype)
    got = decode_in_place(q, store, seqs, 1)
    assert got is not None
    want, _ = decode(q, store, seqs, 1, type(store.read_all(seqs, 1))(store.page_tables(seqs, 1)), backend="ref")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def test_decode_in_place_declines_what_is_not_one_uniform_view(monkeypatch):
    """Ragged rows, an evicted hole, pages that are not plain, or another backend asked for:
    None, so the general `decode` runs; a q of the wrong shape is refused as `decode` refuses it."""
    from kvkit import policies
    from kvkit.attention.decode import decode_in_place
    g = torch.Generator().manual_seed(0)
    store = policies.get("dense").make_store(1, 3, 64, page_size=16)
    a, b = store.add_sequence(), store.add_sequence()
    store.append(a, 0, torch.randn(40, 3, 64, generator=g), torch.randn(40, 3, 64, generator=g))
    store.append(b, 0, torch.randn(20, 3, 64, generator=g), torch.randn(20, 3, 64, generator=g))
    q = torch.randn(2, 9, 64, generator=g)
    assert decode_in_place(q, store, [a, b], 0) is None  # 40 and 20 tokens: ragged
    assert decode_in_place(q[:1], store, [a], 0) is not None
    with pytest.raises(ValueError, match="q must be"):
        decode_in_place(q, store, [a], 0)
    monkeypatch.setenv("KVKIT_ATTENTION_BACKEND", "ref")
    assert decode_in_place(q[:1], store, [a], 0) is None
    monkeypatch.delenv("KVKIT_ATTENTION_BACKEND")
    store.evict(a, 0, 1, [3])
    assert decode_in_place(q[:1], store, [a], 0) is None  # a hole: per-slot positions decide
    int8 = policies.get("int8").make_store(1, 3, 64, page_size=16)
    c = int8.add_sequence()
    int8.append(c, 0, torch.randn(40, 3, 64, generator=g), torch.randn(40, 3, 64, generator=g))
    assert decode_in_place(q[:1], int8, [c], 0) is None
