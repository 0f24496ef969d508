"""kvkit's vLLM attention impl: the KV write and the attention of every layer call.

`KVKitCPUAttentionImpl` writes K/V as stock and, for layers that select pages, keeps each
sub-page's signed key box `[max | -min]` from the incoming keys (vLLM's cache tensor is packed
per instruction set: never read statistics from it; `KeyWrites` says where a step's keys land,
worked out once per step). At decode it scores the listed pages with `kvkit.scoring` (Quest, or
LServe's two levels every `reuse_steps`-th step of a request and its kept choice in between:
`selection.py`) and reads only the chosen pages through the stock CPU kernel on the builder's
virtual batch (`virtual_decode`). Streaming layers run the stock kernel on the builder's trimmed
block tables; score-evicting layers on the compacted ones, then add their attention mass per
block to the worker's eviction state (eviction.py). Prefill rows take the stock kernel.

Sub-pages: the CPU kernel takes blocks of 32 tokens or more, and Quest's bound is loose on big
pages (bench/results/quest_page_size.md: 8-token pages keep every needle, 16 and 32 lose some).
So the boxes are kept per sub-page of `policy.page_size` tokens (8 for `quest`, and 8 for a
policy that names none, such as `lserve`: `layers.sub_page_size`) and a block is scored by its
best sub-page — still an upper bound of q·k over the block, and a tighter one. The block is what
is read.

Shapes: B decode requests, Hq/Hkv query/KV heads, G = Hq // Hkv, NB blocks, S block_size (a kvkit
page), D head_dim, R sub-pages per block, P pages of the longest request, K pages read, T tokens.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from vllm import _custom_ops as ops
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

from kvkit import metrics
from kvkit.policies import FullSelector
from kvkit.policies.evictors.sink_window import SinkWindowEvictor
from kvkit.policies.selectors.quest import LServeSelector
from kvkit.scoring import reduce_group, reuse_scores, top_pages_per_row
from kvkit.integrations.vllm import eviction, plugin
from kvkit.integrations.vllm.eviction import STATE, block_mass, gather_keys
from kvkit.integrations.vllm.layers import PageSelector, current_policy, layer_index, layer_selector, sub_page_size
from kvkit.integrations.vllm.metadata import KVKitCPUAttentionMetadata, VirtualPlan
from kvkit.integrations.vllm.selection import (FILL_SCORE, SelectionPlan, block_bound_scores, empty_bounds,
                                              lserve_block_scores, page_boxes, stack_padded)
from kvkit.integrations.vllm.streaming import model_kv_heads, streaming_evictor

logger = logging.getLogger(__name__)

CHECK_ENV = "KVKIT_VLLM_CHECK"  # "1": also run kvkit's reference on a shadow copy (tests only)

# Filled when KVKIT_VLLM_CHECK=1: one row per (layer, decode step) the sparse path ran.
CHECKS: list[dict] = []
# Per process: which layer indices ran which path (for tests and logs).
USAGE: dict[str, int] = {"dense_calls": 0, "sparse_calls": 0, "prefill_rows_calls": 0, "streaming_calls": 0,
                         "lserve_refreshed_rows": 0, "lserve_reused_rows": 0, "lserve_as_kept_rows": 0,
                         "evict_calls": 0}


def virtual_decode(query: torch.Tensor, kv_cache: torch.Tensor, pages: torch.Tensor,
                   plan: VirtualPlan, output: torch.Tensor, scale: float, softcap: float = 0.0,
                   sinks: torch.Tensor | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
                   kv_cache_dtype: str = "auto") -> None:
    """Decode attention over the listed pages of vLLM's CPU cache, written into `output`.

    query: `[B, Hq, D]` (one token per request); kv_cache: vLLM's `[NB, Hkv, S, 2D]`;
    pages: `[B, Hkv, K]` virtual page ids (`block * Hkv + head`) in position order, the
    request's last page last, -1 padded at the end; plan: `plan_virtual` for these requests;
    output: `[B, Hq, D]`.
    """
    num_blocks, H, S, _ = kv_cache.shape
    B, Hq, D = query.shape
    G = Hq // H
    block_table = pages.clamp(min=0).reshape(B * H, -1).to(torch.int32)  # [B*Hkv, K]
    cache = kv_cache.view(num_blocks * H, 1, 2 * S, D)  # one page per (block, KV head): no copy
    key_cache, value_cache = cache.chunk(2, dim=2)  # [NB*Hkv, 1, S, D] each
    contiguous = output.is_contiguous()
    out = output.view(B * H, G, D) if contiguous else torch.empty(B * H, G, D, dtype=output.dtype)
    ops.cpu_attention_with_kv_cache(
        query=query.reshape(B * H, G, D), key_cache=key_cache, value_cache=value_cache,
        output=out, query_start_loc=plan.query_start_loc, seq_lens=plan.seq_lens, scale=scale,
        causal=True, alibi_slopes=None, sliding_window=-1, block_table=block_table,
        softcap=softcap, scheduler_metadata=plan.scheduler_metadata, s_aux=sinks,
        k_scale=k_scale, v_scale=v_scale, kv_cache_dtype=kv_cache_dtype)
    if not contiguous:
        output.copy_(out.view(B, Hq, D))


@dataclass
class KeyWrites:
    """Where one step's incoming keys land, as (block, KV head) pages. Every layer of a KV cache
    group gets the same `slot_mapping` tensor, so the first layer's KV write works this out and
    the others reuse it (a dozen small ops per layer were ~0.1 ms of every decode step each)."""

    source: torch.Tensor  # the slot_mapping it was computed from (compared by identity)
    version: int  # source._version then: an in-place refill of the same tensor recomputes
    shape: tuple[int, int, int]  # (S, H, sub) it was computed for
    real: torch.Tensor | None  # [T'] bool: rows of `key` that are real tokens; None: the first `count`
    count: int  # T real tokens
    rows: torch.Tensor  # [T * H] pages (block * H + head)
    offs: torch.Tensor  # [T * H] offsets in the page
    subs: torch.Tensor  # [T * H] sub-page rows (page * R + offset // sub)
    fresh: torch.Tensor | None  # pages written at offset 0 now: they start over

    def tokens(self, t: torch.Tensor) -> torch.Tensor:
        """The real tokens' rows of a per-token tensor (`key`, `value`): `[T, ...]`."""
        return t[: self.real.shape[0]][self.real] if self.real is not None else t[: self.count]


