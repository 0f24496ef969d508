"""References in plain torch for the kernels of this folder: the definitions they are tested
against (`sparse_decode`'s reference is `kvkit.attention.ref.sparse_decode_ref`; it is not
imported here, since kvkit.kernels depends on torch and triton only).

Shapes: B seqs, Hq/Hkv query/kv heads, G = Hq // Hkv, P pages per list, S page_size,
D head_dim, N pages in the pool, T tokens, R low-rank rank, NS splits.
Softmax runs in float32; an empty selection gives out 0 and lse -inf.
"""

from __future__ import annotations

import math

import torch

from .layout import LowRank, QuantPages


# ---- shared ---------------------------------------------------------------------------------
def lse_merge_ref(o_part: torch.Tensor, lse_part: torch.Tensor, out_dtype: torch.dtype):
    """o_part `[R, NS, D]`, lse_part `[R, NS]` -> out `[R, D]` (out_dtype), lse `[R]`."""
    lse = torch.logsumexp(lse_part, -1)  # [R]
    w = torch.exp(lse_part - lse[:, None]).nan_to_num(0.0)  # all -inf -> 0
    return (w[..., None] * o_part).sum(1).to(out_dtype), lse


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float):
    """q `[B, Hq, D]`; k, v `[B, Hkv, L, D]` float32; valid `[B, Hkv, L]` -> out (q dtype), lse."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, D).float()
    scores = torch.einsum("bhgd,bhld->bhgl", qg, k) * scale  # [B, Hkv, G, L]
    scores = scores.masked_fill(~valid[:, :, None], -math.inf)
    lse = torch.logsumexp(scores, -1)  # [B, Hkv, G]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhgl,bhld->bhgd", probs, v)
    return out.reshape(B, Hq, -1).to(q.dtype), lse.reshape(B, Hq)


# ---- quantized pages --------------------------------------------------------------------------
def dequantize_pages(qp: QuantPages, pages: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 values of `pages` `[...]` (all pages when None): `[..., S, D]`."""
    codes = qp.codes if pages is None else qp.codes[pages]
    scale = qp.scale if pages is None else qp.scale[pages]
    zero = qp.zero if pages is None or qp.zero is None else qp.zero[pages]
    if qp.bits == 4:
        lo, hi = codes & 0xF, codes >> 4
        codes = torch.stack([lo, hi], -1).flatten(-2)  # [..., S, D], channel 2j low, 2j+1 high
    S, D = codes.shape[-2:]
    TG, CG = S // scale.shape[-2], D // scale.shape[-1]
    expand = lambda t: t.float().repeat_interleave(TG, -2).repeat_interleave(CG, -1)  # noqa: E731
    x = codes.float() * expand(scale)
    return x + expand(zero) if zero is not None else x


