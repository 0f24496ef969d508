"""kvkit's vLLM CPU attention backend: vLLM's Backend / MetadataBuilder / Impl split, each a
subclass of vLLM's CPU_ATTN class.

- `KVKitCPUAttentionBackend` names the two classes below and otherwise is CPU_ATTN.
- `KVKitCPUAttentionMetadataBuilder` builds the stock metadata, and, when the policy selects
  pages, asks vLLM to put decode requests first in the batch and plans the *virtual batch* of
  every decode step (one plan per page budget): its lengths and the CPU kernel's scheduler
  metadata, shared by all layers of the step.
- `KVKitCPUAttentionImpl` writes K/V as stock, keeps the key min/max from the incoming keys
  (vLLM's cache tensor is packed per instruction set: never read statistics from it), and at
  decode reads only the pages Quest or LServe chose (`selection.py`) through the stock CPU
  kernel. LServe chooses every `reuse_steps`-th step of a request and reuses its choice (kept
  per request id and layer) in between.
- Streaming layers (a `SinkWindowEvictor` on every KV head; their blocks between sinks and window
  are freed by `streaming.StreamingManager`) run the stock kernel on block tables the builder
  trimmed to the sink and window blocks (`streaming.trim_blocks`), prefill and decode rows alike.
- Score eviction (`h2o`, `a2sf`: eviction.py): the stock kernel on block tables the builder
  compacted to each row's blocks not evicted; each layer then adds its attention mass per block
  to the worker's eviction state, which evicts at the end of the step.

Sub-pages: the CPU kernel takes blocks of 32 tokens or more, and Quest's bound is loose on big
pages (bench/results/quest_page_size.md: 8-token pages keep every needle, 16 and 32 lose some).
So the min/max are kept per sub-page of `policy.page_size` tokens (8 for `quest`, and 8 for a
policy that names none, such as `lserve`) and a block is scored by its best sub-page — still an upper bound of q·k over the block, and a tighter one. The
block is what is read.

The virtual batch (no KV copy): vLLM's CPU cache is `[NB, Hkv, S, 2D]` and keeps each (block,
KV head) page contiguous, so the view `[NB * Hkv, 1, 2S, D]` is a cache of single-head pages
where page `b * Hkv + h` is KV head h of block b. Every (decode request, KV head) becomes its own
request with one KV head, G query heads and its own block list: the selected pages in position
order, the request's last (partial) page last, so every listed page but the last is full and the
virtual length is `(K - 1) * S + last_len`. Prefill rows take the stock kernel.

Shapes: B decode requests, Hq/Hkv query/KV heads, G = Hq // Hkv, NB blocks, S block_size (a kvkit
page), D head_dim, P pages of the longest request, K pages read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import torch

from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from kvkit import metrics
from kvkit.errors import ConfigError
from kvkit.policies import FullSelector, Policy
from kvkit.policies.evictors.sink_window import SinkWindowEvictor
from kvkit.policies.selectors.quest import LServeSelector, QuestSelector
from kvkit.scoring import forced_from_lengths, reduce_group, reuse_scores, top_pages_per_row
from kvkit.integrations.vllm import eviction, plugin, requests
from kvkit.integrations.vllm.eviction import STATE, block_mass, gather_keys, score_evictor
from kvkit.integrations.vllm.selection import (FILL_SCORE, SelectionPlan, block_bound_scores, choose_afresh,
                                              empty_bounds, lserve_block_scores, page_boxes, stack_padded)
from kvkit.integrations.vllm.streaming import model_kv_heads, streaming_evictor, trim_blocks

logger = logging.getLogger(__name__)

CHECK_ENV = "KVKIT_VLLM_CHECK"  # "1": also run kvkit's reference on a shadow copy (tests only)
_LAYER_RE = re.compile(r"layers\.(\d+)\.")

# Filled when KVKIT_VLLM_CHECK=1: one row per (layer, decode step) the sparse path ran.
CHECKS: list[dict] = []
# Per process: which layer indices ran which path (for tests and logs).
USAGE: dict[str, int] = {"dense_calls": 0, "sparse_calls": 0, "prefill_rows_calls": 0, "streaming_calls": 0,
                         "lserve_refreshed_rows": 0, "lserve_reused_rows": 0, "lserve_as_kept_rows": 0,
                         "evict_calls": 0}


def _policy() -> Policy:
    policy = plugin.active_policy()
    if policy is None:  # a process where the backend was registered but register() did not run
        policy = plugin.load_policy() or Policy(name="dense")
    return policy


def layer_index(layer_name: str) -> int:
    """The decoder layer index in a vLLM layer name (`model.layers.7.self_attn.attn` -> 7)."""
    m = _LAYER_RE.search(layer_name)
    if m is None:
        raise ValueError(f"kvkit: cannot find a layer index in vLLM layer name {layer_name!r}")
    return int(m.group(1))


PageSelector = QuestSelector | LServeSelector  # the selectors the virtual batch runs


def layer_selector(policy: Policy, layer: int, num_kv_heads: int) -> FullSelector | PageSelector:
    groups = policy.selectors(layer, num_kv_heads)
    if len(groups) != 1:  # plugin.check_supported rejects per-head selector rules
        raise NotImplementedError("kvkit's vLLM backend needs one selector per layer")
    return groups[0][0]


SUB_PAGE = 8  # tokens per sub-page when the policy names no page size: see sub_page_size


def sub_page_size(policy: Policy, block_size: int) -> int:
    """Tokens per sub-page of the key bounds in a vLLM block: the policy's page size (8 when it
    names none) when it divides the block size, else the whole block.

    8, not kvkit's default page of 16: on SmolLM2 at 7.2K tokens and a 1K budget, lserve in vLLM
    kept 5/6 needles with 16-token sub-pages and 6/6 with 8-token ones (NOTES.md)."""
    sub = policy.page_size or SUB_PAGE
    if sub >= block_size or block_size % sub:
        return block_size
    return sub


class KVKitCPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU_ATTN backend with kvkit's builder and impl; its name stays CPU_ATTN."""

    @staticmethod
    def get_impl_cls() -> type[KVKitCPUAttentionImpl]:
        return KVKitCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVKitCPUAttentionMetadataBuilder]:
        return KVKitCPUAttentionMetadataBuilder


