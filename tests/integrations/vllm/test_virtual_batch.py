"""The virtual batch on vLLM's real CPU kernel (no engine): per-KV-head page selection read
through `cpu_attention_with_kv_cache` over the `[NB * Hkv, 1, 2S, D]` view matches kvkit's
reference, and with every page selected it matches the stock call.

Shapes: B requests, Hq/Hkv query/KV heads, NB blocks, S block_size, D head_dim, K pages read.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this environment; "
                    "run `make test-vllm`")

import torch  # noqa: E402
from vllm import _custom_ops as ops  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa  # noqa: E402

from kvkit.attention.ref import sparse_decode_ref  # noqa: E402
from kvkit.integrations.vllm.impl import virtual_decode  # noqa: E402
from kvkit.integrations.vllm.metadata import plan_virtual  # noqa: E402

# vLLM's kernel uses AMX tiles where the CPU has them; a process must ask Linux for the AMX state
# first (the engine does so through oneDNN), else the kernel dies with SIGILL.
torch.cpu._init_amx()

TOL = {torch.bfloat16: (2e-2, 2e-2), torch.float32: (1e-4, 1e-4)}


def _case(seq_lens, num_qo_heads=9, num_kv_heads=3, S=32, D=64, NB=24, dtype=torch.bfloat16,
          seed=0):
    """Fill a vLLM CPU cache through vLLM's own write op, pages at shuffled blocks; keep an
    unpacked copy `[NB * Hkv, S, D]` (float32) for the reference."""
    g = torch.Generator().manual_seed(seed)
    H = num_kv_heads
    isa = _get_attn_isa(dtype, S, D, "auto")
    kv_cache = torch.zeros(NB, H, S, 2 * D, dtype=dtype)
    key_cache, value_cache = kv_cache.view(NB, H, 2 * S, D).chunk(2, dim=2)
    perm = torch.randperm(NB, generator=g)
    max_pages = max((n + S - 1) // S for n in seq_lens)
    block_table = torch.zeros(len(seq_lens), max_pages, dtype=torch.int32)
    k_ref = torch.zeros(NB * H, S, D)
    v_ref = torch.zeros(NB * H, S, D)
    valid = torch.zeros(NB * H, S, dtype=torch.bool)
    used = 0
    for b, n in enumerate(seq_lens):
        pages = (n + S - 1) // S
        block_table[b, :pages] = perm[used:used + pages].int()
        used += pages
        k = torch.randn(n, H, D, generator=g).to(dtype)
        v = torch.randn(n, H, D, generator=g).to(dtype)
        pos = torch.arange(n)
        slots = block_table[b, pos // S].long() * S + pos % S
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
        rows = (block_table[b, pos // S].long()[:, None] * H + torch.arange(H)).reshape(-1)
        offs = (pos % S).repeat_interleave(H)
        k_ref[rows, offs] = k.float().reshape(-1, D)
        v_ref[rows, offs] = v.float().reshape(-1, D)
        valid[rows, offs] = True
    q = torch.randn(len(seq_lens), num_qo_heads, D, generator=g).to(dtype)
    return dict(q=q, kv_cache=kv_cache, block_table=block_table, k_ref=k_ref, v_ref=v_ref,
                valid=valid, isa=isa, S=S, H=H, D=D, g=g)


def _select(c, seq_lens, budget_pages):
    """Random pages per (request, KV head): budget-1 full pages and the last, in order.
    `budget_pages`: one budget, or one per request."""
    S, H, bt = c["S"], c["H"], c["block_table"]
    budgets = budget_pages if isinstance(budget_pages, list) else [budget_pages] * len(seq_lens)
    rows = []
    for b, n in enumerate(seq_lens):
        pages = (n + S - 1) // S
        per_head = []
        for h in range(H):
            if pages <= budgets[b]:
                idx = torch.arange(pages)
            else:
                idx = torch.randperm(pages - 1, generator=c["g"])[: budgets[b] - 1].sort().values
                idx = torch.cat([idx, torch.tensor([pages - 1])])
            vp = bt[b, idx].long() * H + h
            per_head.append(torch.nn.functional.pad(vp, (0, max(budgets) - len(vp)), value=-1))
        rows.append(torch.stack(per_head))
    return torch.stack(rows)  # [B, Hkv, K]


@pytest.mark.parametrize("seq_lens", [[1], [31, 32, 33], [70, 100], [200, 9, 64]])
@pytest.mark.parametrize("budget_pages", [1, 2, 3, 16, "per request"])
def test_virtual_decode_matches_ref(seq_lens, budget_pages):
    c = _case(seq_lens)
    if budget_pages == "per request":  # a request's own budget (extra_args kvkit_budget)
        budget_pages = [1 + (3 * b) % 4 for b in range(len(seq_lens))]
    chosen = _select(c, seq_lens, budget_pages)
    plan = plan_virtual(torch.tensor(seq_lens), c["S"], torch.tensor(budget_pages), c["H"],
                        c["q"].shape[1], c["D"], torch.bfloat16, c["isa"])
    out = torch.empty_like(c["q"])
    scale = c["D"] ** -0.5
    virtual_decode(c["q"], c["kv_cache"], chosen, plan, out, scale)
    ref, _ = sparse_decode_ref(c["q"].float(), c["k_ref"], c["v_ref"], chosen, c["valid"],
                               scale=scale)
    atol, rtol = TOL[torch.bfloat16]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


def test_virtual_decode_with_every_page_equals_stock_call():
    seq_lens = [70, 100, 5]
    c = _case(seq_lens, seed=1)
    B, Hq, D = c["q"].shape
    budget = 8  # more pages than any request holds: every page is read
    chosen = _select(c, seq_lens, budget)
    plan = plan_virtual(torch.tensor(seq_lens), c["S"], budget, c["H"], Hq, D, torch.bfloat16,
                        c["isa"])
    out = torch.empty_like(c["q"])
    virtual_decode(c["q"], c["kv_cache"], chosen, plan, out, D ** -0.5)

    # the stock call, as CPUAttentionBackendImpl.forward makes it
    NB, H, S, _ = c["kv_cache"].shape
    key_cache, value_cache = c["kv_cache"].view(NB, H, 2 * S, D).chunk(2, dim=2)
    qsl = torch.arange(B + 1, dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=B, num_heads=Hq, num_kv_heads=H, head_dim=D, seq_lens=lens,
        dtype=torch.bfloat16, query_start_loc=qsl, causal=True, sliding_window_size=-1,
        isa=c["isa"], enable_kv_split=False)
    stock = torch.empty_like(c["q"])
    ops.cpu_attention_with_kv_cache(
        query=c["q"], key_cache=key_cache, value_cache=value_cache, output=stock,
        query_start_loc=qsl, seq_lens=lens, scale=D ** -0.5, causal=True, alibi_slopes=None,
        sliding_window=-1, block_table=c["block_table"], softcap=0.0,
        scheduler_metadata=sched, s_aux=None)
    torch.testing.assert_close(out.float(), stock.float(), atol=1e-2, rtol=1e-2)
