"""The packed page layouts the quantized kernels read (plain torch, no triton).

Shapes: N pages in the pool, S page_size, D head_dim, TG tokens per scale group, CG channels
per scale group, R low-rank rank, B seqs, Hkv kv heads.

A quantized K (or V) page pool is a `QuantPages(codes, scale, zero, bits)`:

- bits=8: `codes` int8 `[N, S, D]`, signed, one code per channel.
- bits=4: `codes` uint8 `[N, S, D // 2]`, two codes per byte: channel 2j in the low nibble
  (bits 0-3), channel 2j+1 in the high nibble (bits 4-7), each unsigned 0..15.
- `scale`: fp16/bf16/fp32 `[N, S // TG, D // CG]`; the group sizes are read off its shape.
  `TG = 1` is per-token grouping (KIVI's values, kvkit's Int8Codec: `[N, S, D // group]`);
  `S // TG = 1, CG = 1` is one scale per channel per page (KIVI's keys, grouped along tokens).
- `zero`: optional, same shape and strides as `scale` (KIVI/GEAR asymmetric min offset).

The value of channel d of slot s of page n is

    x = code[n, s, d] * scale[n, s // TG, d // CG] + (zero[n, s // TG, d // CG] or 0)

computed in float32 and rounded to the compute dtype (q's dtype) before the dot products, as
`kvkit.policies.codecs.quant.Int8Storage.read` does. kvkit's `Int8Codec` storage is exactly
`QuantPages(storage.k, storage.k_scale, None, 8)`.

GEAR's low-rank residual is a `LowRank(a, b)`: `a` `[N, S, R]` per-slot coefficients stored with
the pages, `b` `[B, Hkv, D, R]` one basis per (sequence, KV head); it adds `a[n, s] @ b[bh].T`
(float32) to the dequantized key or value. Decode never materialises it: scores get
`(q @ b) @ a.T`, outputs get `(p @ a) @ b.T`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class QuantPages(NamedTuple):
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    bits: int = 8

    def groups(self) -> tuple[int, int]:
        """(TG, CG): tokens and channels per scale group."""
        N, S = self.codes.shape[:2]
        D = self.head_dim
        return S // self.scale.shape[1], D // self.scale.shape[2]

    @property
    def head_dim(self) -> int:
        return self.codes.shape[2] * (2 if self.bits == 4 else 1)


class LowRank(NamedTuple):
    a: torch.Tensor  # [N, S, R]
    b: torch.Tensor  # [B, Hkv, D, R]


def check_quant_pages(name: str, qp: QuantPages, N: int | None = None, S: int | None = None,
                      D: int | None = None) -> tuple[int, int, int, int, int]:
    """Validate a QuantPages; returns N, S, D, TG, CG. Raises ValueError/TypeError."""
    if qp.bits not in (4, 8):
        raise NotImplementedError(f"{name}: bits={qp.bits} unsupported (4, 8)")
    want_dtype = torch.int8 if qp.bits == 8 else torch.uint8
    if qp.codes.dtype != want_dtype or qp.codes.dim() != 3:
        raise TypeError(f"{name}.codes must be {want_dtype} [N, S, D{' // 2' if qp.bits == 4 else ''}] "
                        f"for bits={qp.bits}, got {qp.codes.dtype} {list(qp.codes.shape)}")
    n, s = qp.codes.shape[:2]
    d = qp.head_dim
    for what, got, want in (("pages", n, N), ("page_size", s, S), ("head_dim", d, D)):
        if want is not None and got != want:
            raise ValueError(f"{name}: {what} is {got}, expected {want}")
    sc = qp.scale
    if (sc.dim() != 3 or sc.shape[0] != n or 0 in sc.shape[1:] or s % sc.shape[1] or d % sc.shape[2]
            or not sc.dtype.is_floating_point):
        raise ValueError(f"{name}.scale must be floating [N, S // TG, D // CG] with TG | S={s} and CG | D={d}, "
                         f"got {sc.dtype} {list(sc.shape)}")
    if qp.zero is not None and (qp.zero.shape != sc.shape or qp.zero.stride() != sc.stride()):
        raise ValueError(f"{name}.zero must have the shape and strides of scale {list(sc.shape)}, "
                         f"got {list(qp.zero.shape)} strides {qp.zero.stride()}")
    if qp.codes.stride(-1) != 1:
        raise ValueError(f"{name}.codes must have a contiguous last dim, got strides {qp.codes.stride()}")
    TG, CG = qp.groups()
    return n, s, d, TG, CG
