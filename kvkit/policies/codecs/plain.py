"""K and V stored as plain floating tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvkit.policies.roles import Codec, component
from kvkit.store import DenseStorage

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@component("codec", "plain")
@dataclass(frozen=True)
class PlainCodec(Codec):
    """Store K/V in `dtype` ("bf16", "fp16", "fp32"), or as the model gives them (None)."""

    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"PlainCodec.dtype must be one of {sorted(DTYPES)} or None, got {self.dtype!r}")

    def make_storage(self, page_size: int, head_dim: int, dtype: torch.dtype,
                     device: torch.device) -> DenseStorage:
        return DenseStorage(page_size, head_dim, DTYPES[self.dtype] if self.dtype else dtype, device)
