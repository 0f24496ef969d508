"""Page choice in vLLM (`kvkit.integrations.vllm.selection`), on plain tensors: no vLLM needed,
so these run in the default suite too.

Pages are (block, KV head) pairs with the signed boxes `[max | -min]` of R sub-pages each
(`[N, R, 2D]`, kvkit.scoring's layout). The scoring rules are `kvkit.scoring`'s; these tests pin
that the vLLM backend's use of them chooses what kvkit's selectors choose.
Shapes: B requests, H KV heads, G query heads per KV head, P listed pages, D head_dim.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvkit import PagedKVStore
from kvkit.integrations.vllm.selection import (FILL_SCORE, block_bound_scores, choose_afresh, empty_bounds,
                                              lserve_block_scores, page_boxes)
from kvkit.policies.selectors.quest import LServeSelector
from kvkit.scoring import (forced_from_lengths, forced_from_positions, lserve_scores, reduce_group, reuse_scores,
                           signed_boxes, top_pages, top_pages_per_row)


@pytest.mark.parametrize("R", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_bound_is_the_best_sub_page_bound_and_bounds_every_key(R, dtype):
    """A block's score from sub-page max/min equals the elementwise Quest bound of its best
    sub-page (to the bounds' dtype), is never below the true max of q·k over the block's keys,
    and ignores sub-pages not written yet."""
    g = torch.Generator().manual_seed(R)
    B, H, G, P, sub, D = 2, 3, 3, 5, 8, 16
    keys = torch.randn(B * H * P, R, sub, D, generator=g).to(dtype).float()  # page b*H*P + h*P + p
    written = torch.ones(B * H * P, R, dtype=torch.bool)
    written[3, R - 1] = R == 1  # one page whose last sub-page is empty (when R > 1)
    bounds = empty_bounds(B * H * P, R, D, dtype)
    bounds[..., :D] = torch.where(written[..., None], keys.amax(2), bounds[..., :D].float()).to(dtype)
    bounds[..., D:] = torch.where(written[..., None], -keys.amin(2), bounds[..., D:].float()).to(dtype)
    vpages = torch.arange(B * H * P).view(B, H, P)
    vpages[1, 2, 4] = -1  # padding
    q = torch.randn(B, H * G, D, generator=g).to(dtype)
    got = block_bound_scores(q, bounds, vpages)  # [B, H, G, P]
    qg = q.float().view(B, H, G, 1, 1, D)
    hi, lo = bounds[..., :D].float().view(B, H, 1, P, R, D), -bounds[..., D:].float().view(B, H, 1, P, R, D)
    each = torch.maximum(qg * lo, qg * hi).sum(-1)  # [B, H, G, P, R]
    want = torch.where(written.view(B, H, 1, P, R), each, -torch.inf).amax(-1)
    want[1, 2, :, 4] = -torch.inf
    tol = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (0.1, 1e-2)}[dtype]  # bf16: 8-bit mantissa
    torch.testing.assert_close(got, want, atol=tol[0], rtol=tol[1])
    true_max = torch.einsum("bhgd,bhprsd->bhgprs", q.float().view(B, H, G, D), keys.view(B, H, P, R, sub, D))
    true_max = torch.where(written.view(B, H, 1, P, R, 1), true_max, -torch.inf).flatten(-2).amax(-1)
    true_max[1, 2, :, 4] = -torch.inf  # the padding page
    assert (got >= true_max - tol[0] - tol[1] * true_max.abs()).all()


def test_top_pages_per_row_is_top_pages_row_by_row():
    g = torch.Generator().manual_seed(3)
    B, H, P = 6, 3, 12
    scores = torch.randn(B, H, P, generator=g)
    scores[4, :, 7:] = -float("inf")  # a short request: pages past its end
    pages = torch.arange(B * H * P).view(B, H, P)
    k = torch.tensor([1, 4, 4, 12, 9, 2])
    got = top_pages_per_row(scores, pages, k)
    assert got.shape == (B, H, 12)
    for b in range(B):
        want = top_pages(scores[b : b + 1], pages[b : b + 1], int(k[b]))[0]
        assert torch.equal(got[b, :, : want.shape[-1]], want)
        assert (got[b, :, want.shape[-1] :] == -1).all()
        chosen = got[b][got[b] >= 0].view(H, -1)
        assert (chosen.diff(dim=-1) > 0).all()  # list order, padding only at the end
    same = torch.full((B,), 5)
    assert torch.equal(top_pages_per_row(scores, pages, same), top_pages(scores, pages, 5))


def _store_case(lengths, S=8, H=3, G=3, D=16, seed=0):
    """A float32 kvkit store holding `lengths` tokens per sequence, its page tables, and the same
    boxes in vLLM's per-page layout with one sub-page per page (R = 1) and an empty page 0 in
    front (vLLM's null block, which -1 entries gather): `vpages` = store page + 1."""
    g = torch.Generator().manual_seed(seed)
    store = PagedKVStore(1, H, D, page_size=S, dtype=torch.float32, key_bounds=True)
    seqs = [store.add_sequence() for _ in lengths]
    for s, n in zip(seqs, lengths):
        k = torch.randn(n, H, D, generator=g) + torch.randn(1, H, D, generator=g) * 2  # RoPE-like offsets
        store.append(s, 0, k, torch.randn(n, H, D, generator=g))
    pages = store.page_tables(seqs, 0)  # [B, H, P], -1 past a short sequence's end
    kmin, kmax = store.key_bounds(0)
    bounds = torch.cat([empty_bounds(1, 1, D, torch.float32), torch.cat([kmax, -kmin], -1)[:, None]])  # [1 + N, 1, 2D]
    q = torch.randn(len(lengths), H * G, D, generator=g)
    return store, seqs, pages, torch.where(pages >= 0, pages + 1, -1), bounds, q


@pytest.mark.parametrize("group,coarse", [(4, 2), (2, 1), (3, 3)])
def test_lserve_scores_are_lserve_selectors_two_level_scores(group, coarse):
    """On pages that are whole blocks (R = 1, float32) `lserve_block_scores` gives each page inside
    the kept logical pages the score LServeSelector's `kvkit.scoring.lserve_scores` call on the
    store gives it, the others FILL_SCORE instead of -inf, padding -inf; with the sink/window
    forcing the same pages are chosen as `LServeSelector.select` chooses at a refresh. Ragged
    lengths, a partial last page."""
    lengths, budget = [203, 120, 77], 48  # 6 pages of 8 per KV head
    store, seqs, pages, vpages, bounds, q = _store_case(lengths)
    sel = LServeSelector(budget=budget, sink=4, window=8, group=group, coarse=coarse)
    k = torch.full((len(lengths),), budget // 8)
    got = lserve_block_scores(q, bounds, page_boxes(bounds), vpages, k, sel)
    kmin, kmax = store.key_bounds(0)
    want = lserve_scores(q, signed_boxes(kmin, kmax, pages), budget // 8, group, coarse)
    inside = want > -math.inf
    torch.testing.assert_close(got[inside], want[inside], atol=1e-4, rtol=1e-5)
    assert (got[~inside & (pages >= 0)] == FILL_SCORE).all()
    assert (got[pages < 0] == -math.inf).all()
    boxes = page_boxes(bounds)
    boxes[0] = 1e3  # whatever page 0 holds, padding entries (which read it) score -inf
    assert torch.equal(lserve_block_scores(q, bounds, boxes, vpages, k, sel) == -math.inf, got == -math.inf)
    forced = forced_from_lengths(torch.tensor(lengths), pages.shape[-1], 8, 4, 8)[:, None, :].expand_as(pages)
    slots = forced_from_positions(store.slot_positions(0), pages, torch.tensor(lengths), 4, 8)
    assert torch.equal(forced, slots)
    chosen = top_pages_per_row(torch.where(forced != 0, forced, got), pages, k)
    assert torch.equal(chosen, sel.select(store, seqs, 0, q, [0, 1, 2]).pages)


def test_lserve_scores_take_a_budget_per_row():
    lengths = [160, 160, 160]
    _, _, _, pages, bounds, q = _store_case(lengths, seed=1)
    sel = LServeSelector(budget=32, sink=4, window=8, group=2, coarse=1)
    k = torch.tensor([2, 6, 4])
    both = lserve_block_scores(q, bounds, page_boxes(bounds), pages, k, sel)
    for b in range(3):
        alone = lserve_block_scores(q[b : b + 1], bounds, page_boxes(bounds), pages[b : b + 1], k[b : b + 1], sel)
        assert torch.equal(both[b : b + 1] > FILL_SCORE, alone > FILL_SCORE)  # the same logical pages kept
        torch.testing.assert_close(both[b : b + 1], alone, atol=1e-5, rtol=1e-6)  # the bounds' matmul shape differs
        assert int((both[b] > FILL_SCORE).sum(-1).max()) == int(k[b])  # ceil(coarse * k / group) * group


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lserve_scores_with_sub_pages_score_the_kept_blocks_by_their_best_sub_page(dtype):
    """R = 4 sub-pages per block, ragged rows (one ends inside a logical page, one is a single
    block), budgets per row: the logical pages are ranked by the Quest bound of the union of
    their blocks' boxes, and each block inside the kept ones scores its `block_bound_scores`
    (best sub-page), computed here over the whole list; to the bounds' dtype."""
    g = torch.Generator().manual_seed(7)
    B, H, G, P, R, D = 3, 2, 3, 11, 4, 16
    N = 1 + B * H * P
    keys = torch.randn(N, R, 8, D, generator=g) + torch.randn(N, 1, 1, D, generator=g) * 2
    bounds = torch.cat([keys.amax(2), -keys.amin(2)], -1).to(dtype)  # [N, R, 2D]
    bounds[0] = empty_bounds(1, R, D, dtype)[0]  # the null block
    vpages = (1 + torch.randperm(N - 1, generator=g)).view(B, H, P)
    vpages[1, :, 6:] = -1  # ends inside the second logical page (group 4)
    vpages[2, :, 1:] = -1  # a single block
    q = torch.randn(B, H * G, D, generator=g).to(dtype)
    sel = LServeSelector(budget=64, sink=4, window=8, group=4, coarse=2)
    k = torch.tensor([2, 3, 2])
    got = lserve_block_scores(q, bounds, page_boxes(bounds), vpages, k, sel)
    fine = reduce_group(block_bound_scores(q, bounds, vpages), "max", D ** -0.5)  # [B, H, P]
    padded = torch.nn.functional.pad(vpages, (0, 1), value=-1).view(B, H, 3, 4)
    hi = bounds[padded.clamp(min=0)][..., :D].float()  # [B, H, 3, 4, R, D]
    lo = -bounds[padded.clamp(min=0)][..., D:].float()
    box_hi, box_lo = hi.amax((3, 4)), lo.amin((3, 4))  # [B, H, 3, D]
    qg = q.float().view(B, H, G, 1, D)
    coarse = torch.maximum(qg * box_lo[:, :, None], qg * box_hi[:, :, None]).sum(-1).amax(2)  # [B, H, 3]
    coarse = coarse.masked_fill(padded[..., 0] < 0, -math.inf)
    rtol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]  # bf16: 8-bit mantissa
    for b in range(B):
        keep = min(3, -(-2 * int(k[b]) // 4))
        for h in range(H):
            inside = got[b, h] > FILL_SCORE  # the blocks of the kept logical pages
            kept = sorted({p // 4 for p in inside.nonzero().squeeze(1).tolist()})
            real = int((padded[b, h, :, 0] >= 0).sum())
            assert len(kept) == min(keep, real)
            best = coarse[b, h].sort(descending=True).values[len(kept) - 1]
            assert all(float(coarse[b, h, i]) >= float(best) - rtol * abs(float(best)) for i in kept)
            assert torch.equal(inside, torch.isin(torch.arange(P) // 4, torch.tensor(kept)) & (vpages[b, h] >= 0))
            torch.testing.assert_close(got[b, h][inside], fine[b, h][inside], atol=1e-4, rtol=rtol)
    assert (got[vpages < 0] == -math.inf).all()


def test_lserve_fills_the_budget_when_the_kept_logical_pages_run_short():
    """Budget 4 pages, coarse 1, group 4, 5 pages: the best logical page is the partial last one
    (one page), so LServeSelector would read 1 page; here the other 3 come from FILL_SCORE, as
    the virtual plan reads exactly min(budget, listed) pages."""
    D = 8
    bounds = empty_bounds(6, 1, D, torch.float32)  # page 0: the never-written null block
    bounds[1:, 0, :D], bounds[1:, 0, D:] = 0.1, 0.1  # every page a small box: max 0.1, min -0.1
    bounds[5, 0, :D], bounds[5, 0, D:] = 5.0, -4.0  # page 5 (alone in logical page 1) bounds q·k high
    pages = torch.arange(1, 6).view(1, 1, 5)
    sel = LServeSelector(budget=4, sink=0, window=1, group=4, coarse=1)
    scores = lserve_block_scores(torch.ones(1, 1, D), bounds, page_boxes(bounds), pages, torch.tensor([4]), sel)
    assert scores[0, 0, 4] > FILL_SCORE and (scores[0, 0, :4] == FILL_SCORE).all()
    chosen = top_pages(scores, pages, 4)
    assert (chosen >= 0).all() and 5 in chosen


def test_reuse_scores_keep_the_kept_entries_and_the_forcing_adds_the_window():
    kept = torch.tensor([[[2, 5, -1], [0, 1, 6]]])  # [B=1, H=2, K=3], one row padded
    scores = reuse_scores(kept, 8, FILL_SCORE)
    assert scores.shape == (1, 2, 8)
    assert (scores[0, 0, [2, 5]] == 0).all() and (scores[0, 1, [0, 1, 6]] == 0).all()
    assert int((scores == 0).sum()) == 5 and (scores[scores != 0] == FILL_SCORE).all()
    forced = forced_from_lengths(torch.tensor([64]), 8, 8, 0, 8)[:, None, :].expand(1, 2, 8)  # page 7: window
    chosen = top_pages(torch.where(forced != 0, forced, scores), torch.arange(8).expand(1, 2, 8), 3)
    assert chosen[0, 0].tolist() == [2, 5, 7]  # the kept pages and the window page
    # head 1 kept 3 pages: the window page goes in, two of the kept ones (tied at 0) stay
    assert chosen[0, 1, -1] == 7 and set(chosen[0, 1, :2].tolist()) < {0, 1, 6}


def test_choose_afresh_every_reuse_steps_tokens_and_the_batch_together():
    chosen_at: dict[str, int] = {}
    seen = []
    for n in range(100, 110):  # two requests decoding side by side, "b" joins 2 steps late
        ids, lengths = (["a", "b"], [n, n - 2]) if n >= 102 else (["a"], [n])
        seen.append(choose_afresh(chosen_at, ids, lengths, [False] * len(ids), reuse_steps=4))
    a = [row[0] for row in seen]
    b = [row[1] for row in seen[2:]]
    assert a == [True, False, False, False] * 2 + [True, False]
    # "b" chooses on joining, then with "a" when a's choice is 4 tokens old (b's is 2)
    assert b == [True, False, True, False, False, False, True, False]
    # a request whose pages fit its budget keeps nothing: the next step chooses afresh
    assert choose_afresh(chosen_at, ["a"], [111], [True], 4) == [True] and "a" not in chosen_at
    assert choose_afresh(chosen_at, ["a"], [112], [False], 4) == [True]
    # recomputed after preemption at a shorter length: afresh
    assert choose_afresh(chosen_at, ["a"], [50], [False], 4) == [True] and chosen_at["a"] == 50


def test_choose_afresh_forgets_requests_that_left():
    chosen_at = {f"old{i}": 10 for i in range(100)}
    assert choose_afresh(chosen_at, ["new"], [20], [False], 4) == [True]
    assert set(chosen_at) == {"new"}