@dataclass
class VirtualPlan:
    """One decode step's virtual batch at one page budget (shared by the layers using it)."""

    budget_pages: torch.Tensor  # [B] pages per KV head each decode request may read
    query_start_loc: torch.Tensor  # [B * Hkv + 1] int32: one query token per virtual request
    seq_lens: torch.Tensor  # [B * Hkv] int32: tokens each virtual request reads
    scheduler_metadata: torch.Tensor


@dataclass
class KVKitCPUAttentionMetadata(CPUAttentionMetadata):
    block_size: int = 0
    num_decodes: int = 0  # leading requests with one query token (sparse path)
    num_decode_tokens: int = 0
    decode_pages: int = 0  # pages (blocks x KV heads) a dense read of the decode rows reads
    plans: dict[int, VirtualPlan] = field(default_factory=dict)
    selection: dict[PageSelector, SelectionPlan] = field(default_factory=dict)
    # the prefill rows alone, for the stock kernel (None when the batch has no decode rows)
    prefill_query_start_loc: torch.Tensor | None = None
    prefill_seq_lens: torch.Tensor | None = None
    prefill_block_table: torch.Tensor | None = None
    prefill_scheduler_metadata: torch.Tensor | None = None
    # streaming layers: (sink, window) -> the stock metadata on trimmed block tables, and the
    # pages (blocks x KV heads) its decode rows read
    streams: dict[tuple[int, int], CPUAttentionMetadata] = field(default_factory=dict)
    stream_decode_pages: dict[tuple[int, int], int] = field(default_factory=dict)
    # score eviction (eviction.py): the stock metadata with decode rows on their kept blocks
    evict: EvictStep | None = None


@dataclass
class EvictStep:
    md: CPUAttentionMetadata  # block tables without the evicted blocks
    kept: list[torch.Tensor]  # per row: the block indices read, in position order
    req_ids: list[str]
    decode_pages: int  # pages (blocks x KV heads) the decode rows read
    forgetting_factor: float


