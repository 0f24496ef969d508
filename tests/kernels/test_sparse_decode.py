"""sparse_decode (Triton) against kvkit.attention.ref.sparse_decode_ref, under TRITON_INTERPRET=1."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kvkit import PagedKVStore, Selection
from kvkit.attention import decode
from kvkit.attention.ref import sparse_decode_ref
from kvkit.kernels import sparse_decode
from kvkit.kernels.testing import LSE_TOL, TOL, random_paged_case

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GQA = [(4, 4), (6, 2), (8, 2), (8, 1)]  # ratios 1, 3, 4, 8


def _check(case, device, **kw):
    args = {k: v for k, v in case.items() if k != "positions"}
    out, lse = sparse_decode(**args, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "num_splits"}
    ref_out, ref_lse = sparse_decode_ref(**{k: v.cpu() for k, v in args.items()}, **ref_kw)
    atol, rtol = TOL[out.dtype]
    assert out.dtype == case["q"].dtype and out.shape == case["q"].shape
    torch.testing.assert_close(out.cpu(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_qo_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("seq_len", [1, 17, 97])  # one token, partial second page, many pages
def test_sparse_decode_matches_ref(dtype, num_qo_heads, num_kv_heads, seq_len, device):
    case = random_paged_case(2, num_qo_heads, num_kv_heads, seq_lens=[seq_len, seq_len // 2 + 3],
                             budget_pages=4, dtype=dtype, evict_frac=0.1, seed=seq_len, device=device)
    _check(case, device)


@pytest.mark.parametrize("page_size,head_dim", [(16, 128), (64, 64), (64, 128), (8, 64), (48, 80)])
def test_sparse_decode_page_sizes_and_head_dims(page_size, head_dim, device):
    case = random_paged_case(2, 8, 2, head_dim=head_dim, page_size=page_size, seq_lens=[150, 70],
                             dtype=torch.bfloat16, evict_frac=0.05, seed=1, device=device)
    _check(case, device)


def test_sparse_decode_per_head_lengths_and_empty_lists(device):
    # (seq, head) lists of 0, 1, 5, 7 pages in one launch; one sequence reads nothing at all
    case = random_paged_case(3, 6, 2, seq_lens=[[0, 16], [70, 100], [0, 0]], seed=2, device=device)
    out, lse = _check(case, device)
    assert torch.all(out[0, :3] == 0) and torch.all(lse[0, :3] == -math.inf)
    assert torch.all(out[2] == 0) and torch.all(lse[2] == -math.inf)


def test_sparse_decode_no_pages_at_all(device):
    case = random_paged_case(2, 4, 2, seq_lens=0, device=device)
    assert case["page_table"].shape[-1] == 0
    out, lse = _check(case, device)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)


def test_sparse_decode_padding_inside_lists_and_fully_evicted_pages(device):
    case = random_paged_case(2, 4, 2, seq_lens=80, seed=3, device=device)
    case["page_table"][0, 0, 1] = -1                        # a hole in the middle of a list
    page = int(case["page_table"][1, 1, 2])
    case["slot_valid"][page] = False                        # a listed page whose slots are all empty
    _check(case, device)


def test_sparse_decode_single_page_selection(device):
    case = random_paged_case(2, 8, 2, seq_lens=[40, 90], budget_pages=1, seed=4, device=device)
    assert case["page_table"].shape[-1] == 1
    _check(case, device)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 64])  # 64 > pages: most splits are empty
def test_sparse_decode_splits_merge_to_the_same_result(num_splits, device):
    case = random_paged_case(2, 6, 2, seq_lens=[[100, 30], [7, 64]], seed=5, device=device)
    _check(case, device, num_splits=num_splits)


def test_sparse_decode_slot_mask_and_scale(device):
    case = random_paged_case(2, 4, 2, seq_lens=50, seed=6, device=device)
    B, Hkv, P = case["page_table"].shape
    mask = torch.rand(B, Hkv, P, 16, generator=torch.Generator().manual_seed(0)) > 0.3
    _check(case, device, slot_mask=mask.to(device), scale=0.3)


def test_sparse_decode_all_pages_equals_sdpa(device):
    """With every page listed and in order, the result is plain GQA SDPA on the unpaged K/V."""
    case = random_paged_case(1, 6, 2, seq_lens=45, shuffle_pages=True, seed=7, device=device)
    out, _ = sparse_decode(**{k: v for k, v in case.items() if k != "positions"})
    pages = case["page_table"][0]                                      # [Hkv, P]
    k = case["k_cache"][pages].flatten(1, 2)[:, :45]                    # [Hkv, L, D]
    v = case["v_cache"][pages].flatten(1, 2)[:, :45]
    want = F.scaled_dot_product_attention(case["q"][0][:, None], k, v, enable_gqa=True)[:, 0]
    torch.testing.assert_close(out[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_decode_over_a_store_matches_decode(dtype, device):
    """On a real PagedKVStore (evictions, slot reuse, different heads): equals kvkit.attention.decode."""
    g = torch.Generator().manual_seed(8)
    store = PagedKVStore(num_layers=1, num_kv_heads=3, head_dim=64, page_size=16, dtype=dtype)
    seqs = [store.add_sequence() for _ in range(2)]
    for s, n in zip(seqs, (70, 33)):
        store.append(s, 0, torch.randn(n, 3, 64, generator=g), torch.randn(n, 3, 64, generator=g))
    store.evict(seqs[0], 0, 1, range(5, 40))         # head 1 of seq 0 drops pages
    store.append(seqs[0], 0, torch.randn(9, 3, 64, generator=g), torch.randn(9, 3, 64, generator=g))
    table = store.page_tables(seqs, 0)
    q = torch.randn(2, 9, 64, generator=g).to(dtype)
    want, _ = decode(q, store, seqs, 0, Selection(table))
    st = store.storage(0)
    out, _ = sparse_decode(q, st.k, st.v, table, store.slot_positions(0) >= 0)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, want, atol=atol, rtol=rtol)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.sampled_from([1, 3, 4]),
       S=st.sampled_from([4, 16, 32]), lens=st.lists(st.integers(0, 70), min_size=9, max_size=9),
       budget=st.one_of(st.none(), st.integers(1, 4)), splits=st.integers(1, 4))
def test_sparse_decode_random_geometry(B, Hkv, G, S, lens, budget, splits):
    from kvkit.kernels._common import interpreted
    from kvkit.kernels._sparse_decode import _sparse_decode_kernel
    device = "cpu" if interpreted(_sparse_decode_kernel) else "cuda"
    per_head = [[lens[(b * Hkv + h) % 9] for h in range(Hkv)] for b in range(B)]
    case = random_paged_case(B, Hkv * G, Hkv, page_size=S, seq_lens=per_head, budget_pages=budget,
                             evict_frac=0.1, seed=sum(lens), device=device)
    _check(case, device, num_splits=splits)


def test_sparse_decode_rejects_bad_input(device):
    case = random_paged_case(2, 4, 2, seq_lens=20, device=device)
    args = {k: v for k, v in case.items() if k != "positions"}
    with pytest.raises(ValueError, match="num_qo_heads=3 must be a multiple"):
        sparse_decode(**{**args, "q": args["q"][:, :3]})
    with pytest.raises(ValueError, match=r"q must be \[num_seqs, num_qo_heads, head_dim\]"):
        sparse_decode(**{**args, "q": args["q"][0]})
    with pytest.raises(TypeError, match="must share one of"):
        sparse_decode(**{**args, "q": args["q"].half()})
    with pytest.raises(ValueError, match="slot_valid must be bool"):
        sparse_decode(**{**args, "slot_valid": args["slot_valid"].int()})
    with pytest.raises(NotImplementedError, match="head_dim=320"):
        sparse_decode(torch.zeros(1, 1, 320), torch.zeros(1, 16, 320), torch.zeros(1, 16, 320),
                      torch.zeros(1, 1, 1, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sparse_decode_large_matches_ref(dtype, device):
    case = random_paged_case(8, 32, 8, head_dim=128, page_size=16, seq_lens=8192, budget_pages=256,
                             dtype=dtype, evict_frac=0.01, device=device)
    _check(case, device)
