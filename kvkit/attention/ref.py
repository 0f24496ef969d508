"""Paged attention in plain PyTorch: the definition every kernel is tested against.

Shapes: B sequences, Hq/Hkv query/KV heads, G = Hq // Hkv, P pages per list, S page_size,
D head_dim, T new tokens, L keys.
GQA is handled by grouping the G query heads of a KV head (`q.view(B, Hkv, G, D)`), so K and V
are never repeated in memory. Softmax runs in float32; an empty selection gives zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attend_pages(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                 scale: float, return_probs: bool = False):
    """Attention of one query per head over gathered pages.

    q: `[B, Hq, D]`; k, v: `[B, Hkv, P, S, D]`; valid: `[B, Hkv, P, S]` bool.
    Returns out `[B, Hq, D]` (q's dtype), lse `[B, Hq]` float32 (-inf when nothing is valid)
    and, if asked, probs `[B, Hkv, P, S]` summed over each group's query heads.
    """
    B, Hq, D = q.shape
    Hkv, P, S = k.shape[1], k.shape[2], k.shape[3]
    G = Hq // Hkv
    qg = q.view(B, Hkv, G, D).float()
    kf = k.reshape(B, Hkv, P * S, D).float()
    vf = v.reshape(B, Hkv, P * S, D).float()
    scores = torch.einsum("bhgd,bhnd->bhgn", qg, kf) * scale  # [B, Hkv, G, P*S]
    scores = scores.masked_fill(~valid.reshape(B, Hkv, 1, P * S), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # all-masked rows -> 0
    out = torch.einsum("bhgn,bhnd->bhgd", probs, vf)  # [B, Hkv, G, D]
    out = out.reshape(B, Hq, D).to(q.dtype)
    lse = lse.reshape(B, Hq)
    if return_probs:
        return out, lse, probs.sum(2).view(B, Hkv, P, S)
    return out, lse


def sparse_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      page_table: torch.Tensor, slot_valid: torch.Tensor, scale: float | None = None,
                      slot_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention reading only the listed pages of a dense page pool.

    q: `[B, Hq, D]`; k_cache, v_cache: `[N, S, D]`; page_table: `[B, Hkv, P]` int, -1 padded;
    slot_valid: `[N, S]` bool (slot holds a token); slot_mask: optional `[B, Hkv, P, S]` bool.
    Returns out `[B, Hq, D]` and lse `[B, Hq]` (float32; -inf for an empty selection, out 0).
    """
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    pages = page_table.clamp(min=0).long()
    valid = slot_valid[pages] & (page_table >= 0)[..., None]  # [B, Hkv, P, S]
    if slot_mask is not None:
        valid = valid & slot_mask
    return attend_pages(q, k_cache[pages], v_cache[pages], valid, scale)


def causal_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Queries attend to keys at positions <= their own (positions say what is causal).

    q: `[Hq, T, D]`; k, v: `[Hkv, L, D]`; q_pos: `[T]`; k_pos: `[L]`. Returns `[Hq, T, D]`.
    Used when the store already holds (possibly evicted) past tokens.
    """
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    mask = k_pos[None, :] <= q_pos[:, None]  # [T, L]
    out = F.scaled_dot_product_attention(q.float()[None], k.float()[None], v.float()[None],
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].to(q.dtype)