def plan_virtual(seq_lens: torch.Tensor, block_size: int, budget_pages: int | torch.Tensor,
                 num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: torch.dtype, isa: str,
                 kv_cache_dtype: str = "auto") -> VirtualPlan:
    """The virtual batch of B decode requests reading at most `budget_pages` pages per KV head
    (one number, or `[B]`: per request).

    seq_lens: `[B]` tokens per request. A request with no more pages than its budget reads all of
    them; otherwise `budget - 1` full pages plus its last page.
    """
    seq_lens = seq_lens.long()
    budget_pages = torch.as_tensor(budget_pages).long().expand(seq_lens.shape)
    n_pages = (seq_lens + block_size - 1) // block_size  # [B]
    last = seq_lens - (n_pages - 1) * block_size  # tokens in the last page
    vlen = torch.where(n_pages <= budget_pages, seq_lens, (budget_pages - 1) * block_size + last)
    vlen = vlen.repeat_interleave(num_kv_heads).to(torch.int32)  # [B * Hkv]
    vqsl = torch.arange(vlen.shape[0] + 1, dtype=torch.int32)
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=vlen.shape[0], num_heads=num_qo_heads // num_kv_heads, num_kv_heads=1,
        head_dim=head_dim, seq_lens=vlen, dtype=dtype, query_start_loc=vqsl, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        kv_cache_dtype=kv_cache_dtype)
    return VirtualPlan(budget_pages, vqsl, vlen, sched)


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


class KVKitCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """Stock CPU metadata plus the decode/prefill split and the virtual-batch plans."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if (configured := plugin.policy_from_vllm_config(vllm_config)) is not None:
            plugin.install(configured, "additional_config")  # raises if $KVKIT_POLICY differs
        self.policy = _policy()
        budgets = set()
        self.selectors: set[PageSelector] = set()
        # LServe: per selector, request id -> its length when its pages were last chosen
        self.chosen_at: dict[LServeSelector, dict[str, int]] = {}
        heads = model_kv_heads(vllm_config)
        self.streams: set[tuple[int, int]] = set()  # (sink, window) of this group's streaming layers
        partial: list[int] = []  # layers where only some KV heads stream: they keep everything
        for name in layer_names:
            sel = layer_selector(self.policy, layer_index(name), heads)
            if isinstance(sel, PageSelector):
                budgets.add(max(1, sel.budget // self.block_size))
                self.selectors.add(sel)
            if (ev := streaming_evictor(self.policy, layer_index(name), heads)) is not None:
                self.streams.add((ev.sink, ev.window))
            elif any(isinstance(e, SinkWindowEvictor)
                     for e, _ in self.policy.evictors(layer_index(name), heads)):
                partial.append(layer_index(name))
        self.budget_pages = sorted(budgets)
        num_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.evictor = score_evictor(self.policy, num_layers, heads)
        if self.evictor is not None:
            _check_eviction_config(vllm_config, self.policy.name)
        # what a token per KV head per layer costs a request's budget in bytes: K and V of every
        # KV head in every layer that selects pages (or keeps them, for score eviction)
        counted = num_layers if self.evictor is not None else sum(
            isinstance(layer_selector(self.policy, i, heads), PageSelector) for i in range(num_layers))
        self.bytes_per_token = max(1, 2 * self.head_dim * kv_cache_spec.dtype.itemsize * heads * counted)
        if partial:
            logger.warning("kvkit: layers %s of policy %r stream on some KV heads only; vLLM "
                           "allocates whole layers, so they keep and read all their KV",
                           sorted(partial), self.policy.name)
        self.sparse = bool(self.budget_pages) and not (
            self.is_cross_attention or self.is_encoder_only_attention)
        if self.sparse:
            # decode requests first, so rows [0, num_decodes) are the decode rows
            self._init_reorder_batch_threshold(1)
        logger.info("kvkit: metadata builder for %d layers (%s), policy %r, page budgets %s, "
                    "streaming (sink, window) %s (block_size %d)", len(layer_names),
                    type(kv_cache_spec).__name__, self.policy.name, self.budget_pages,
                    sorted(self.streams), self.block_size)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KVKitCPUAttentionMetadata:
        stock = super().build(common_prefix_len, common_attn_metadata, fast_build)
        md = KVKitCPUAttentionMetadata(**{f.name: getattr(stock, f.name)
                                          for f in fields(CPUAttentionMetadata)})
        cm = common_attn_metadata
        qsl_cpu = cm.query_start_loc_cpu
        if self.sparse and stock.dynamic_causal is None and stock.causal:
            nd, npf, nd_tok, _ = split_decodes_and_prefills(cm, decode_threshold=1)
        else:  # dense: count decode rows for the metrics only (the batch is not reordered)
            nd, npf, nd_tok = 0, cm.num_reqs, 0
            q_lens = qsl_cpu[1 : cm.num_reqs + 1] - qsl_cpu[: cm.num_reqs]
            is_dec = q_lens == 1
            md.decode_pages = int(((cm.seq_lens[: cm.num_reqs][is_dec] + self.block_size - 1)
                                   // self.block_size).sum()) * self.num_kv_heads
        md.num_decodes, md.num_decode_tokens, md.block_size = nd, nd_tok, self.block_size
        if self.streams and stock.dynamic_causal is None and stock.causal:
            self._build_streams(md, stock, cm)
        if self.evictor is not None and stock.dynamic_causal is None and stock.causal:
            self._build_evict(md, stock, cm)
        if nd == 0:
            return md
        seq_lens = cm.seq_lens[:nd].long()  # [B]
        n_pages = (seq_lens + self.block_size - 1) // self.block_size  # [B]
        md.decode_pages = int(n_pages.sum()) * self.num_kv_heads
        H = self.num_kv_heads
        asked = requests.row_budgets()  # per row: a request's own budget, or None
        for budget in self.budget_pages:
            pages = budget if asked is None else torch.tensor(
                [budget if b is None else max(1, self._tokens(b) // self.block_size) for b in asked[:nd]])
            md.plans[budget] = plan_virtual(seq_lens, self.block_size, pages, H, self.num_heads,
                                            self.head_dim, self.dtype, self.isa,
                                            self.kv_cache_dtype)
        P = int(n_pages.max())
        vpages = stock.block_table[:nd, :P].long()[:, None, :] * H + torch.arange(H)[None, :, None]
        vpages = torch.where((torch.arange(P)[None, :] < n_pages[:, None])[:, None, :], vpages, -1)
        for sel in self.selectors:
            forced = forced_from_lengths(seq_lens, P, self.block_size, sel.sink, sel.window)
            vplan = md.plans[max(1, sel.budget // self.block_size)]
            md.selection[sel] = plan = SelectionPlan(vpages, forced[:, None, :].expand(nd, H, P),
                                                     all_fit=bool((n_pages <= vplan.budget_pages).all()))
            if isinstance(sel, LServeSelector):
                self._plan_reuse(sel, plan, seq_lens, n_pages, vplan)
        if npf:
            pqsl = (stock.query_start_loc[nd:] - stock.query_start_loc[nd]).to(torch.int32)
            md.prefill_query_start_loc = pqsl
            md.prefill_seq_lens = stock.seq_lens[nd:]
            md.prefill_block_table = stock.block_table[nd:]
            md.prefill_scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=npf, num_heads=self.num_heads, num_kv_heads=H, head_dim=self.head_dim,
                seq_lens=md.prefill_seq_lens, dtype=self.dtype, query_start_loc=pqsl,
                causal=stock.causal, sliding_window_size=self.window_size, isa=self.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=self.kv_cache_dtype)
        return md

    def _plan_reuse(self, sel: LServeSelector, plan: SelectionPlan, seq_lens: torch.Tensor,
                    n_pages: torch.Tensor, vplan: VirtualPlan) -> None:
        """LServe's reuse, decided once per step for all its layers (`selection.choose_afresh`)."""
        ids = requests.row_request_ids()
        nd = seq_lens.shape[0]
        if ids is None:  # no request ids (the runner wrapper did not run): choose every step
            plan.refresh = [True] * nd
            return
        chosen_at = self.chosen_at.setdefault(sel, {})
        fits = (n_pages <= vplan.budget_pages).tolist()
        refresh = choose_afresh(chosen_at, ids[:nd], seq_lens.tolist(), fits, sel.reuse_steps)
        plan.refresh, plan.req_ids, plan.live = refresh, list(ids[:nd]), chosen_at
        # A reused choice holds the forced pages of its step (when they fit the budget); the
        # forcing only gains pages when a new page starts, so without one it reads as kept.
        S = self.block_size
        forced_fit = ((plan.forced[:, 0] != 0).sum(-1) <= vplan.budget_pages).tolist()
        plan.as_kept = [not r and f and -(-chosen_at[rid] // S) == n
                        for r, f, rid, n in zip(refresh, forced_fit, plan.req_ids, n_pages.tolist())]

    def _tokens(self, budget: tuple[str, int]) -> int:
        """A request's budget in tokens per KV head per layer (`requests.request_budget`)."""
        kind, n = budget
        return n if kind == "tokens" else n // self.bytes_per_token

    def _build_streams(self, md: KVKitCPUAttentionMetadata, stock: CPUAttentionMetadata,
                       cm: CommonAttentionMetadata) -> None:
        """For each (sink, window) of this group: the stock metadata on block tables trimmed to
        the sink and window blocks, with its own kernel scheduler metadata."""
        n, S = cm.num_reqs, self.block_size
        q_lens = cm.query_start_loc_cpu[1 : n + 1] - cm.query_start_loc_cpu[:n]
        is_dec = q_lens == 1
        for sink, window in sorted(self.streams):
            table, lens = trim_blocks(stock.block_table[:n], stock.seq_lens[:n], q_lens, S, sink, window)
            md.streams[(sink, window)] = self._stock_on(stock, table, lens, n)
            md.stream_decode_pages[(sink, window)] = int(
                ((lens[is_dec] + S - 1) // S).sum()) * self.num_kv_heads

    def _build_evict(self, md: KVKitCPUAttentionMetadata, stock: CPUAttentionMetadata,
                     cm: CommonAttentionMetadata) -> None:
        """Score eviction: the stock metadata on each row's blocks less its evicted ones, and the
        step's rows for `EvictionState.end_step`."""
        ids = requests.row_request_ids()
        if ids is None:  # a warm-up or profiling batch: no requests to keep state for
            return
        n, S = cm.num_reqs, self.block_size
        q_lens = (cm.query_start_loc_cpu[1 : n + 1] - cm.query_start_loc_cpu[:n]).tolist()
        table, lens, kept = STATE.compact(stock.block_table[:n], stock.seq_lens[:n], ids[:n], S)
        is_dec = [q == 1 for q in q_lens]
        asked = requests.row_budgets() or [None] * n
        STATE.this_step = eviction.StepRows(
            list(ids[:n]), stock.seq_lens[:n].tolist(), is_dec,
            [self.evictor.budget if b is None else self._tokens(b) for b in asked[:n]],
            self.evictor, S, self.policy.name)
        md.evict = EvictStep(self._stock_on(stock, table, lens, n), kept, list(ids[:n]),
                             sum(len(k) for k, d in zip(kept, is_dec) if d) * self.num_kv_heads,
                             self.evictor.forgetting_factor)

    def _stock_on(self, stock: CPUAttentionMetadata, table: torch.Tensor, lens: torch.Tensor,
                  n: int) -> CPUAttentionMetadata:
        """The stock metadata with rows [0, n) on other block tables and lengths."""
        full_table, full_lens = stock.block_table.clone(), stock.seq_lens.clone()
        full_table[:n], full_lens[:n] = table, lens
        sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=n, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, seq_lens=full_lens, dtype=self.dtype,
            query_start_loc=stock.query_start_loc, causal=True,
            sliding_window_size=self.window_size, isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=self.kv_cache_dtype)
        return replace(stock, block_table=full_table, seq_lens=full_lens,
                       max_seq_len=int(full_lens[:n].max()) if n else 0, scheduler_metadata=sched)


def _check_eviction_config(vllm_config, policy_name: str) -> None:
    """Score eviction needs kvkit's KV connector (it carries the evictions to the scheduler)."""
    ktc = vllm_config.kv_transfer_config
    if ktc is None or ktc.kv_connector != eviction.CONNECTOR:
        raise ConfigError(
            f"kvkit: policy {policy_name!r} evicts blocks, which needs kvkit's KV connector: start vLLM "
            f"with --kv-transfer-config '{json.dumps(eviction.kv_transfer_config())}' (offline: "
            "LLM(..., kv_transfer_config=kvkit.integrations.vllm.eviction.kv_transfer_config()))")


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
            policy = _policy()
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
                                               or plugin.scores_blocks(_policy()))):
            return
        num_blocks, H, S, _ = kv_cache.shape
        D = self.head_size
        if self.check and self.shadow is None:
            self.shadow = (torch.zeros(num_blocks * H, S, D), torch.zeros(num_blocks * H, S, D),
                           torch.zeros(num_blocks * H, S, dtype=torch.bool))
        if not self.sub:
            self.sub = sub_page_size(_policy(), S)
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
