"""kvkit.scoring, the one page-scoring module: each rule against a plain definition written
here with loops and elementwise maxima, on ragged batches and both dtypes; and a guard that no
second copy of Quest's bound appears in the package."""

import math
import re
from pathlib import Path

import pytest
import torch

from kvkit import scoring
from kvkit.testing import random_store

REPO = Path(__file__).resolve().parents[1]


def plain_bound(q, key_min, key_max, pages):
    """`sum_c max(q_c * min_c, q_c * max_c)` elementwise: `[B, H, G, P]`, -inf at padding."""
    B, Hq, D = q.shape
    H, P = pages.shape[1:]
    lo = key_min.float()[pages.clamp(min=0)][:, :, None]  # [B, H, 1, P, D]
    hi = key_max.float()[pages.clamp(min=0)][:, :, None]
    qg = q.float().view(B, H, Hq // H, 1, D)
    bound = torch.maximum(qg * lo, qg * hi).sum(-1)
    return bound.masked_fill((pages < 0)[:, :, None], -math.inf)


def plain_forced(store, seqs, pages, sink, window):
    """Per listed page: +inf if it holds a recent position, SINK_SCORE a sink, -inf padding."""
    out = torch.zeros(pages.shape)
    for b, seq in enumerate(seqs):
        n = store.length(seq, 0)
        for h in range(pages.shape[1]):
            for i, page in enumerate(pages[b, h].tolist()):
                if page < 0:
                    out[b, h, i] = -math.inf
                    continue
                held = [p for p in store.slot_positions(0)[page].tolist() if p >= 0]
                if max(held) >= n - window:
                    out[b, h, i] = math.inf
                elif min(held) < sink:
                    out[b, h, i] = scoring.SINK_SCORE
    return out


def plain_lserve(q, key_min, key_max, pages, budget_pages, group, coarse):
    """LServe's two levels, one row at a time (reduce max): entries outside the kept logical
    pages -inf, inside their own bound."""
    bound = plain_bound(q, key_min, key_max, pages).amax(2)  # [B, H, P]
    B, H, P = pages.shape
    out = torch.full((B, H, P), -math.inf)
    keep = min(-(-P // group), -(-coarse * budget_pages // group))
    for b in range(B):
        for h in range(H):
            real = [i for i in range(P) if pages[b, h, i] >= 0]
            uppers = []
            for first in range(0, P, group):
                members = [i for i in range(first, min(first + group, P)) if i in real]
                if not members:
                    uppers.append(-math.inf)
                    continue
                idx = pages[b, h, members]
                lo, hi = key_min.float()[idx].amin(0), key_max.float()[idx].amax(0)
                qg = q[b, h * (q.shape[1] // H):(h + 1) * (q.shape[1] // H)].float()
                uppers.append(float(torch.maximum(qg * lo, qg * hi).sum(-1).max()))
            for li in torch.tensor(uppers).topk(keep).indices.tolist():
                for i in range(li * group, min(li * group + group, P)):
                    if i in real:
                        out[b, h, i] = bound[b, h, i]
    return out


@pytest.mark.parametrize("lengths", [(8,), (64,), (70, 70), (17, 17, 17), (70, 30)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_signed_boxes_read_in_place_equal_the_gathered_ones(lengths, dtype):
    store, seqs = random_store(lengths, seed=3, dtype=dtype)
    whole = store.read_all(seqs, 0)
    kmin, kmax = store.key_bounds(0)
    covers = whole.run is not None and whole.run[2] == whole.pages.shape[-1]
    assert covers == (len(set(lengths)) == 1)  # ragged rows: no common run, the gather path
    got = scoring.signed_boxes(kmin, kmax, whole.pages, whole.run)
    assert torch.equal(got, scoring.signed_boxes(kmin, kmax, whole.pages))
    want_hi = kmax.float()[whole.pages.clamp(min=0)]
    assert torch.equal(got[..., :16][whole.pages >= 0], want_hi[whole.pages >= 0])


@pytest.mark.parametrize("lengths", [[200], [203, 64], [64, 203, 9]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["max", "sum", "mean"])
def test_quest_scores_match_the_elementwise_definition(lengths, dtype, reduce):
    store, seqs = random_store(lengths, seed=sum(lengths), scale=1.0, dtype=dtype)
    q = torch.randn(len(lengths), 9, 16, generator=torch.Generator().manual_seed(1))
    pages = store.page_tables(seqs, 0)
    kmin, kmax = store.key_bounds(0)
    forced = plain_forced(store, seqs, pages, 4, 8)
    got = scoring.quest_scores(q, scoring.signed_boxes(kmin, kmax, pages), forced, reduce)
    bound = plain_bound(q, kmin, kmax, pages)
    want = torch.where(forced != 0, forced, {"max": bound.amax(2), "sum": bound.sum(2), "mean": bound.mean(2)}[reduce])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    # the choice equals the definition's up to ties
    tol = 1e-4
    for k in (1, 4, 9):
        got_k, want_k = scoring.top_pages(got, pages, k), scoring.top_pages(want, pages, k)
        mismatch = got_k != want_k
        if mismatch.any():  # only where the k-th best scores tie
            kth = want.topk(min(k, want.shape[-1]), -1).values[..., -1:]
            near = ((want - kth).abs() < tol).sum(-1) > 1
            assert near[mismatch.any(-1)].all()


def test_bound_is_an_upper_bound_of_every_key():
    store, (seq,) = random_store([77], scale=1.0)
    q = torch.randn(1, 9, 16)
    pages = store.page_tables([seq], 0)
    kmin, kmax = store.key_bounds(0)
    bound = scoring.box_bound(scoring.signed_query(q, 3), scoring.signed_boxes(kmin, kmax, pages)[0])  # [3, G, P]
    for h in range(3):
        for i, page in enumerate(store.page_table(seq, 0, h)):
            valid = store.slot_positions(0)[page] >= 0
            qk = q[0, 3 * h:3 * h + 3] @ store.storage(0).k[page][valid].T  # [G, n]
            assert (qk.amax(-1) <= bound[h, :, i] + 1e-5).all()


def test_an_empty_box_bounds_to_minus_inf_and_padding_gets_one():
    kmin, kmax = torch.randn(4, 8), torch.randn(4, 8)
    pages = torch.tensor([[[2, -1, 0]]])
    boxes = scoring.signed_boxes(kmin, kmax, pages)
    assert torch.isinf(boxes[0, 0, 1]).all() and (boxes[0, 0, 1] < 0).all()
    q = torch.randn(1, 2, 8)
    q[0, 0, :4] = 0.0  # zero channels: 0 * -inf must not leak a NaN
    bound = scoring.box_bound(scoring.signed_query(q, 1), boxes[0])
    assert not bound.isnan().any() and (bound[..., 1] == -math.inf).all()


@pytest.mark.parametrize("lengths", [[200], [203, 64], [64, 203, 9], [203, 100]])
@pytest.mark.parametrize("budget_pages,group,coarse", [(4, 1, 2), (4, 3, 2), (8, 4, 1), (6, 4, 3)])
def test_lserve_scores_match_the_row_by_row_definition(lengths, budget_pages, group, coarse):
    store, seqs = random_store(lengths, seed=sum(lengths) + group, scale=1.0)
    q = torch.randn(len(lengths), 9, 16, generator=torch.Generator().manual_seed(group))
    pages = store.page_tables(seqs, 0)
    kmin, kmax = store.key_bounds(0)
    got = scoring.lserve_scores(q, scoring.signed_boxes(kmin, kmax, pages), budget_pages, group, coarse)
    want = plain_lserve(q, kmin, kmax, pages, budget_pages, group, coarse)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_lserve_budget_per_row_equals_each_row_alone():
    store, seqs = random_store([200, 150, 90], seed=4, scale=1.0)
    q = torch.randn(3, 9, 16, generator=torch.Generator().manual_seed(4))
    pages = store.page_tables(seqs, 0)
    kmin, kmax = store.key_bounds(0)
    boxes = scoring.signed_boxes(kmin, kmax, pages)
    budgets = torch.tensor([3, 8, 5])
    got = scoring.lserve_scores(q, boxes, budgets, 4, 2, fill=-1e30)
    for b in range(3):
        alone = scoring.lserve_scores(q[b:b + 1], boxes[b:b + 1], int(budgets[b]), 4, 2, fill=-1e30)
        torch.testing.assert_close(got[b:b + 1], alone)


@pytest.mark.parametrize("lengths", [[200], [203, 64], [64, 203, 9]])
def test_forced_from_lengths_equals_forced_from_positions_when_nothing_is_evicted(lengths):
    store, seqs = random_store(lengths, seed=2)
    pages = store.page_tables(seqs, 0)
    lens = torch.tensor(lengths)
    want = plain_forced(store, seqs, pages, 4, 8)
    assert torch.equal(scoring.forced_from_positions(store.slot_positions(0), pages, lens, 4, 8), want)
    assert torch.equal(scoring.forced_from_lengths(lens, pages.shape[-1], 8, 4, 8)[:, None].expand_as(pages), want)
    store.evict(seqs[0], 0, 1, range(8))  # entry j no longer holds 8j..: only positions say so
    pages = store.page_tables(seqs, 0)
    assert torch.equal(scoring.forced_from_positions(store.slot_positions(0), pages, lens, 4, 8),
                       plain_forced(store, seqs, pages, 4, 8))


def test_max_reduce_keeps_a_page_only_one_query_head_wants():
    bound = torch.zeros(1, 1, 3, 5)
    bound[0, 0, 0, 3] = 10.0  # head 0 wants page 3
    bound[0, 0, 1:, 1] = 4.0  # heads 1 and 2 mildly like page 1
    assert scoring.reduce_group(bound, "max", 1.0).argmax().item() == 3
    assert scoring.reduce_group(bound, "sum", 1.0).argmax().item() == 3
    assert torch.equal(scoring.reduce_group(bound, "sum", 1.0).argsort(),
                       scoring.reduce_group(bound, "mean", 1.0).argsort())
    with pytest.raises(ValueError, match="reduce must be one of"):
        scoring.reduce_group(bound, "median", 1.0)


def test_top_pages_per_row_is_top_pages_row_by_row():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 2, 10, generator=g)
    pages = torch.randint(0, 50, (3, 2, 10), generator=g)
    k = torch.tensor([2, 5, 3])
    got = scoring.top_pages_per_row(scores, pages, k)
    for b in range(3):
        want = scoring.top_pages(scores[b:b + 1], pages[b:b + 1], int(k[b]))[0]
        assert torch.equal(got[b, :, :want.shape[-1]], want) and (got[b, :, want.shape[-1]:] == -1).all()


def test_reuse_scores_mark_the_kept_entries():
    kept = torch.tensor([[[0, 3, -1]]])
    assert scoring.reuse_scores(kept, 5).tolist() == [[[0.0, -math.inf, -math.inf, 0.0, -math.inf]]]


def test_is_listed_matches_a_plain_comparison():
    g = torch.Generator().manual_seed(0)
    pages = torch.randint(0, 40, (2, 3, 25), generator=g)
    pages[1, :, 20:] = -1
    kept = torch.randint(-1, 40, (2, 3, 7), generator=g)
    want = (pages[..., :, None] == kept[..., None, :]).any(-1) & (pages >= 0)
    assert torch.equal(scoring.is_listed(pages, kept), want)
    assert not scoring.is_listed(pages, torch.full((2, 3, 1), -1)).any()


# Quest's bound written out: `q * min` and `q * max` side by side, or the relu/min split of q
# against max/min keys. Only kvkit/scoring.py may hold it; the kernels' jit bodies are the
# kernels themselves (tested against kvkit.scoring), not a second definition in torch.
BOUND_PATTERNS = [
    r"maximum\([^)]*\*\s*\w*(lo|min)\w*\s*,[^)]*\*\s*\w*(hi|max)",
    r"clamp\(min=0\)\s*@",
    r"clamp\(max=0\)\s*@",
    r"relu\(q\w*\)\s*@",
    r"cat\(\[\w+\.clamp\(min=0\),\s*\w+\.clamp\(max=0\)",
]


def test_no_second_copy_of_the_bound_outside_kvkit_scoring():
    found = []
    for folder in ("kvkit", "integrations", "triton_kernels", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == REPO / "kvkit" / "scoring.py" or path.name.startswith("_"):
                continue
            text = path.read_text()
            found += [f"{path.relative_to(REPO)}: {m.group(0)}" for pat in BOUND_PATTERNS
                      for m in re.finditer(pat, text)]
    assert not found, "Quest's bound is defined in kvkit/scoring.py; call it instead of:\n" + "\n".join(found)