def quantize_pages(x: torch.Tensor, bits: int = 8, token_group: int = 1, channel_group: int | None = None,
                   asymmetric: bool | None = None, scale_dtype: torch.dtype = torch.float16) -> QuantPages:
    """Quantize `x` `[N, S, D]` into the QuantPages layout (for tests, benchmarks and codecs).

    bits=8 defaults to symmetric (like Int8Codec), bits=4 to asymmetric with a zero point
    (KIVI/GEAR). Groups: `token_group` slots x `channel_group` channels (None: all D) share a
    scale.
    """
    N, S, D = x.shape
    CG = channel_group or D
    asymmetric = (bits == 4) if asymmetric is None else asymmetric
    g = x.float().view(N, S // token_group, token_group, D // CG, CG)  # [N, S/TG, TG, D/CG, CG]
    qmax = (1 << bits) - 1
    if asymmetric:
        lo, hi = g.amin((2, 4), keepdim=True), g.amax((2, 4), keepdim=True)
        scale = ((hi - lo) / qmax).clamp(min=1e-8).to(scale_dtype).float()
        zero = lo.to(scale_dtype).float()
        codes = torch.round((g - zero) / scale).clamp(0, qmax)
        if bits == 8:
            codes = codes - 128  # signed storage: x = (c + 128) * s + z = c * s + (z + 128 s)
            zero = zero + 128 * scale
    else:
        half = (1 << (bits - 1)) - 1
        scale = (g.abs().amax((2, 4), keepdim=True) / half).clamp(min=1e-8).to(scale_dtype).float()
        zero = None
        codes = torch.round(g / scale).clamp(-half, half)
        if bits == 4:  # unsigned nibbles: store c + 8, zero = -8 * scale
            codes, zero = codes + 8, -8 * scale
    codes = codes.view(N, S, D)
    if bits == 8:
        codes = codes.to(torch.int8)
    else:
        c = codes.to(torch.uint8).view(N, S, D // 2, 2)
        codes = c[..., 0] | (c[..., 1] << 4)
    squeeze = lambda t: t.view(N, S // token_group, D // CG).to(scale_dtype).contiguous()  # noqa: E731
    return QuantPages(codes.contiguous(), squeeze(scale), None if zero is None else squeeze(zero), bits)


def lowrank_term(lr: LowRank, pages: torch.Tensor) -> torch.Tensor:
    """pages `[B, Hkv, P]` (>= 0) -> `a[page] @ b[bh].T`: `[B, Hkv, P, S, D]` float32."""
    return torch.einsum("bhpsr,bhdr->bhpsd", lr.a[pages].float(), lr.b.float())


def quant_decode_ref(q: torch.Tensor, k: QuantPages, v: QuantPages, page_table: torch.Tensor,
                     slot_valid: torch.Tensor | None = None, scale: float | None = None,
                     slot_mask: torch.Tensor | None = None, k_lowrank: LowRank | None = None,
                     v_lowrank: LowRank | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode over quantized pages: dequantize (float32), round to q's dtype, add the low-rank
    residual (float32), attend in float32. Arguments as `kvkit.kernels.quant_decode`."""
    B, Hq, D = q.shape
    Hkv, P = page_table.shape[1:]
    scale = scale if scale is not None else D ** -0.5
    pages = page_table.clamp(min=0).long()  # [B, Hkv, P]
    S = k.codes.shape[1]
    valid = (page_table >= 0)[..., None].expand(B, Hkv, P, S)
    if slot_valid is not None:
        valid = valid & slot_valid[pages]
    if slot_mask is not None:
        valid = valid & slot_mask
    kf = dequantize_pages(k, pages).to(q.dtype).float()  # [B, Hkv, P, S, D]
    vf = dequantize_pages(v, pages).to(q.dtype).float()
    if k_lowrank is not None:
        kf = kf + lowrank_term(k_lowrank, pages)
    if v_lowrank is not None:
        vf = vf + lowrank_term(v_lowrank, pages)
    flat = lambda t: t.reshape(B, Hkv, P * S, D)  # noqa: E731
    return _attend(q, flat(kf), flat(vf), valid.reshape(B, Hkv, P * S), scale)


# ---- page summaries -----------------------------------------------------------------------------
def update_key_bounds_ref(key_min: torch.Tensor, key_max: torch.Tensor, pages: torch.Tensor,
                          k: torch.Tensor) -> None:
    """In place, as `PagedKVStore.append` does: key_min[p] = min(key_min[p], k) per channel."""
    key_min.index_reduce_(0, pages, k.to(key_min.dtype), "amin")
    key_max.index_reduce_(0, pages, k.to(key_max.dtype), "amax")


# ---- block-sparse prefill (DuoAttention streaming heads) ------------------------------------
def streaming_mask(T: int, streaming: bool, sink: int, window: int, device=None) -> torch.Tensor:
    """`[T, T]` bool: causal, and for a streaming head only keys j < sink or i - j < window."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    mask = j <= i
    if streaming:
        mask &= (j < sink) | (i - j < window)
    return mask


def streaming_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, streaming: torch.Tensor,
                          sink: int, window: int, scale: float | None = None,
                          seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Causal prefill, dense or Λ-shaped per KV head.

    q `[B, Hq, T, D]`; k, v `[B, Hkv, T, D]`; streaming `[Hkv]` bool; seq_lens `[B]` (rows
    and keys past a sequence's length are padding; their output is 0). Returns `[B, Hq, T, D]`.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = scale if scale is not None else D ** -0.5
    out = torch.zeros_like(q)
    for b in range(B):
        L = T if seq_lens is None else int(seq_lens[b])
        for h in range(Hkv):
            mask = streaming_mask(L, bool(streaming[h]), sink, window, q.device)
            qh = q[b, h * G:(h + 1) * G, :L].float()
            s = qh @ k[b, h, :L].float().T * scale  # [G, L, L]
            s = s.masked_fill(~mask, -math.inf)
            out[b, h * G:(h + 1) * G, :L] = (torch.softmax(s, -1) @ v[b, h, :L].float()).to(q.dtype)
    return out
