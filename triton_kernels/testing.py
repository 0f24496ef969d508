"""Random paged cases and the tolerance table, for the kernel tests and benchmarks (torch only).

Shapes: B seqs, Hq/Hkv query/kv heads, P pages per list, S page_size, D head_dim, N pages.
"""

from __future__ import annotations

import torch

# (atol, rtol) of kernel outputs against the float32-softmax references, per compute dtype.
# Measured worst cases on the test shapes (interpreter): fp32 ~1e-6, fp16 ~1e-3, bf16 ~8e-3.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
# lse is accumulated in float32 from the same rounded inputs in every dtype.
LSE_TOL = (1e-4, 1e-5)
JUNK = 1e3  # written into empty slots and unlisted pages: reading one shows in the output


def random_paged_case(num_seqs: int = 2, num_qo_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 64,
                      page_size: int = 16, seq_lens: list[int] | list[list[int]] | int = 37,
                      budget_pages: int | None = None, dtype: torch.dtype = torch.float32,
                      shuffle_pages: bool = True, evict_frac: float = 0.0, spare_pages: int = 3,
                      seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """A page pool, queries and per-(sequence, KV head) page lists, as the store would hold them.

    seq_lens: one length for all, one per sequence, or one per (sequence, KV head) (heads that
    keep different tokens). Each (sequence, head) gets ceil(len / S) pages (last one partial);
    `shuffle_pages` scatters them over the pool; `evict_frac` empties that share of slots;
    `budget_pages` keeps a random subset of each list (in random order), -1 padded.
    Returns the keyword arguments of `sparse_decode`: q, k_cache, v_cache, page_table,
    slot_valid, plus `positions` `[N, S]` int32 (-1: empty) like `store.slot_positions`.
    """
    g = torch.Generator().manual_seed(seed)
    B, Hkv, S, D = num_seqs, num_kv_heads, page_size, head_dim
    if isinstance(seq_lens, int):
        lens = [[seq_lens] * Hkv for _ in range(B)]
    else:
        lens = [list(x) if isinstance(x, (list, tuple)) else [x] * Hkv for x in seq_lens]
    if len(lens) != B or any(len(row) != Hkv for row in lens):
        raise ValueError(f"seq_lens must be an int, [B={B}] or [B={B}][Hkv={Hkv}], got {seq_lens}")
    need = [[-(-n // S) for n in row] for row in lens]
    N = sum(map(sum, need)) + spare_pages
    order = torch.randperm(N, generator=g) if shuffle_pages else torch.arange(N)
    positions = torch.full((N, S), -1, dtype=torch.int32)
    lists, nxt = [], 0
    for b in range(B):
        row = []
        for h in range(Hkv):
            pages = order[nxt:nxt + need[b][h]].tolist()
            nxt += need[b][h]
            for i, p in enumerate(pages):
                n = min(S, lens[b][h] - i * S)
                positions[p, :n] = torch.arange(i * S, i * S + n, dtype=torch.int32)
            row.append(pages)
        lists.append(row)
    if evict_frac > 0:
        drop = torch.rand(N, S, generator=g) < evict_frac
        positions[drop] = -1
    if budget_pages is not None:
        lists = [[[h[i] for i in torch.randperm(len(h), generator=g)[:budget_pages].tolist()] for h in row]
                 for row in lists]
    P = max((len(h) for row in lists for h in row), default=0)
    table = torch.full((B, Hkv, P), -1, dtype=torch.int64)
    for b, row in enumerate(lists):
        for h, pages in enumerate(row):
            table[b, h, :len(pages)] = torch.tensor(pages, dtype=torch.int64)
    k = torch.randn(N, S, D, generator=g)
    v = torch.randn(N, S, D, generator=g)
    empty = positions < 0
    k[empty], v[empty] = JUNK, -JUNK
    q = torch.randn(B, num_qo_heads, D, generator=g)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return {"q": to(q), "k_cache": to(k), "v_cache": to(v), "page_table": table.to(device),
            "slot_valid": (positions >= 0).to(device), "positions": positions.to(device)}
