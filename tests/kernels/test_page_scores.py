"""page_scores / update_key_bounds (Triton) against their definitions: Quest's bound and the
forcing rules of `kvkit.scoring`, the store's own key bounds."""

import math

import pytest
import torch

from kvkit import PagedKVStore
from kvkit import scoring
from kvkit.kernels import page_scores, update_key_bounds
from kvkit.kernels.ref import update_key_bounds_ref


def page_scores_ref(q, key_min, key_max, page_table, reduce="max", sink_pages=0, recent_pages=0, forced=None):
    """`kvkit.scoring.quest_scores` with the kernel's list-index forcing: the first `sink_pages`
    and last `recent_pages` entries of a list +inf, then non-zero `forced` entries, padding -inf."""
    idx = torch.arange(page_table.shape[-1], device=page_table.device)
    valid = page_table >= 0
    length = torch.where(valid, idx + 1, 0).amax(-1, keepdim=True)  # one past the last valid entry
    rule = torch.where((idx < sink_pages) | (idx >= length - recent_pages), math.inf, 0.0)
    if forced is not None:
        rule = torch.where(forced != 0, forced, rule)
    rule = torch.where(valid, rule, -math.inf)
    boxes = scoring.signed_boxes(key_min, key_max, page_table.long())
    return scoring.quest_scores(q, boxes, rule, reduce)


def select_pages(q, key_min, key_max, page_table, budget, reduce="max", sink_pages=0, recent_pages=0, forced=None):
    """The kernel's scores, chosen by `kvkit.scoring.top_pages` (as the decode engine does)."""
    scores = page_scores(q, key_min, key_max, page_table, reduce, sink_pages, recent_pages, forced)
    return scoring.top_pages(scores, page_table, budget)


def select_pages_ref(q, key_min, key_max, page_table, budget, reduce="max", sink_pages=0, recent_pages=0,
                     forced=None):
    scores = page_scores_ref(q, key_min, key_max, page_table, reduce, sink_pages, recent_pages, forced)
    return scoring.top_pages(scores, page_table, budget)


