"""Test-side instrumentation of kvkit's vLLM backend: usage counters and shadow checks.

`engine_run.py` calls `install(check)` in the engine's process (the tests run vLLM with
`VLLM_ENABLE_V1_MULTIPROCESSING=0`, so engine core and worker live there) after vLLM's plugins
are loaded: CPU_ATTN then resolves to `CheckedBackend`, whose impl is `CheckedImpl`, a subclass
of kvkit's impl that counts which path each layer call ran (`USAGE`) and, with `check`, keeps a
float32 shadow copy of every K/V written and compares what vLLM read with kvkit's reference
(`CHECKS`, one row per layer call):

- page selection (quest, lserve): the running key boxes equal the shadow's per sub-page (and
  LServe's page boxes the shadow's per page); kvkit's scoring on the shadow's boxes, slot
  positions and lengths (`forced_from_positions`, `top_pages_per_row`; LServe's two levels on
  the rows that chose afresh, the check's own kept choices on the others) chooses the same pages;
  the output equals `sparse_decode_ref` over the chosen pages within bf16 tolerance (2e-2, 2e-2);
- streaming and score-evicting layers: every query's output equals a float32 causal attention
  over the shadow restricted to the positions the layer must read (sink + window blocks, or the
  blocks not evicted), which must hold written K/V in blocks no other row reads; the block mass
  a score evictor adds equals the same mass from the shadow's keys.

Nothing here is imported by kvkit: production runs without it.

Shapes: B decode requests, H KV heads, G query heads per KV head, NB blocks, S block_size,
R sub-pages per block, D head_dim, P listed pages, T tokens, L positions read.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch

from kvkit.attention.ref import causal_prefill_ref, sparse_decode_ref
from kvkit.policies.selectors.quest import LServeSelector
from kvkit.scoring import forced_from_positions, reduce_group, top_pages_per_row
from kvkit.integrations.vllm import plugin
from kvkit.integrations.vllm.backend import KVKitCPUAttentionBackend
from kvkit.integrations.vllm.eviction import block_mass
from kvkit.integrations.vllm.impl import KVKitCPUAttentionImpl, key_writes
from kvkit.integrations.vllm.layers import current_policy
from kvkit.integrations.vllm.metadata import KVKitCPUAttentionMetadata
from kvkit.integrations.vllm.selection import SelectionPlan, block_bound_scores, page_boxes

CHECKS: list[dict] = []  # with the check on: one row per checked layer call
USAGE: dict[str, int] = {"dense_calls": 0, "sparse_calls": 0, "prefill_rows_calls": 0, "streaming_calls": 0,
                         "lserve_refreshed_rows": 0, "lserve_reused_rows": 0, "lserve_as_kept_rows": 0,
                         "evict_calls": 0}
TOL = (2e-2, 2e-2)  # bf16 (atol, rtol)
_CHECK = False


def install(check: bool) -> None:
    """Route CPU_ATTN through `CheckedBackend` in this process (after vLLM loaded its plugins, so
    kvkit's `register()` does not run again over it); `check`: keep the shadow and compare."""
    global _CHECK
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    _CHECK = check
    register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.ConfiguredBackend")


def __getattr__(name: str):
    """`ConfiguredBackend`: `CheckedBackend` wherever kvkit's backend would run, else what
    kvkit's plugin resolves (vLLM's own CPU backend, unconfigured)."""
    if name != "ConfiguredBackend":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    backend = KVKitCPUAttentionBackend if plugin.active_policy() is not None else plugin.ConfiguredBackend
    return CheckedBackend if backend is KVKitCPUAttentionBackend else backend


class CheckedImpl(KVKitCPUAttentionImpl):
    """kvkit's impl, counting its paths and, with the check on, comparing them with kvkit's
    reference on a float32 shadow of the K/V."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shadow: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # K, V [NB*H, S, D], written
        self._chosen: torch.Tensor | None = None  # [B, H, K] the pages this call chose
        self._refreshed: list[bool] = []  # LServe: rows that chose afresh this call
        self._check_kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # LServe: the check's own choices

    # ---- the shadow copy ----------------------------------------------------------------------
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if not _CHECK or not (self._sparse(layer) is not None or self._streaming(layer) is not None
                              or plugin.scores_blocks(current_policy())):
            return
        num_blocks, H, S, _ = kv_cache.shape
        D = self.head_size
        if self.shadow is None:
            self.shadow = (torch.zeros(num_blocks * H, S, D), torch.zeros(num_blocks * H, S, D),
                           torch.zeros(num_blocks * H, S, dtype=torch.bool))
        w = key_writes(slot_mapping, S, H, self.sub or S)
        if w is None:
            return
        sk, sv, valid = self.shadow
        if w.fresh is not None:
            valid[w.fresh] = False
        sk[w.rows, w.offs] = w.tokens(key).float().reshape(-1, D)
        sv[w.rows, w.offs] = w.tokens(value).float().reshape(-1, D)
        valid[w.rows, w.offs] = True

    # ---- the paths ----------------------------------------------------------------------------
    def _forward_dense(self, *args, **kwargs):
        USAGE["dense_calls"] += 1
        return super()._forward_dense(*args, **kwargs)

    def _forward_streaming(self, stream, layer, query, key, value, kv_cache, md, output, *args, **kwargs):
        USAGE["streaming_calls"] += 1
        out = super()._forward_streaming(stream, layer, query, key, value, kv_cache, md, output, *args, **kwargs)
        if self.shadow is not None:
            S = kv_cache.shape[2]
            self._check_read(query, output, md, S, _stream_positions(stream.sink, stream.window, S))
        return out

    def _forward_evict(self, layer, query, key, value, kv_cache, md, output, *args, **kwargs):
        USAGE["evict_calls"] += 1
        out = super()._forward_evict(layer, query, key, value, kv_cache, md, output, *args, **kwargs)
        if self.shadow is not None:
            S = kv_cache.shape[2]
            self._check_read(query, output, md, S, _kept_positions(md.evict.kept, S))
        return out

    def _forward_sparse(self, sel, layer, query, kv_cache, md, output, start) -> None:
        USAGE["sparse_calls"] += 1
        USAGE["prefill_rows_calls"] += md.prefill_query_start_loc is not None
        super()._forward_sparse(sel, layer, query, kv_cache, md, output, start)

    def _reuse_rows(self, plan: SelectionPlan) -> tuple[list[bool], list[bool]]:
        refresh, as_kept = super()._reuse_rows(plan)
        self._refreshed = refresh
        USAGE["lserve_refreshed_rows"] += sum(refresh)
        USAGE["lserve_reused_rows"] += len(refresh) - sum(refresh)
        USAGE["lserve_as_kept_rows"] += sum(as_kept)
        return refresh, as_kept

    def _select(self, sel, q, md, S, budget) -> torch.Tensor:
        if md.selection[sel].all_fit:
            self._refreshed = [True] * q.shape[0]
        self._chosen = super()._select(sel, q, md, S, budget)
        return self._chosen

    def _decode_sparse(self, sel, layer, query, kv_cache, md, output) -> tuple[int, float]:
        result = super()._decode_sparse(sel, layer, query, kv_cache, md, output)
        if self.shadow is not None:
            B = md.num_decodes
            self._check(sel, query[:B], self._chosen, output[:B], md, kv_cache.shape[2])
        return result

    def _block_mass(self, q, kv_cache, table, lengths, weights, isa) -> torch.Tensor:
        mass = super()._block_mass(q, kv_cache, table, lengths, weights, isa)
        if self.shadow is not None:  # the same mass from the float32 copy of the written keys
            num_blocks, H, S, _ = kv_cache.shape
            copy = self.shadow[0].view(num_blocks, H, S, -1).transpose(0, 1)[:, table]  # [H, B, M, S, D]
            ref = block_mass(q, copy.flatten(2, 3), lengths, self.scale, weights, S)
            CHECKS.append({"layer": self._layer, "rows": q.shape[0], "mass_check": True,
                           "mass_equal": bool(torch.allclose(mass, ref, rtol=1e-4, atol=1e-5))})
        return mass

    # ---- the checks ---------------------------------------------------------------------------
    def _check(self, sel, q: torch.Tensor, chosen: torch.Tensor,
               out: torch.Tensor, md: KVKitCPUAttentionMetadata, S: int) -> None:
        """Redo this step with kvkit's own pieces on the float32 shadow of the K/V and record how
        far vLLM's result is from it.

        - bounds: the running signed boxes equal the shadow's per sub-page (and LServe's running
          page boxes the shadow's per page);
        - selection: `block_bound_scores`, kvkit's `reduce_group`, `forced_from_positions` and
          `top_pages` (what `QuestSelector` runs, with sub-page bounds) choose the same pages
          from the shadow, slot positions and lengths; for LServe, `lserve_block_scores` on the rows
          that chose afresh and the kept entries on the others;
        - attention: `sparse_decode_ref` over the chosen pages, bf16 tolerance (2e-2, 2e-2).
        """
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
        excess = (out.float() - ref).abs() - (TOL[0] + TOL[1] * ref.abs())
        CHECKS.append({"layer": self._layer, "rows": B, "pages": int((chosen >= 0).sum()),
                       "bounds_equal": bounds_ok,
                       "selection_equal": bool(torch.equal(ref_chosen, chosen)),
                       "max_abs_err": float((out.float() - ref).abs().max()),
                       "within_tol": bool((excess <= 0).all())})

    def _check_read(self, query: torch.Tensor, output: torch.Tensor, md: KVKitCPUAttentionMetadata,
                    S: int, kept_positions: Callable[[int, int, int], torch.Tensor]) -> None:
        """Every query of this step against a float32 causal
        attention over the unpacked copy of its sequence, restricted to the positions the layer
        reads: `kept_positions(row, first query position, length)`. Kept positions must hold
        written K/V in blocks no other row reads (never a freed block). bf16 tolerance (2e-2, 2e-2)."""
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
            ok &= bool(((got - ref).abs() <= TOL[0] + TOL[1] * ref.abs()).all())
        kept = torch.cat(kept_blocks) if kept_blocks else torch.zeros(0, dtype=torch.long)
        CHECKS.append({"layer": self._layer, "rows": n, "read_check": True, "kept_written": all_written,
                       # a block freed (null block 0) or handed to another request would repeat
                       "kept_blocks_distinct": bool(kept.unique().numel() == kept.numel()
                                                    and not (kept == 0).any()),
                       "max_abs_err": worst, "within_tol": ok})


def _stream_positions(sink: int, window: int, S: int) -> Callable[[int, int, int], torch.Tensor]:
    """A streaming layer's read (for `CheckedImpl._check_read`): the sink blocks and the blocks from the one
    holding the window start of the row's first query on."""
    sink_blocks = -(-sink // S)

    def positions(row: int, first: int, length: int) -> torch.Tensor:
        window_block = max(sink_blocks, max(0, first - window + 1) // S)
        pos = torch.arange(length)
        return pos[(pos // S < sink_blocks) | (pos // S >= window_block)]
    return positions


def _kept_positions(kept: list[torch.Tensor], S: int) -> Callable[[int, int, int], torch.Tensor]:
    """A score-evicting layer's read (for `CheckedImpl._check_read`): the row's blocks not evicted."""
    def positions(row: int, first: int, length: int) -> torch.Tensor:
        pos = torch.arange(length)
        return pos[torch.isin(pos // S, kept[row])]
    return positions


class CheckedBackend(KVKitCPUAttentionBackend):
    """kvkit's backend with `CheckedImpl`."""

    @staticmethod
    def get_impl_cls() -> type[CheckedImpl]:
        return CheckedImpl
