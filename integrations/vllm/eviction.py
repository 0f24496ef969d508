"""Score-based eviction in vLLM: H2O / A2SF at block granularity, blocks freed through a KV connector.

A vLLM block holds S tokens of every layer and KV head of its KV cache group, so a block leaves
for all of them at once: its score is the attention mass its tokens received, summed over
layers and query heads, decayed once per step by A2SF's forgetting factor (1 for H2O):

    score_i(t) = f * score_i(t - 1) + sum over layers, query heads and tokens of block i of a_t

Where each part runs:
- the backend (worker) adds each layer's mass per row (`block_mass`, from the keys in vLLM's
  cache, unpacked from the CPU kernel's layout by `gather_keys`), and its decode rows read only
  the blocks not evicted (`EvictionState.compact`);
- after the step, `KVKitEvictionConnector.build_connector_worker_meta` (worker) folds the scores and,
  for each decode row holding more than its budget, evicts its lowest-score blocks outside the
  sink and window blocks. From then on the worker no longer reads them;
- the scheduler side of the connector receives them (`EvictedBlocks`) and frees them in the KV
  cache manager, leaving the null block in their place, as vLLM's sliding-window manager does,
  so they serve other requests.

The prompt is scored by its last `OBSERVED` queries, each weighted f ** (distance to the last
one) (H2O/A2SF's "end" mode scores every prompt query; the last ones carry most of the weight
with f < 1). Prefill chunks are never evicted from: only decode rows evict, so a chunked prompt
is read whole. Limits: prefix caching must be off (a shared block would be freed under another
request); one worker (with tensor parallelism each worker would score its own heads and evict
differently); the whole model evicts (plugin.check_supported refuses mixing with other
policies, so all layers share one KV cache group).

Shapes: B rows, M blocks of a row, Hq/Hkv query/KV heads, G = Hq // Hkv, S block_size, D head_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)

from kvkit import metrics
from kvkit.integrations.vllm.plugin import EVICTION_CONNECTOR
from kvkit.policies import Policy
from kvkit.policies.evictors.h2o import A2SFEvictor

CONNECTOR = EVICTION_CONNECTOR["kv_connector"]
OBSERVED = 32  # the prompt's last queries that score it

__all__ = ["CONNECTOR", "EvictedBlocks", "EvictionState", "KVKitEvictionConnector", "STATE", "block_mass",
           "gather_keys", "kv_transfer_config", "score_evictor"]


def kv_transfer_config() -> dict[str, str]:
    """What `--kv-transfer-config` (or `LLM(kv_transfer_config=...)`) needs for score eviction."""
    return dict(EVICTION_CONNECTOR)


def score_evictor(policy: Policy, num_layers: int, num_kv_heads: int) -> A2SFEvictor | None:
    """The policy's H2O/A2SF evictor, or None. vLLM frees a block for every layer and KV head,
    so one score evictor must serve them all (NotImplementedError otherwise)."""
    groups = {e for layer in range(num_layers) for e, _ in policy.evictors(layer, num_kv_heads)}
    if not any(isinstance(e, A2SFEvictor) for e in groups):
        return None
    if len(groups) != 1:
        raise NotImplementedError(
            f"kvkit's vLLM backend evicts whole blocks (all layers and KV heads at once): policy "
            f"{policy.name!r} must run one h2o/a2sf evictor on every layer and head, it runs "
            f"{sorted(type(e).__name__ for e in groups)}")
    (ev,) = groups
    return ev


def gather_keys(kv_cache: torch.Tensor, table: torch.Tensor, isa: str) -> torch.Tensor:
    """The keys of the listed blocks as plain rows: `[Hkv, B, M * S, D]`, in the cache's dtype.

    kv_cache: vLLM's CPU cache `[NB, Hkv, S, 2D]` (each (block, KV head): S*D packed keys, then
    the values); table: `[B, M]` block ids. The CPU kernel packs keys per instruction set
    (pinned by test_contract.py): `amx` stores `[S/16, D/2, 16, 2]` (pairs of channels of 16
    tokens), `vec`/`vec16` store `[D, S]`. For amx a pair of bf16 channels is read as one int32,
    so the gather and the unpacking are one copy (the bf16 transpose of pairs cost ~5x more).
    """
    NB, H, S, D2 = kv_cache.shape
    D = D2 // 2
    B, M = table.shape
    region = kv_cache.view(NB, H, 2 * S * D)[:, :, : S * D]  # the key region of each (block, head)
    if isa == "amx" and kv_cache.element_size() == 2:
        pairs = region.view(torch.int32).view(NB, H, S // 16, D // 2, 16)
        rows = pairs.transpose(-1, -2).transpose(0, 1)[:, table].contiguous()  # [H, B, M, S/16, 16, D/2]
        return rows.view(kv_cache.dtype).view(H, B, M * S, D)
    if isa in ("vec", "vec16"):
        plain = region.view(NB, H, D, S).transpose(-1, -2)  # [NB, H, S, D]
        return plain.transpose(0, 1)[:, table].reshape(H, B, M * S, D)
    raise NotImplementedError(f"kvkit: score eviction cannot read keys packed for ISA {isa!r} "
                              "(knows amx, vec, vec16)")


def block_mass(query: torch.Tensor, keys: torch.Tensor, length: torch.Tensor, scale: float,
               weights: torch.Tensor, block_size: int) -> torch.Tensor:
    """Attention mass per block, summed over query heads and the rows' weighted queries.

    query: `[B, T, Hq, D]` each row's last T queries, at positions `length - T .. length - 1`;
    keys: `[Hkv, B, M * S, D]` the row's blocks in position order (`gather_keys`); length: `[B]`
    tokens in the row's blocks; weights: `[T]` per query (f ** distance to the last). Returns
    `[B, M]` float32.
    """
    B, T, Hq, D = query.shape
    H, _, L, _ = keys.shape
    G = Hq // H
    q = query.float().view(B, T, H, G, D).permute(2, 0, 1, 3, 4).reshape(H, B, T * G, D)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).view(H, B, T, G, L) * scale
    qpos = length[:, None] - T + torch.arange(T)[None, :]  # [B, T]
    visible = torch.arange(L)[None, None, :] <= qpos[:, :, None]  # causal, and inside the row
    logits.masked_fill_(~visible[None, :, :, None, :], float("-inf"))
    probs = logits.softmax(-1).nan_to_num_(0.0)  # a row with no visible key gets no mass
    per_key = torch.einsum("hbtgl,t->bl", probs, weights.float())
    return per_key.view(B, L // block_size, block_size).sum(-1)


@dataclass
class Row:
    """One request's eviction state in the worker."""

    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [n blocks] float32
    step: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # this step's mass
    evicted: set[int] = field(default_factory=set)  # block indices (positions // S) gone