def _bounds_case(B, Hq, Hkv, P, N=96, D=64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    table = torch.stack([torch.randperm(N, generator=g)[:P] for _ in range(B * Hkv)]).view(B, Hkv, P)
    q = torch.randn(B, Hq, D, generator=g)
    return (q.to(device), torch.minimum(a, b).to(device), torch.maximum(a, b).to(device), table.to(device))


@pytest.mark.parametrize("num_qo_heads,num_kv_heads", [(4, 4), (6, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("reduce", ["max", "sum", "mean"])
def test_page_scores_matches_ref(num_qo_heads, num_kv_heads, reduce, device):
    q, lo, hi, table = _bounds_case(2, num_qo_heads, num_kv_heads, P=45, seed=num_qo_heads, device=device)
    table[0, 0, 30:] = -1          # shorter list
    table[1, -1, :] = -1           # empty list
    table[0, -1, 7] = -1           # hole
    got = page_scores(q, lo, hi, table, reduce, sink_pages=2, recent_pages=3)
    want = page_scores_ref(q, lo, hi, table, reduce, sink_pages=2, recent_pages=3)
    assert torch.equal(got == math.inf, want == math.inf) and torch.equal(got == -math.inf, want == -math.inf)
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-5)
    assert torch.all(got[1, -1] == -math.inf)
    assert torch.all(got[0, 0, :2] == math.inf) and torch.all(got[0, 0, 27:30] == math.inf)


def test_page_scores_bound_q_dot_k(device):
    """The score of a page is >= q·k of every key in it, for every head of the group (reduce='max')."""
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(10, 16, 32, generator=g)  # [N, S, D]
    q = torch.randn(1, 4, 32, generator=g)
    table = torch.arange(10)[None, None].repeat(1, 2, 1)
    scores = page_scores(q.to(device), keys.amin(1).to(device), keys.amax(1).to(device), table.to(device))
    qk = torch.einsum("bgd,nsd->bgns", q, keys).amax(-1).view(1, 2, 2, 10).amax(2)  # [1, Hkv, N]
    assert torch.all(scores.cpu() >= qk - 1e-4)


def test_page_scores_forced_scores_win_where_nonzero(device):
    """A caller's forced scores (Quest's position-based sink/window pages: +inf, float32 max)
    replace the bound where non-zero; padding stays -inf."""
    q, lo, hi, table = _bounds_case(2, 6, 2, P=30, seed=11, device=device)
    table[1, 1, 25:] = -1
    forced = torch.zeros(table.shape, dtype=torch.float32)
    forced[..., 0] = torch.finfo(torch.float32).max
    forced[..., -2:] = math.inf
    forced = forced.to(device)
    got = page_scores(q, lo, hi, table, "mean", forced=forced)
    want = page_scores_ref(q, lo, hi, table, "mean", forced=forced)
    assert torch.equal(got[..., 0], want[..., 0]) and torch.all(got[0, :, -2:] == math.inf)
    assert torch.all(got[1, 1, 25:] == -math.inf)
    torch.testing.assert_close(got[..., 1:25], want[..., 1:25], atol=1e-4, rtol=1e-5)
    sel = select_pages(q, lo, hi, table, 5, forced=forced)
    assert torch.equal(sel, select_pages_ref(q, lo, hi, table, 5, forced=forced))


@pytest.mark.parametrize("budget,sink,recent", [(1, 0, 0), (6, 1, 2), (8, 0, 0), (64, 2, 2)])
def test_select_pages_matches_ref(budget, sink, recent, device):
    q, lo, hi, table = _bounds_case(2, 6, 2, P=20, seed=budget, device=device)
    table[1, 0, 12:] = -1
    got = select_pages(q, lo, hi, table, budget, "max", sink, recent)
    want = select_pages_ref(q, lo, hi, table, budget, "max", sink, recent)
    assert got.shape == (2, 2, min(budget, 20))
    assert torch.equal(got, want)
    for b in range(2):  # forced pages are in, lists shorter than the budget keep everything
        for h in range(2):
            n = int((table[b, h] >= 0).sum())
            kept = set(got[b, h][got[b, h] >= 0].tolist())
            assert set(table[b, h, :min(sink, n)].tolist()) <= kept
            assert set(table[b, h, max(n - recent, 0):n].tolist()) <= kept
            assert len(kept) == min(budget, n)


def test_page_scores_rejects_bad_input(device):
    q, lo, hi, table = _bounds_case(1, 4, 2, P=8, device=device)
    with pytest.raises(ValueError, match="reduce must be one of"):
        page_scores(q, lo, hi, table, reduce="median")
    with pytest.raises(NotImplementedError, match="softmax"):
        page_scores(q, lo, hi, table, reduce="softmax")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        page_scores(q[:, :3], lo, hi, table)


def test_update_key_bounds_matches_store_append(device):
    """Folding keys in with the kernel gives the store's own key bounds (index_reduce_)."""
    g = torch.Generator().manual_seed(2)
    store = PagedKVStore(1, 2, 64, page_size=16, dtype=torch.bfloat16, key_bounds=True)
    seq = store.add_sequence()
    k = torch.randn(40, 2, 64, generator=g)
    store.append(seq, 0, k, torch.randn(40, 2, 64, generator=g))
    want_min, want_max = store.key_bounds(0)
    N = want_min.shape[0]
    lo, hi = torch.full((N, 64), math.inf), torch.full((N, 64), -math.inf)
    rows, pages = [], []
    for h in range(2):
        for i, p in enumerate(store.page_table(seq, 0, h)):
            n = min(16, 40 - 16 * i)
            rows.append(k[16 * i:16 * i + n, h])
            pages += [p] * n
    rows = torch.cat(rows).bfloat16().float()  # the store bounds the keys as stored (rounded to bf16)
    lo, hi = lo.to(device), hi.to(device)
    update_key_bounds(lo, hi, torch.tensor(pages, device=device), rows.to(device))
    assert torch.equal(lo.cpu(), want_min.float()) and torch.equal(hi.cpu(), want_max.float())


def test_update_key_bounds_matches_ref_with_repeats(device):
    g = torch.Generator().manual_seed(3)
    lo, hi = torch.randn(12, 32, generator=g), torch.randn(12, 32, generator=g) + 3
    pages, k = torch.randint(0, 12, (50,), generator=g), 2 * torch.randn(50, 32, generator=g)
    want_lo, want_hi = lo.clone(), hi.clone()
    update_key_bounds_ref(want_lo, want_hi, pages, k)
    lo, hi = lo.to(device), hi.to(device)
    update_key_bounds(lo, hi, pages.to(device), k.to(device))
    assert torch.equal(lo.cpu(), want_lo) and torch.equal(hi.cpu(), want_hi)
    update_key_bounds(lo, hi, pages[:0].to(device), k[:0].to(device))  # nothing to do
    with pytest.raises(TypeError, match="must be float32"):
        update_key_bounds(lo.half(), hi.half(), pages.to(device), k.to(device))


@pytest.mark.gpu
def test_page_scores_large_matches_ref(device):
    q, lo, hi, table = _bounds_case(16, 32, 8, P=4096, N=65536, D=128, device=device)
    torch.testing.assert_close(page_scores(q, lo, hi, table, sink_pages=1, recent_pages=4),
                               page_scores_ref(q, lo, hi, table, sink_pages=1, recent_pages=4),
                               atol=1e-3, rtol=1e-5)
