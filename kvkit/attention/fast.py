"""A fast CPU decode path over a dense page pool: one gather, one attention, no per-slot copies.

`kvkit.attention.ref` is the definition: pages read through the layer's storage (any codec),
then float32 attention; at one query per head its per-op overhead and the float32 upcast of
every gathered key cost more than the attention itself. This path takes the pool tensors of a
plain (dense) storage directly, gathers the selected pages with one `index_select` per K and V,
and attends in the pool's dtype (`attend`: SDPA for bf16, matmul-softmax for float32, the
faster of the two in bench/results/speed*.md). `kvkit.attention.decode` runs it for plain
pages on the CPU. It is tested against `kvkit.attention.ref.sparse_decode_ref`.

Shapes: B sequences, Hq/Hkv query/KV heads, G = Hq // Hkv, P pages per list, S page_size,
D head_dim, N pages in the pool, T tokens per list.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from kvkit.scoring import forced_pages, quest_scores, signed_boxes
from kvkit.store import shared_run


def sparse_decode_fast(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       page_table: torch.Tensor, slot_valid: torch.Tensor | None = None,
                       scale: float | None = None, slot_mask: torch.Tensor | None = None,
                       lengths: np.ndarray | None = None, run: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Decode attention over the listed pages of a dense pool, computed in the pool's dtype.

    q: `[B, Hq, D]`; k_cache, v_cache: `[N, S, D]`; page_table: `[B, Hkv, P]` int64, -1 padded;
    slot_valid: `[N, S]` bool, None when every listed slot holds a token; slot_mask: optional
    `[B, Hkv, P, S]` bool; lengths: optional `[B, Hkv]` host ints, each row reads the first
    `lengths` slots of its listed pages (`Selection.lengths`; then slot_valid and slot_mask are
    not used); run: `Selection.run` of the list when known (else found here from the table).
    Returns `[B, Hq, D]` in q's dtype (zeros for an empty selection). Same semantics
    as `sparse_decode_ref`, bf16 rounding aside.
    """
    B, Hq, D = q.shape
    Hkv, P = page_table.shape[1], page_table.shape[2]
    S = k_cache.shape[1]
    scale = scale if scale is not None else D ** -0.5
    if lengths is not None and lengths.size and not q.is_cuda:
        run = run or shared_run(page_table.numpy(), lengths, S)
        # the whole read in place; or in place plus a gathered tail, when the run is long enough
        # to pay for the merge (MIN_RUN_TOKENS)
        if run is not None and (run[2] * S >= int(lengths.max()) or run[2] * S >= MIN_RUN_TOKENS):
            return _decode_run_and_tail(q, k_cache, v_cache, page_table, lengths, run, scale)
    flat = page_table.reshape(-1)
    if lengths is not None:  # rows needing fewer than P pages end in -1 padding
        padded = bool(((lengths + S - 1) // S < P).any()) if lengths.size else False
    else:
        padded = bool((flat < 0).any())
    idx = flat.clamp(min=0) if padded else flat
    k = k_cache.index_select(0, idx).view(B, Hkv, P * S, D)  # one copy of the selected pages
    v = v_cache.index_select(0, idx).view(B, Hkv, P * S, D)
    if lengths is not None:
        n = int(lengths.max()) if lengths.size else 0
        if lengths.size and int(lengths.min()) == n:  # the usual step: every row reads its first n slots
            return attend(q, k[:, :, :n], v[:, :, :n], None, scale)
        valid = torch.arange(P * S, device=q.device) < torch.from_numpy(lengths).to(q.device)[..., None]
        return attend(q, k, v, valid, scale)
    valid = None
    if slot_valid is not None or slot_mask is not None or padded:  # else every listed slot is read
        valid = (flat >= 0).view(B, Hkv, P, 1)
        if slot_valid is not None:
            valid = valid & slot_valid.index_select(0, idx).view(B, Hkv, P, S)
        if slot_mask is not None:
            valid = valid & slot_mask
        valid = valid.expand(B, Hkv, P, S).reshape(B, Hkv, P * S)
    return attend(q, k, v, valid, scale)


# Below this many tokens in place, copying every page costs less than attending in two parts
# and merging (the crossover of this CPU path; re-measure with bench/hf_decode.py).
MIN_RUN_TOKENS = 4096


def _decode_run_and_tail(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                         lengths: np.ndarray, run: tuple[int, int, int], scale: float) -> torch.Tensor:
    """Attention over each row's leading run of pages read in place (a strided view of the
    pool, no copy) and, if a row reads past it, over the rest of its list (gathered), merged by
    their log-sum-exps. What `sparse_decode_fast` computes, without copying the run."""
    B, Hq, D = q.shape
    Hkv = page_table.shape[1]
    S = k_cache.shape[1]
    m = run[2]
    lo, hi = int(lengths.min()), int(lengths.max())
    k_run, v_run = run_views(k_cache, v_cache, run, B, Hkv, min(hi, m * S))  # [B, Hkv, <= m*S, D]
    if hi <= m * S:  # the whole read in place: one attention (the usual step: every row reads hi tokens)
        valid = None if lo == hi else torch.arange(hi, device=q.device) < torch.from_numpy(lengths).to(q.device)[..., None]
        return attend(q, k_run, v_run, valid, scale)
    run_len = np.minimum(lengths, m * S)  # [B, Hkv] tokens each row reads in the run
    n = int(run_len.max())
    valid = None if int(run_len.min()) == n else (
        torch.arange(n, device=q.device) < torch.from_numpy(run_len).to(q.device)[..., None])
    tail_len = lengths - run_len  # [B, Hkv] tokens after the run
    qg = q.view(B, Hkv, Hq // Hkv, D).to(k_cache.dtype)  # the G query heads of a KV head as G queries
    if valid is None:
        out, lse = _attend_lse(qg, k_run[:, :, :n], v_run[:, :, :n], None, scale)  # [B, Hkv, G, D], [B, Hkv, G]
    else:
        out, lse = _attend_lse(qg.float(), k_run[:, :, :n].float(), v_run[:, :, :n].float(), valid, scale)
    n = int(tail_len.max())
    t = -(-n // S)  # pages after the run
    idx = page_table[:, :, m:m + t].reshape(-1).clamp(min=0)
    k_t = k_cache.index_select(0, idx).view(B, Hkv, t * S, D)
    v_t = v_cache.index_select(0, idx).view(B, Hkv, t * S, D)
    if int(tail_len.min()) == n:  # the usual step: every row's tail is n tokens
        out_t, lse_t = _attend_lse(qg, k_t[:, :, :n], v_t[:, :, :n], None, scale)
    else:
        valid = torch.arange(t * S, device=q.device) < torch.from_numpy(tail_len).to(q.device)[..., None]
        out_t, lse_t = _attend_lse(qg.float(), k_t.float(), v_t.float(), valid, scale)
    total = torch.logaddexp(lse, lse_t)
    out = out.float() * (lse - total).exp().nan_to_num(0.0)[..., None] + \
        out_t.float() * (lse_t - total).exp().nan_to_num(0.0)[..., None]
    return out.reshape(B, Hq, D).to(q.dtype)


def run_views(k_cache: torch.Tensor, v_cache: torch.Tensor, run: tuple[int, int, int], B: int, Hkv: int,
              n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n tokens of each row's leading run (`Selection.run`, n <= its pages' slots) as
    strided views `[B, Hkv, n, D]` of the pools `[N, S, D]`: no copy."""
    first, stride, _ = run
    S, D = k_cache.shape[1], k_cache.shape[2]
    size, step = (B, Hkv, n, D), (Hkv * stride * S * D, stride * S * D, D, 1)
    return (k_cache.as_strided(size, step, k_cache.storage_offset() + first * S * D),
            v_cache.as_strided(size, step, v_cache.storage_offset() + first * S * D))


def _attend_lse(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of G queries per KV head, qg `[B, Hkv, G, D]`, over k, v `[B, Hkv, T, D]` (views
    welcome), valid `[B, Hkv, T]` or None: out `[B, Hkv, G, D]` and its log-sum-exp float32
    `[B, Hkv, G]` (-inf where nothing is valid). bf16/fp16 with every token valid: the CPU flash
    kernel SDPA runs (it returns the log-sum-exp); else matmul-softmax, the faster of the two
    in float32 (as `attend`)."""
    if k.dtype != torch.float32 and valid is None:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qg, k, v, scale=scale)[:2]
        return out, lse
    scores = (qg * scale) @ k.transpose(-1, -2)  # [B, Hkv, G, T]
    if valid is not None:
        scores = scores.masked_fill(~valid[:, :, None, :], -math.inf)
    lse = torch.logsumexp(scores, -1)
    return (scores - lse[..., None]).exp().nan_to_num(0.0) @ v, lse


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """One query per head over gathered K/V `[B, Hkv, T, D]`, in their dtype; valid: `[B, Hkv, T]`
    bool, None when every token is read. Returns `[B, Hq, D]` in q's dtype, zeros for a row with
    nothing valid (as `sparse_decode_ref`). bf16/fp16: one fused SDPA; float32: matmul-softmax,
    which this CPU runs faster than float32 SDPA (bench/speed.py's dense_* rows)."""
    B, Hq, D = q.shape
    n = _valid_prefix(valid) if valid is not None else None
    if n is not None:  # every row reads its first n tokens: a slice costs less than a mask
        k, v, valid = k[:, :, :n], v[:, :, :n], None
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if k.dtype == torch.float32:
        scores = (q.view(B, Hkv, G, D).float() * scale) @ k.transpose(-1, -2)  # [B, Hkv, G, T]
        if valid is not None:
            scores = scores.masked_fill(~valid[:, :, None, :], -math.inf)
        out = torch.softmax(scores, dim=-1) @ v
    else:
        mask = None if valid is None else valid[:, :, None, None, :].expand(B, Hkv, G, 1, T).reshape(B, Hq, 1, T)
        qk = q.view(B, Hq, 1, D) if q.dtype == k.dtype else q.view(B, Hq, 1, D).to(k.dtype)
        out = F.scaled_dot_product_attention(qk, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    if valid is not None:
        out = out.nan_to_num_(0.0)  # nothing valid: softmax of -inf only
    out = out.view(B, Hq, D)
    return out if out.dtype == q.dtype else out.to(q.dtype)


def _valid_prefix(valid: torch.Tensor) -> int | None:
    """n > 0 when every row of `valid` `[B, Hkv, T]` is n Trues then Falses, else None. The
    usual decode step: the pages in list order, the newest one partly filled and listed last."""
    counts = valid.sum(-1)
    n = int(counts.amax())
    if n == 0 or int(counts.amin()) != n or not bool(valid[..., :n].all()):
        return None
    return n


def dense_decode_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float | None = None) -> torch.Tensor:
    """Plain matmul-softmax decode over contiguous K/V: the dense baseline to beat.

    q: `[B, Hq, D]`; k, v: `[B, Hkv, T, D]`. Computes in k's dtype, softmax in float32.
    """
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    scale = scale if scale is not None else D ** -0.5
    qg = (q.view(B, Hkv, Hq // Hkv, D) * scale).to(k.dtype)
    probs = torch.softmax(torch.matmul(qg, k.transpose(-1, -2)), dim=-1, dtype=torch.float32)
    return torch.matmul(probs.to(v.dtype), v).view(B, Hq, D).to(q.dtype)


def quest_decode_fast(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      key_min: torch.Tensor, key_max: torch.Tensor, page_table: torch.Tensor,
                      seq_lens: list[int], budget_pages: int, sink: int = 4, window: int = 32,
                      scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest selection (reduce="max") and decode over it in one lean pass, for pages that were
    never evicted (a head's list is in position order: entry j holds positions j*S .. j*S+S-1).

    q: `[B, Hq, D]`; k_cache, v_cache: `[N, S, D]`; key_min, key_max: `[N, D]`;
    page_table: `[B, Hkv, P]` (row b valid for its first ceil(seq_lens[b] / S) entries);
    seq_lens: tokens per sequence, on the host (as serving engines keep them).
    Returns out `[B, Hq, D]` and the chosen list entries `[B, Hkv, K]`. Chooses the same pages
    as `QuestSelector(reduce="max")` on such a store (tested), with ~half the torch ops of
    `quest_scores` + `top_pages` + `sparse_decode_fast`, since sinks, window and validity
    follow from seq_lens instead of per-slot positions.
    """
    B, Hq, D = q.shape
    Hkv, P = page_table.shape[1], page_table.shape[2]
    S = k_cache.shape[1]
    scale = scale if scale is not None else D ** -0.5
    used = [-(-n // S) for n in seq_lens]
    forced = forced_pages(tuple(seq_lens), P, S, sink, window, str(q.device))
    score = quest_scores(q, signed_boxes(key_min, key_max, page_table), forced)
    k = min(budget_pages, P)
    top = score.topk(k, dim=-1, sorted=False).indices  # [B, Hkv, K] list entries
    pages = page_table.gather(-1, top).view(-1).clamp(min=0)  # a short row's padding: masked below
    kk = k_cache.index_select(0, pages).view(B, Hkv, k * S, D)
    vv = v_cache.index_select(0, pages).view(B, Hkv, k * S, D)
    valid = None
    if any(n % S or u < k for n, u in zip(seq_lens, used)):  # a partial newest page, or padding picked
        pos = (top * S)[..., None] + torch.arange(S, device=q.device)  # [B, Hkv, K, S] positions
        lens = torch.tensor(seq_lens, device=q.device).view(B, 1, 1, 1)
        valid = (pos < lens).view(B, Hkv, k * S)
    return attend(q, kk, vv, valid, scale), top