@dataclass
class StepRows:
    """What the builder knew of this step's rows, for the end of the step."""

    req_ids: list[str]
    seq_lens: list[int]
    decode: list[bool]
    budgets: list[int]  # tokens per row
    evictor: A2SFEvictor
    block_size: int
    policy_name: str


class EvictionState:
    """Per worker process: each request's block scores and evicted blocks; the evictions not
    yet reported to the scheduler."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.pending: dict[str, list[int]] = {}
        self.this_step: StepRows | None = None
        self.evicted_total = 0

    def forget(self, req_ids) -> None:
        for rid in req_ids:
            self.rows.pop(rid, None)
            self.pending.pop(rid, None)

    def compact(self, block_table: torch.Tensor, seq_lens: torch.Tensor, req_ids: list[str],
                S: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Each row's blocks without its evicted ones: `(table [B, M], lens [B] int32, kept)`,
        kept[b] the row's block indices read, in position order. The last block is never
        evicted, so every kept block but the last is full. The tail repeats the last column."""
        table, lens, kept = block_table.clone(), seq_lens.clone().to(torch.int32), []
        for b, rid in enumerate(req_ids):
            n = -(-int(seq_lens[b]) // S)
            row = self.rows.get(rid)
            gone = row.evicted if row is not None else ()
            idx = torch.tensor([i for i in range(n) if i not in gone], dtype=torch.long)
            kept.append(idx)
            if len(idx) < n:
                table[b, : len(idx)] = block_table[b, idx]
                table[b, len(idx):] = table[b, len(idx) - 1]
                lens[b] = int(seq_lens[b]) - (n - len(idx)) * S
        return table, lens, kept

    def add_mass(self, req_id: str, kept: torch.Tensor, mass: torch.Tensor, n_blocks: int) -> None:
        row = self.rows.setdefault(req_id, Row())
        if row.step.shape[0] < n_blocks:
            row.step = torch.cat([row.step, torch.zeros(n_blocks - row.step.shape[0])])
        row.step.index_add_(0, kept, mass)

    def end_step(self) -> None:
        """Fold the step's mass into the scores; each decode row over its budget evicts its
        lowest-score blocks between the sink blocks and the window blocks (ties: the older)."""
        step, self.this_step = self.this_step, None
        if step is None:
            return
        ev, S = step.evictor, step.block_size
        before = self.evicted_total
        sink_blocks = math.ceil(ev.sink / S)
        for rid, length, decode, budget in zip(step.req_ids, step.seq_lens, step.decode, step.budgets):
            row = self.rows.setdefault(rid, Row())
            n = -(-length // S)
            scores = torch.zeros(n)
            scores[: row.scores.shape[0]] = row.scores[:n] * ev.forgetting_factor
            scores[: row.step.shape[0]] += row.step[:n]
            row.scores, row.step = scores, torch.zeros(0)
            if not decode:
                continue
            window_block = min(n - 1, max(0, length - ev.recent) // S)  # first block of the window
            keep = max(budget // S, sink_blocks + (n - window_block))
            excess = n - len(row.evicted) - keep
            if excess <= 0:
                continue
            cand = torch.tensor([i for i in range(sink_blocks, window_block) if i not in row.evicted],
                                dtype=torch.long)
            gone = cand[torch.argsort(scores[cand], stable=True)[:excess]].tolist()
            row.evicted.update(gone)
            self.pending.setdefault(rid, []).extend(gone)
            self.evicted_total += len(gone)
        if self.evicted_total > before:
            metrics.record_evictions(step.policy_name, (self.evicted_total - before) * S)

    def take_pending(self) -> dict[str, list[int]]:
        out, self.pending = self.pending, {}
        return out


STATE = EvictionState()


@dataclass
class EvictedBlocks(KVConnectorWorkerMetadata):
    """Worker -> scheduler: request id -> block indices (positions // S) to free."""

    blocks: dict[str, list[int]]

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, EvictedBlocks)
        merged = {k: list(v) for k, v in self.blocks.items()}
        for rid, idx in other.blocks.items():
            merged.setdefault(rid, []).extend(i for i in idx if i not in merged[rid])
        return EvictedBlocks(merged)


@dataclass
class StartedAndFinished(KVConnectorMetadata):
    """Scheduler -> worker, each step: requests whose blocks were (re)allocated from scratch
    (new, resumed after preemption) or released (finished, preempted): their state starts over."""

    reset: set[str]


class KVKitEvictionConnector(KVConnectorBase_V1, SupportsHMA):
    """kvkit's KV connector: transfers nothing; carries score evictions from the workers to the
    scheduler's KV cache manager, which frees the blocks."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        if vllm_config.parallel_config.world_size > 1:
            raise NotImplementedError(
                "kvkit: score eviction runs with one worker (tensor/pipeline parallel size 1): "
                "workers holding different KV heads would evict different blocks")
        if vllm_config.cache_config.enable_prefix_caching:
            raise ValueError("kvkit: score eviction frees blocks a cached prefix would share; "
                             "start vLLM with --no-enable-prefix-caching")
        self.freed_blocks = 0  # scheduler side

    # ---- worker side ----------------------------------------------------------------------
    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, StartedAndFinished):
            STATE.forget(connector_metadata.reset)

    def build_connector_worker_meta(self) -> EvictedBlocks | None:
        STATE.end_step()
        pending = STATE.take_pending()
        return EvictedBlocks(pending) if pending else None

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    # ---- scheduler side -------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output) -> StartedAndFinished:
        cached = scheduler_output.scheduled_cached_reqs
        reset = {r.req_id for r in scheduler_output.scheduled_new_reqs}
        reset |= set(cached.resumed_req_ids) | set(scheduler_output.finished_req_ids)
        reset |= set(scheduler_output.preempted_req_ids or ())
        return StartedAndFinished(reset)

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, EvictedBlocks) or self._kv_cache_manager is None:
            return
        for manager in self._kv_cache_manager.coordinator.single_type_managers:
            for rid, idx in meta.blocks.items():
                blocks = manager.req_to_blocks.get(rid)
                if blocks is None:  # finished or preempted since: its blocks are already free
                    continue
                freed = []
                for i in idx:
                    if i < len(blocks) and not blocks[i].is_null:
                        freed.append(blocks[i])
                        blocks[i] = manager._null_block
                manager.block_pool.free_blocks(freed)
                self.freed_blocks += len(freed)

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        return False, None

    def request_finished_all_groups(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        return False, None