_KEY_WRITES: dict[int, KeyWrites] = {}  # id(slot_mapping) -> its KeyWrites, a few steps' worth


def key_writes(slot_mapping: torch.Tensor, S: int, H: int, sub: int) -> KeyWrites | None:
    """`KeyWrites` of this slot mapping (cached while it is the same tensor, unchanged), or None
    when it writes nothing (all padding)."""
    w = _KEY_WRITES.get(id(slot_mapping))
    if (w is not None and w.source is slot_mapping and w.version == slot_mapping._version
            and w.shape == (S, H, sub)):
        return w
    slots = slot_mapping.long()
    real = slots >= 0  # padding slots are -1
    if bool(real.all()):
        real = None
    else:
        slots = slots[real]
        if slots.numel() == 0:
            return None
    blk, off = slots // S, slots % S  # [T]
    rows = (blk[:, None] * H + torch.arange(H)).reshape(-1)
    offs = off.repeat_interleave(H)
    starts = offs == 0
    w = KeyWrites(slot_mapping, slot_mapping._version, (S, H, sub), real, slots.shape[0], rows, offs,
                  rows * (S // sub) + offs // sub, rows[starts] if bool(starts.any()) else None)
    if len(_KEY_WRITES) >= 8:
        _KEY_WRITES.clear()
    _KEY_WRITES[id(slot_mapping)] = w
    return w




class KVKitCPUAttentionImpl(CPUAttentionBackendImpl):
    """Stock CPU attention for prefill; page selection through the virtual batch at decode."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._layer: int | None = None
        self._selector: FullSelector | PageSelector | None = None
        self._stream: SinkWindowEvictor | None = None
        config = get_current_vllm_config_or_none()  # vLLM builds the impl inside its layer's init
        self.model_heads = self.num_kv_heads if config is None else model_kv_heads(config)
        self.policy_name = "dense"
        # signed boxes [max | -min] (kvkit.scoring) in the keys' dtype, empty = -inf
        self.bounds: torch.Tensor | None = None  # [NB * Hkv, R, 2D] per sub-page: block_bound_scores
        self.sub = 0  # tokens per sub-page; R = S // sub sub-pages per block
        self.boxes: torch.Tensor | None = None  # LServe: [NB * Hkv, 2D] each page's whole box (page_boxes)
        # LServe: request id -> its choice: list entries and the pages they name, each [Hkv, K]
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._refreshed: list[bool] = []  # LServe: rows that chose afresh this step (check)
        self._check_kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # LServe: the check's own choices
        self.check = os.environ.get(CHECK_ENV, "") == "1"
        self.shadow: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ---- per-layer set-up, on first use (vLLM builds the impl before it names the layer) ------
    def _resolve(self, layer) -> FullSelector | PageSelector:
        if self._selector is None:
            policy = current_policy()
            self._layer = layer_index(layer.layer_name)
            self.policy_name = policy.name
            self._selector = layer_selector(policy, self._layer, self.model_heads)
            self._stream = streaming_evictor(policy, self._layer, self.model_heads)
            if self._stream is not None and isinstance(self._selector, PageSelector):
                raise NotImplementedError(
                    f"kvkit: layer {self._layer} of policy {policy.name!r} both selects pages "
                    "(quest, lserve) and streams (sink_window); the vLLM backend runs one of them per layer")
        return self._selector

    def _streaming(self, layer) -> SinkWindowEvictor | None:
        if self.attn_type != AttentionType.DECODER:
            return None
        self._resolve(layer)
        return self._stream

    def _sparse(self, layer) -> PageSelector | None:
        if self.attn_type != AttentionType.DECODER:
            return None
        sel = self._resolve(layer)
        return sel if isinstance(sel, PageSelector) else None

    # ---- KV write: stock, plus Quest's page summaries from the incoming keys ------------------
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        sparse = self._sparse(layer) is not None
        if not sparse and not (self.check and (self._streaming(layer) is not None
                                               or plugin.scores_blocks(current_policy()))):
            return
        num_blocks, H, S, _ = kv_cache.shape
        D = self.head_size
        if self.check and self.shadow is None:
            self.shadow = (torch.zeros(num_blocks * H, S, D), torch.zeros(num_blocks * H, S, D),
                           torch.zeros(num_blocks * H, S, dtype=torch.bool))
        if not self.sub:
            self.sub = sub_page_size(current_policy(), S)
        w = key_writes(slot_mapping, S, H, self.sub)
        if w is None:
            return
        flat = w.tokens(key).reshape(-1, D)  # [T * H, D]
        if sparse:
            self._update_bounds(flat, w, num_blocks * H, S)
        if self.shadow is not None:
            sk, sv, valid = self.shadow
            if w.fresh is not None:
                valid[w.fresh] = False
            sk[w.rows, w.offs] = flat.float()
            sv[w.rows, w.offs] = w.tokens(value).float().reshape(-1, D)
            valid[w.rows, w.offs] = True

    def _update_bounds(self, flat: torch.Tensor, w: KeyWrites, num_pages: int, S: int) -> None:
        """Fold the written keys `flat` `[T * H, D]` (where `w` says) into the sub-pages' signed
        boxes (`[k | -k]`, one amax); the sub-pages of pages begun now (written at offset 0)
        start over."""
        if self.bounds is None:
            # in the keys' dtype: the max/-min of bf16 keys are bf16 values, so nothing is lost
            self.bounds = empty_bounds(num_pages, S // self.sub, flat.shape[-1], flat.dtype)
            if isinstance(self._selector, LServeSelector):  # its logical pages read whole boxes
                self.boxes = empty_bounds(num_pages, 1, flat.shape[-1], flat.dtype)[:, 0]
        if w.fresh is not None:
            self.bounds[w.fresh] = -math.inf
            if self.boxes is not None:
                self.boxes[w.fresh] = -math.inf
        keys = flat.to(self.bounds.dtype)
        signed = torch.cat([keys, keys.neg()], -1)  # [T * H, 2D]
        self.bounds.view(-1, signed.shape[-1]).index_reduce_(0, w.subs, signed, "amax")  # [NB * H * R, 2D]
        if self.boxes is not None:
            self.boxes.index_reduce_(0, w.rows, signed, "amax")

    # ---- attention -------------------------------------------------------------------------
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if not isinstance(attn_metadata, KVKitCPUAttentionMetadata):  # warm-up, encoder paths
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        start = time.perf_counter()
        md = attn_metadata
        stream = self._streaming(layer)
        if stream is not None and (stream.sink, stream.window) in md.streams:
            USAGE["streaming_calls"] += 1
            smd = md.streams[(stream.sink, stream.window)]
            out = super().forward(layer, query, key, value, kv_cache, smd, output,
                                  output_scale, output_block_scale)
            if md.decode_pages:
                self._record(md.stream_decode_pages[(stream.sink, stream.window)], md.decode_pages,
                             kv_cache, start, 0.0)
            if self.shadow is not None:
                self._check_read(query, output, md, kv_cache.shape[2],
                                 _stream_positions(stream.sink, stream.window, kv_cache.shape[2]))
            return out
        if md.evict is not None:
            USAGE["evict_calls"] += 1
            out = super().forward(layer, query, key, value, kv_cache, md.evict.md, output,
                                  output_scale, output_block_scale)
            scoring = time.perf_counter()
            self._score_blocks(layer, query, kv_cache, md)
            if md.decode_pages:  # the scoring is this path's "selection" overhead
                self._record(md.evict.decode_pages, md.decode_pages, kv_cache, start,
                             time.perf_counter() - scoring)
            if self.shadow is not None:
                self._check_read(query, output, md, kv_cache.shape[2],
                                 _kept_positions(md.evict.kept, kv_cache.shape[2]))
            return out
        sel = self._sparse(layer)
        if sel is None or md.num_decodes == 0:
            USAGE["dense_calls"] += 1
            out = super().forward(layer, query, key, value, kv_cache, md, output,
                                  output_scale, output_block_scale)
            if md.decode_pages:
                self._record(md.decode_pages, md.decode_pages, kv_cache, start, 0.0)
            return out
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by kvkit")
        USAGE["sparse_calls"] += 1
        pages_read, sel_s = self._decode_sparse(sel, layer, query, kv_cache, md, output)
        self._record(pages_read, md.decode_pages, kv_cache, start, sel_s)
        if md.prefill_query_start_loc is not None:
            USAGE["prefill_rows_calls"] += 1
            self._prefill_rows(layer, query, kv_cache, md, output)
        return output

    def _score_blocks(self, layer, query: torch.Tensor, kv_cache: torch.Tensor, md: KVKitCPUAttentionMetadata) -> None:
        """Add this layer's attention mass per kept block to each row's step (eviction.py):
        decode rows together, each prefill row by its last `OBSERVED` queries."""
        num_blocks, H, S, _ = kv_cache.shape
        e, qsl = md.evict, md.query_start_loc.tolist()
        f = e.forgetting_factor
        dec = [b for b in range(len(e.kept)) if qsl[b + 1] - qsl[b] == 1]
        groups = [dec] if dec else []
        groups += [[b] for b in range(len(e.kept)) if qsl[b + 1] - qsl[b] > 1]
        for rows in groups:
            T = min(qsl[rows[0] + 1] - qsl[rows[0]], eviction.OBSERVED)
            M = max(len(e.kept[b]) for b in rows)
            q = torch.stack([query[qsl[b + 1] - T : qsl[b + 1]] for b in rows])  # [B, T, Hq, D]
            table = e.md.block_table[rows, :M].long()
            weights = f ** torch.arange(T - 1, -1, -1, dtype=torch.float32)
            lengths = e.md.seq_lens[rows].long()
            mass = block_mass(q, gather_keys(kv_cache, table, layer.isa), lengths, self.scale, weights, S)
            for i, b in enumerate(rows):
                n = len(e.kept[b])
                STATE.add_mass(e.req_ids[b], e.kept[b], mass[i, :n], int(e.kept[b][-1]) + 1)
            if self.shadow is not None:  # the same mass from the float32 copy of the written keys
                copy = self.shadow[0].view(num_blocks, H, S, -1).transpose(0, 1)[:, table]  # [H, B, M, S, D]
                ref = block_mass(q, copy.flatten(2, 3), lengths, self.scale, weights, S)
                CHECKS.append({"layer": self._layer, "rows": len(rows), "mass_check": True,
                               "mass_equal": bool(torch.allclose(mass, ref, rtol=1e-4, atol=1e-5))})

    def _record(self, pages_read: int, pages_total: int, kv_cache: torch.Tensor, start: float,
                selection_seconds: float) -> None:
        S = kv_cache.shape[2]
        page_bytes = 2 * S * self.head_size * kv_cache.element_size()
        metrics.record_decode(self.policy_name, pages_read, pages_total, pages_read * page_bytes,
                              time.perf_counter() - start, selection_seconds)

    def _select(self, sel: PageSelector, q: torch.Tensor, md: KVKitCPUAttentionMetadata,
                S: int, budget: int) -> torch.Tensor:
        """The choice per (decode request, KV head): `[B, Hkv, K]` virtual page ids in position
        order, -1 padded at the end. Per layer only the bounds, the group reduce and the top-k
        run; the rest is the builder's `SelectionPlan`."""
        plan = md.selection[sel]
        k = md.plans[budget].budget_pages
        if plan.all_fit:  # what top_pages would choose: every listed page, in order
            self._refreshed = [True] * plan.vpages.shape[0]
            return plan.vpages
        if isinstance(sel, LServeSelector):
            return self._select_lserve(sel, q, plan, k)
        bound = block_bound_scores(q, self.bounds, plan.vpages)
        bound = reduce_group(bound, sel.reduce, self.head_size ** -0.5)  # [B, H, P]
        scores = torch.where(plan.forced != 0, plan.forced, bound)
        return top_pages_per_row(scores, plan.vpages, k)

    def _select_lserve(self, sel: LServeSelector, q: torch.Tensor, plan: SelectionPlan,
                       k: torch.Tensor) -> torch.Tensor:
        """LServe: rows the builder marked (or whose choice this layer does not hold) choose by
        the two-level scores and keep their choice (list entries: a request's own blocks,
        whatever happens to the block ids of others, and the pages they name); the other rows
        read their kept pages, plus the sink and window pages that started since (scored by
        `reuse_scores`; rows with none new read the kept pages as they are, scoring nothing)."""
        B, H, P = plan.vpages.shape
        ids, kept = plan.req_ids, self.kept
        if ids is None:
            refresh, as_kept = [True] * B, [False] * B
        else:
            refresh = [r or rid not in kept for r, rid in zip(plan.refresh, ids)]
            as_kept = [a and not r for a, r in zip(plan.as_kept, refresh)]
        self._refreshed = refresh
        scored = [b for b in range(B) if not as_kept[b]]
        n_fresh = sum(refresh)
        USAGE["lserve_refreshed_rows"] += n_fresh
        USAGE["lserve_reused_rows"] += B - n_fresh
        USAGE["lserve_as_kept_rows"] += B - len(scored)
        K = min(int(k.max()), P)
        rows: list[torch.Tensor | None] = [kept[ids[b]][1] if a else None for b, a in enumerate(as_kept)]
        if scored:
            idx = torch.tensor(scored)
            sub = replace(plan, vpages=plan.vpages[idx], forced=plan.forced[idx],
                          req_ids=None if ids is None else [ids[b] for b in scored])
            scores = self._lserve_scores(sel, q[idx], self.bounds, self.boxes, sub, k[idx],
                                         [refresh[b] for b in scored], kept)
            scores = torch.where(sub.forced != 0, sub.forced, scores)
            entries = top_pages_per_row(scores, torch.arange(P).expand(len(scored), H, P), k[idx])
            picked = torch.where(entries >= 0, sub.vpages.gather(-1, entries.clamp(min=0)), -1)
            for i, b in enumerate(scored):
                rows[b] = picked[i]
                if ids is not None and refresh[b]:
                    kept[ids[b]] = (entries[i], picked[i])
        if ids is not None and len(kept) > len(plan.live) + B:  # requests the builder forgot
            self.kept = {r: e for r, e in kept.items() if r in plan.live}
        return picked if len(scored) == B else stack_padded(rows, K)

    def _lserve_scores(self, sel: LServeSelector, q: torch.Tensor, bounds: torch.Tensor, boxes: torch.Tensor,
                       plan: SelectionPlan, k: torch.Tensor, refresh: list[bool],
                       kept: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """`[B, H, P]`: two-level scores on the `refresh` rows, those of their `kept` entries (request
        id -> (entries `[H, K]`, pages)) on the others."""
        if all(refresh):
            return lserve_block_scores(q, bounds, boxes, plan.vpages, k, sel)
        B, H, P = plan.vpages.shape
        rows = [kept[plan.req_ids[b]][0] for b, r in enumerate(refresh) if not r]
        reused = reuse_scores(stack_padded(rows, max(e.shape[-1] for e in rows)), P, FILL_SCORE)
        if not any(refresh):
            return reused
        fresh = torch.tensor(refresh)
        scores = torch.empty(B, H, P)
        scores[~fresh] = reused
        scores[fresh] = lserve_block_scores(q[fresh], bounds, boxes, plan.vpages[fresh], k[fresh], sel)
        return scores

    def _decode_sparse(self, sel: PageSelector, layer, query: torch.Tensor, kv_cache: torch.Tensor,
                       md: KVKitCPUAttentionMetadata, output: torch.Tensor) -> tuple[int, float]:
        num_blocks, H, S, _ = kv_cache.shape
        if S != md.block_size:
            raise NotImplementedError(f"kvkit: kernel block size {S} differs from the KV cache "
                                      f"block size {md.block_size}; not supported")
        B = md.num_decodes
        budget = max(1, sel.budget // S)
        plan = md.plans[budget]
        q = query[:B]  # [B, Hq, D]
        t0 = time.perf_counter()
        chosen = self._select(sel, q, md, S, budget)  # [B, H, K]
        selection_seconds = time.perf_counter() - t0
        out = output[:B]  # [B, Hq, D]
        virtual_decode(q, kv_cache, chosen, plan, out, self.scale, self.logits_soft_cap,
                       self.sinks, layer._k_scale_float, layer._v_scale_float,
                       self.kv_cache_dtype)
        if self.shadow is not None:
            self._check(sel, q, chosen, out, md, S)
        return int((chosen >= 0).sum()), selection_seconds

    def _check(self, sel: PageSelector, q: torch.Tensor, chosen: torch.Tensor,
               out: torch.Tensor, md: KVKitCPUAttentionMetadata, S: int) -> None:
        """KVKIT_VLLM_CHECK=1 (tests): redo this step with kvkit's own pieces on an unpacked
        float32 copy of the K/V and record how far vLLM's result is from it.

        - bounds: the running key max/min equal the max/min of the copy's sub-pages (and LServe's
          running page boxes those of the copy's pages);
        - selection: `block_bound_scores`, kvkit's `reduce_group`, `forced_from_positions` and
          `top_pages` (what `QuestSelector` runs, with sub-page bounds) choose the same pages
          from the copy, slot positions and lengths; for LServe, `lserve_scores` on the rows
          that chose afresh and the kept entries on the others;
        - attention: `sparse_decode_ref` over the chosen pages, bf16 tolerance (2e-2, 2e-2).
        """
        from kvkit.attention.ref import sparse_decode_ref
        from kvkit.scoring import forced_from_positions

        sk, sv, valid = self.shadow
        B, H = q.shape[0], self.num_kv_heads
        seq_lens = md.seq_lens[:B].long()
        P = int(((seq_lens + S - 1) // S).max())
        slot_pos = torch.full(valid.shape, -1, dtype=torch.int32)  # [NB*H, S]
        vpages = torch.full((B, H, P), -1, dtype=torch.int64)
        for b in range(B):
            n = int(seq_lens[b])
            for i in range((n + S - 1) // S):
                rows = int(md.block_table[b, i]) * H + torch.arange(H)
                vpages[b, :, i] = rows
                used = min(S, n - i * S)
                slot_pos[rows, :used] = torch.arange(i * S, i * S + used, dtype=torch.int32)
        inf = torch.tensor(math.inf)
        R, D = S // self.sub, sk.shape[-1]
        sub_valid = valid.view(-1, R, self.sub, 1)
        kmax = torch.where(sub_valid, sk.view(-1, R, self.sub, D), -inf).amax(2)  # [NB*H, R, D]
        kmin = torch.where(sub_valid, sk.view(-1, R, self.sub, D), inf).amin(2)
        # the copy holds bf16 keys exactly, so its max/-min are the running boxes' values
        ref_bounds = torch.cat([kmax, kmin.neg()], -1).to(self.bounds.dtype)  # [NB*H, R, 2D]
        listed = vpages[vpages >= 0]
        ref_boxes = page_boxes(ref_bounds)
        bounds_ok = bool(torch.equal(ref_bounds[listed], self.bounds[listed])) and (
            self.boxes is None or bool(torch.equal(ref_boxes[listed], self.boxes[listed])))
        k = md.plans[max(1, sel.budget // S)].budget_pages
        plan = replace(md.selection[sel], vpages=vpages)
        if isinstance(sel, LServeSelector):  # the check keeps its own choices per request
            bound = self._lserve_scores(sel, q, ref_bounds, ref_boxes, plan, k, self._refreshed, self._check_kept)
        else:
            bound = reduce_group(block_bound_scores(q, ref_bounds, vpages), sel.reduce, self.head_size ** -0.5)
        forced = forced_from_positions(slot_pos, vpages, seq_lens, sel.sink, sel.window)
        scores = torch.where(forced != 0, forced, bound)
        entries = top_pages_per_row(scores, torch.arange(P).expand(B, H, P), k)
        ref_chosen = torch.where(entries >= 0, vpages.gather(-1, entries.clamp(min=0)), -1)
        if isinstance(sel, LServeSelector) and plan.req_ids is not None:
            for b in [b for b, r in enumerate(self._refreshed) if r]:
                self._check_kept[plan.req_ids[b]] = (entries[b], ref_chosen[b])
        ref, _ = sparse_decode_ref(q.float(), sk, sv, chosen, valid, scale=self.scale)
        excess = (out.float() - ref).abs() - (2e-2 + 2e-2 * ref.abs())
        CHECKS.append({"layer": self._layer, "rows": B, "pages": int((chosen >= 0).sum()),
                       "bounds_equal": bounds_ok,
                       "selection_equal": bool(torch.equal(ref_chosen, chosen)),
                       "max_abs_err": float((out.float() - ref).abs().max()),
                       "within_tol": bool((excess <= 0).all())})

    def _check_read(self, query: torch.Tensor, output: torch.Tensor, md: KVKitCPUAttentionMetadata,
                    S: int, kept_positions: Callable[[int, int, int], torch.Tensor]) -> None:
        """KVKIT_VLLM_CHECK=1 (tests): every query of this step against a float32 causal
        attention over the unpacked copy of its sequence, restricted to the positions the layer
        reads: `kept_positions(row, first query position, length)`. Kept positions must hold
        written K/V in blocks no other row reads (never a freed block). bf16 tolerance (2e-2, 2e-2)."""
        from kvkit.attention.ref import causal_prefill_ref

        sk, sv, valid = self.shadow
        H, D = self.num_kv_heads, self.head_size
        n = min(md.seq_lens.shape[0], md.query_start_loc.shape[0] - 1)  # requests (rows)
        qsl = md.query_start_loc.long()
        worst, ok, all_written, kept_blocks = 0.0, True, True, []
        for b in range(n):
            lo, hi, length = int(qsl[b]), int(qsl[b + 1]), int(md.seq_lens[b])
            if hi == lo:
                continue
            first = length - (hi - lo)
            pos = kept_positions(b, first, length)
            blocks = md.block_table[b, pos // S].long()  # [L]
            kept_blocks.append(blocks.unique())
            rows = blocks[:, None] * H + torch.arange(H)  # [L, H]
            offs = (pos % S)[:, None].expand_as(rows)
            all_written &= bool(valid[rows, offs].all())
            k, v = sk[rows, offs].transpose(0, 1), sv[rows, offs].transpose(0, 1)  # [H, L, D]
            q = query[lo:hi].float().transpose(0, 1)  # [Hq, T, D]
            ref = causal_prefill_ref(q, k, v, torch.arange(first, length), pos, self.scale)
            got = output[lo:hi].float().view(hi - lo, -1, D).transpose(0, 1)
            worst = max(worst, float((got - ref).abs().max()))
            ok &= bool(((got - ref).abs() <= 2e-2 + 2e-2 * ref.abs()).all())
        kept = torch.cat(kept_blocks) if kept_blocks else torch.zeros(0, dtype=torch.long)
        CHECKS.append({"layer": self._layer, "rows": n, "read_check": True, "kept_written": all_written,
                       # a block freed (null block 0) or handed to another request would repeat
                       "kept_blocks_distinct": bool(kept.unique().numel() == kept.numel()
                                                    and not (kept == 0).any()),
                       "max_abs_err": worst, "within_tol": ok})

    def _prefill_rows(self, layer, query, kv_cache, md: KVKitCPUAttentionMetadata,
                      output: torch.Tensor) -> None:
        num_blocks, H, S, _ = kv_cache.shape
        kv = kv_cache.view(num_blocks, H, 2 * S, -1)
        key_cache, value_cache = kv.chunk(2, dim=2)
        lo, hi = md.num_decode_tokens, md.num_actual_tokens
        ops.cpu_attention_with_kv_cache(
            query=query[lo:hi], key_cache=key_cache, value_cache=value_cache,
            output=output[lo:hi], query_start_loc=md.prefill_query_start_loc,
            seq_lens=md.prefill_seq_lens, scale=self.scale, causal=md.causal,
            alibi_slopes=self.alibi_slopes, sliding_window=self.sliding_window,
            block_table=md.prefill_block_table, softcap=self.logits_soft_cap,
            scheduler_metadata=md.prefill_scheduler_metadata, s_aux=self.sinks,
            k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype)


def _stream_positions(sink: int, window: int, S: int) -> Callable[[int, int, int], torch.Tensor]:
    """A streaming layer's read (for `_check_read`): the sink blocks and the blocks from the one
    holding the window start of the row's first query on."""
    sink_blocks = -(-sink // S)

    def positions(row: int, first: int, length: int) -> torch.Tensor:
        window_block = max(sink_blocks, max(0, first - window + 1) // S)
        pos = torch.arange(length)
        return pos[(pos // S < sink_blocks) | (pos // S >= window_block)]
    return positions


def _kept_positions(kept: list[torch.Tensor], S: int) -> Callable[[int, int, int], torch.Tensor]:
    """A score-evicting layer's read (for `_check_read`): the row's blocks not evicted."""
    def positions(row: int, first: int, length: int) -> torch.Tensor:
        pos = torch.arange(length)
        return pos[torch.isin(pos // S, kept[row])]
    return positions
