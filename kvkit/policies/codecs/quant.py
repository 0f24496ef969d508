"""Integer K/V with per-token (or per-group) scales, dequantized on read.

Each token's key (and value) is split into groups of `group_size` channels (the whole head_dim
when None); each group stores int8 codes and one fp16 scale = max|x| / 127 (symmetric).
Bytes per token and head: D codes + 2 * D / group_size scale bytes, against 2 * D for bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvkit.policies.base import Codec, component

# Shapes: N pages, S page_size, D head_dim, g groups per token (D // group_size), n tokens.


class Int8Storage:
    """int8 codes `[N, S, D]` and fp16 scales `[N, S, g]` for K and for V."""

    def __init__(self, page_size: int, head_dim: int, group_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.group_size, self.dtype = group_size, dtype
        groups = head_dim // group_size
        self.k = torch.empty(0, page_size, head_dim, dtype=torch.int8, device=device)
        self.v = torch.empty_like(self.k)
        self.k_scale = torch.empty(0, page_size, groups, dtype=torch.float16, device=device)
        self.v_scale = torch.empty_like(self.k_scale)

    def grow(self, num_pages: int) -> None:
        extra = num_pages - self.k.shape[0]
        for name in ("k", "v", "k_scale", "v_scale"):
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, t.new_zeros(extra, *t.shape[1:])]))

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, d = x.shape
        g = x.float().view(n, d // self.group_size, self.group_size)  # [n, g, group]
        scale = (g.abs().amax(-1, keepdim=True) / 127.0).clamp(min=1e-8)
        codes = torch.round(g / scale).clamp(-127, 127).to(torch.int8)
        return codes.view(n, d), scale.squeeze(-1).to(torch.float16)

    def write(self, pages: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[pages, slots], self.k_scale[pages, slots] = self._quantize(k)
        self.v[pages, slots], self.v_scale[pages, slots] = self._quantize(v)

    def _dequantize(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        P, S, D = codes.shape
        g = codes.view(P, S, -1, self.group_size).float() * scale.float()[..., None]
        return g.view(P, S, D).to(self.dtype)

    def read(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self._dequantize(self.k[pages], self.k_scale[pages]),
                self._dequantize(self.v[pages], self.v_scale[pages]))

    def copy_page(self, src: int, dst: int) -> None:
        for t in self.tensors():
            t[dst] = t[src]

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.k_scale, self.v_scale]


@component("codec", "int8")
@dataclass(frozen=True)
class Int8Codec(Codec):
    """Symmetric int8 per token, one fp16 scale per `group_size` channels (None: per token).

    Error bound: each element is off by at most half a step, max|group| / 254.
    """

    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"Int8Codec.group_size must be None or an int >= 1, got {self.group_size!r}")

    def make_storage(self, page_size: int, head_dim: int, dtype: torch.dtype,
                     device: torch.device) -> Int8Storage:
        group = self.group_size or head_dim
        if head_dim % group:
            raise ValueError(f"Int8Codec.group_size={group} must divide head_dim={head_dim} "
                             f"(try one of {[g for g in (8, 16, 32, 64, 128) if head_dim % g == 0]})")
        return Int8Storage(page_size, head_dim, group, dtype, device)
