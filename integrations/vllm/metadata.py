"""kvkit's vLLM metadata builder: what every layer of a step shares, worked out once per step.

`KVKitCPUAttentionMetadataBuilder` builds vLLM's stock CPU metadata and, on top of it:
- when the policy selects pages (quest, lserve), asks vLLM to put decode requests first in the
  batch and plans the *virtual batch* of every decode step (`plan_virtual`, one `VirtualPlan` per
  page budget: its lengths and the CPU kernel's scheduler metadata), the listed pages and their
  sink/window forcing per selector (`selection.SelectionPlan`) and LServe's refresh rows
  (`selection.choose_afresh`);
- for streaming layers, the stock metadata on block tables trimmed to the sink and window blocks
  (`streaming.trim_blocks`);
- for score eviction (eviction.py), the stock metadata on each row's blocks not evicted
  (`EvictStep`), and the step's rows for the worker's eviction state.

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
from dataclasses import dataclass, field, fields, replace

import torch

from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata, CPUAttentionMetadataBuilder
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from kvkit import metrics
from kvkit.errors import ConfigError
from kvkit.policies.evictors.sink_window import SinkWindowEvictor
from kvkit.policies.selectors.quest import LServeSelector
from kvkit.scoring import forced_from_lengths
from kvkit.integrations.vllm import eviction, plugin, requests
from kvkit.integrations.vllm.eviction import STATE, score_evictor
from kvkit.integrations.vllm.layers import PageSelector, current_policy, layer_index, layer_selector
from kvkit.integrations.vllm.selection import SelectionPlan, choose_afresh
from kvkit.integrations.vllm.streaming import model_kv_heads, streaming_evictor, trim_blocks

logger = logging.getLogger(__name__)


@dataclass
class VirtualPlan:
    """One decode step's virtual batch at one page budget (shared by the layers using it)."""

    budget_pages: torch.Tensor  # [B] pages per KV head each decode request may read
    query_start_loc: torch.Tensor  # [B * Hkv + 1] int32: one query token per virtual request
    seq_lens: torch.Tensor  # [B * Hkv] int32: tokens each virtual request reads
    scheduler_metadata: torch.Tensor


@dataclass
class StepRecord:
    """kvkit's decode metrics of one step of one attention group, summed over its layer calls
    and recorded once (`metrics.record_decode`) when the last layer of the group has added its
    share: `kvkit_decode_seconds` then counts decode steps, as its help text says, and a layer
    call costs a few additions instead of six labelled Prometheus updates (what that saved:
    integrations/vllm/NOTES.md)."""

    policy: str
    layers: int  # layer calls that share this step's metadata
    calls: int = 0
    pages_read: int = 0
    pages_total: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    selection_seconds: float = 0.0

    def add(self, pages_read: int, pages_total: int, bytes_read: int, seconds: float,
            selection_seconds: float) -> None:
        """One layer call's share; the last call of the step records the sums."""
        if pages_read > pages_total:
            raise ValueError(f"kvkit: a layer read {pages_read} pages of {pages_total}")
        self.calls += 1
        self.pages_read += pages_read
        self.pages_total += pages_total
        self.bytes_read += bytes_read
        self.seconds += seconds
        self.selection_seconds += selection_seconds
        if self.calls >= self.layers:
            self.flush()

    def flush(self) -> None:
        """Record what was added since the last flush (nothing when nothing was)."""
        if self.calls:
            metrics.record_decode(self.policy, self.pages_read, self.pages_total, self.bytes_read,
                                  self.seconds, self.selection_seconds)
        self.calls = self.pages_read = self.pages_total = self.bytes_read = 0
        self.seconds = self.selection_seconds = 0.0


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
    # the step's decode metrics, added to by every layer call (None: no decode row)
    record: StepRecord | None = None


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




_STOCK_FIELDS = tuple(f.name for f in fields(CPUAttentionMetadata))  # copied into ours every step


class KVKitCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """Stock CPU metadata plus the decode/prefill split and the virtual-batch plans."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if (configured := plugin.policy_from_vllm_config(vllm_config)) is not None:
            plugin.install(configured, "additional_config")  # raises if $KVKIT_POLICY differs
        self.policy = current_policy()
        heads = model_kv_heads(vllm_config)
        num_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.policy.check_fits(num_layers, heads)  # a pattern or rule made for another model: refuse
        budgets = set()
        self.selectors: set[PageSelector] = set()
        # LServe: per selector, request id -> its length when its pages were last chosen
        self.chosen_at: dict[LServeSelector, dict[str, int]] = {}
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
        self._record: StepRecord | None = None  # the latest step's metrics
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
        md = KVKitCPUAttentionMetadata(**{name: getattr(stock, name) for name in _STOCK_FIELDS})
        if self._record is not None:  # a step whose layers did not all record (none expected)
            self._record.flush()
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
        self._record = md.record = StepRecord(self.policy.name, len(self.layer_names))
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


