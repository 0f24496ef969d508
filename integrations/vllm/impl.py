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
pages (what that costs on the embedded model: bench/results/quest_page_size.md).
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
import time
from dataclasses import dataclass, replace

import torch

from vllm import _custom_ops as ops
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

from kvkit.policies import FullSelector
from kvkit.policies.evictors.sink_window import SinkWindowEvictor
from kvkit.policies.selectors.quest import LServeSelector
from kvkit.scoring import reduce_group, reuse_scores, top_pages_per_row
from kvkit.integrations.vllm import eviction
from kvkit.integrations.vllm.eviction import STATE, block_mass, gather_keys
from kvkit.integrations.vllm.layers import PageSelector, current_policy, layer_index, layer_selector, sub_page_size
from kvkit.integrations.vllm.metadata import KVKitCPUAttentionMetadata, VirtualPlan
from kvkit.integrations.vllm.selection import (FILL_SCORE, SelectionPlan, block_bound_scores, empty_bounds,
                                              lserve_block_scores, stack_padded)
from kvkit.integrations.vllm.streaming import model_kv_heads, streaming_evictor

logger = logging.getLogger(__name__)

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
        self._plain: bool | None = None  # neither selects pages nor streams (`_is_plain`)
        config = get_current_vllm_config_or_none()  # vLLM builds the impl inside its layer's init
        self.model_heads = self.num_kv_heads if config is None else model_kv_heads(config)
        self.policy_name = "dense"
        # signed boxes [max | -min] (kvkit.scoring) in the keys' dtype, empty = -inf
        self.bounds: torch.Tensor | None = None  # [NB * Hkv, R, 2D] per sub-page: block_bound_scores
        self.sub = 0  # tokens per sub-page; R = S // sub sub-pages per block
        self.boxes: torch.Tensor | None = None  # LServe: [NB * Hkv, 2D] each page's whole box (page_boxes)
        # LServe: request id -> its choice: list entries and the pages they name, each [Hkv, K]
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

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

    def _is_plain(self, layer) -> bool:
        """Whether this layer neither selects pages nor streams (dense layers, non-decoder
        attention): its KV write and attention are stock. Worked out on first use, then one
        attribute read per call."""
        if self._plain is None:
            self._plain = self._sparse(layer) is None and self._streaming(layer) is None
        return self._plain

    def _sparse(self, layer) -> PageSelector | None:
        if self.attn_type != AttentionType.DECODER:
            return None
        sel = self._resolve(layer)
        return sel if isinstance(sel, PageSelector) else None

    # ---- KV write: stock, plus Quest's page summaries from the incoming keys ------------------
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self._plain or self._sparse(layer) is None:
            return
        num_blocks, H, S, _ = kv_cache.shape
        if not self.sub:
            self.sub = sub_page_size(current_policy(), S)
        w = key_writes(slot_mapping, S, H, self.sub)
        if w is not None:
            self._update_bounds(w.tokens(key).reshape(-1, self.head_size), w, num_blocks * H, S)

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
        if md.evict is None and self._is_plain(layer):
            return self._forward_dense(layer, query, key, value, kv_cache, md, output,
                                       output_scale, output_block_scale, start)
        stream = self._streaming(layer)
        if stream is not None and (stream.sink, stream.window) in md.streams:
            return self._forward_streaming(stream, layer, query, key, value, kv_cache, md, output,
                                           output_scale, output_block_scale, start)
        if md.evict is not None:
            return self._forward_evict(layer, query, key, value, kv_cache, md, output,
                                       output_scale, output_block_scale, start)
        sel = self._sparse(layer)
        if sel is None or md.num_decodes == 0:
            return self._forward_dense(layer, query, key, value, kv_cache, md, output,
                                       output_scale, output_block_scale, start)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by kvkit")
        self._forward_sparse(sel, layer, query, kv_cache, md, output, start)
        return output

    def _forward_dense(self, layer, query, key, value, kv_cache, md: KVKitCPUAttentionMetadata, output,
                       output_scale, output_block_scale, start: float):
        """Every row on the stock kernel (dense layers, prefill-only steps)."""
        out = super().forward(layer, query, key, value, kv_cache, md, output, output_scale, output_block_scale)
        if md.decode_pages:
            self._record(md, md.decode_pages, md.decode_pages, kv_cache, start, 0.0)
        return out

    def _forward_streaming(self, stream: SinkWindowEvictor, layer, query, key, value, kv_cache,
                           md: KVKitCPUAttentionMetadata, output, output_scale, output_block_scale, start: float):
        """A streaming layer: the stock kernel on the block tables trimmed to sink and window."""
        window = (stream.sink, stream.window)
        out = super().forward(layer, query, key, value, kv_cache, md.streams[window], output,
                              output_scale, output_block_scale)
        if md.decode_pages:
            self._record(md, md.stream_decode_pages[window], md.decode_pages, kv_cache, start, 0.0)
        return out

    def _forward_evict(self, layer, query, key, value, kv_cache, md: KVKitCPUAttentionMetadata, output,
                       output_scale, output_block_scale, start: float):
        """A score-evicting layer: the stock kernel on each row's blocks not evicted, then the
        attention mass per block for the worker's eviction state."""
        out = super().forward(layer, query, key, value, kv_cache, md.evict.md, output,
                              output_scale, output_block_scale)
        scoring = time.perf_counter()
        self._score_blocks(layer, query, kv_cache, md)
        if md.decode_pages:  # the scoring is this path's "selection" overhead
            self._record(md, md.evict.decode_pages, md.decode_pages, kv_cache, start, time.perf_counter() - scoring)
        return out

    def _forward_sparse(self, sel: PageSelector, layer, query, kv_cache, md: KVKitCPUAttentionMetadata,
                        output: torch.Tensor, start: float) -> None:
        """A page-selecting layer: the decode rows on their chosen pages, prefill rows stock."""
        pages_read, sel_s = self._decode_sparse(sel, layer, query, kv_cache, md, output)
        self._record(md, pages_read, md.decode_pages, kv_cache, start, sel_s)
        if md.prefill_query_start_loc is not None:
            self._prefill_rows(layer, query, kv_cache, md, output)

    def _score_blocks(self, layer, query: torch.Tensor, kv_cache: torch.Tensor, md: KVKitCPUAttentionMetadata) -> None:
        """Add this layer's attention mass per kept block to each row's step (eviction.py):
        decode rows together, each prefill row by its last `OBSERVED` queries."""
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
            mass = self._block_mass(q, kv_cache, table, lengths, weights, layer.isa)  # [B, M]
            for i, b in enumerate(rows):
                n = len(e.kept[b])
                STATE.add_mass(e.req_ids[b], e.kept[b], mass[i, :n], int(e.kept[b][-1]) + 1)

    def _block_mass(self, q: torch.Tensor, kv_cache: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
                    weights: torch.Tensor, isa: str) -> torch.Tensor:
        """`[B, M]` attention mass of the queries `q` `[B, T, Hq, D]` (weighted per query by
        `weights` `[T]`) per block of `table` `[B, M]`, from the keys in vLLM's cache."""
        return block_mass(q, gather_keys(kv_cache, table, isa), lengths, self.scale, weights, kv_cache.shape[2])

    def _record(self, md: KVKitCPUAttentionMetadata, pages_read: int, pages_total: int,
                kv_cache: torch.Tensor, start: float, selection_seconds: float) -> None:
        """Add this layer call to the step's metrics (`StepRecord`, recorded once per step)."""
        page_bytes = 2 * kv_cache.shape[2] * self.head_size * kv_cache.element_size()
        md.record.add(pages_read, pages_total, pages_read * page_bytes, time.perf_counter() - start,
                      selection_seconds)

    def _select(self, sel: PageSelector, q: torch.Tensor, md: KVKitCPUAttentionMetadata,
                S: int, budget: int) -> torch.Tensor:
        """The choice per (decode request, KV head): `[B, Hkv, K]` virtual page ids in position
        order, -1 padded at the end. Per layer only the bounds, the group reduce and the top-k
        run; the rest is the builder's `SelectionPlan`."""
        plan = md.selection[sel]
        k = md.plans[budget].budget_pages
        if plan.all_fit:  # what top_pages would choose: every listed page, in order
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
        refresh, as_kept = self._reuse_rows(plan)
        scored = [b for b in range(B) if not as_kept[b]]
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

    def _reuse_rows(self, plan: SelectionPlan) -> tuple[list[bool], list[bool]]:
        """Per row: whether it chooses afresh (the builder marked it, or this layer holds no kept
        choice for its request), and whether it reads its kept pages as they are."""
        B = plan.vpages.shape[0]
        if plan.req_ids is None:
            return [True] * B, [False] * B
        refresh = [r or rid not in self.kept for r, rid in zip(plan.refresh, plan.req_ids)]
        return refresh, [a and not r for a, r in zip(plan.as_kept, refresh)]

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
        return int((chosen >= 0).sum()), selection_seconds

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

