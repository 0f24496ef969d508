"""Helpers shared by the kernels: jit building blocks and launcher utilities.

The Triton interpreter (TRITON_INTERPRET=1, how the tests run on CPU) gets bfloat16 wrong in
two ways (triton 3.9; numpy has no bfloat16): `tl.dot` on bfloat16 operands multiplies raw bits,
and float32 -> bfloat16 casts truncate instead of rounding to nearest even (the GPU rounds).
Launchers therefore pass `UPCAST=True, EMU_BF16=True` for bfloat16 under the interpreter:
values are rounded to bfloat16 by bit arithmetic (`round_to`) but kept in float32, and dots run
in float32, so the interpreter computes what the GPU path computes. float32 operands always use
`input_precision="ieee"` (no silent TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def interpreted(kernel) -> bool:
    """True when `kernel` was built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def dot_mode(kernel, dtype: torch.dtype) -> dict[str, bool]:
    """The UPCAST / EMU_BF16 constexprs for a compute dtype (see the module docstring)."""
    emulate = dtype == torch.bfloat16 and interpreted(kernel)
    return {"UPCAST": dtype == torch.float32 or emulate, "EMU_BF16": emulate}


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def check_device(kernel, name: str, *tensors: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; the interpreter needs CPU ones."""
    want = "cpu" if interpreted(kernel) else "cuda"
    for t in tensors:
        if t is not None and t.device.type != want:
            raise ValueError(f"kvkit.kernels.{name}: tensors must be on {want} "
                             f"({'TRITON_INTERPRET=1' if want == 'cpu' else 'compiled Triton'}), "
                             f"got one on {t.device}; use backend='ref' elsewhere")


def list_lengths(page_table: torch.Tensor) -> torch.Tensor:
    """Per row of `[..., P]`, one past the last valid (>= 0) entry: `[...]` int32."""
    P = page_table.shape[-1]
    idx = torch.arange(1, P + 1, device=page_table.device, dtype=torch.int32)
    return torch.where(page_table >= 0, idx, 0).amax(-1).to(torch.int32) if P else \
        torch.zeros(page_table.shape[:-1], dtype=torch.int32, device=page_table.device)


@triton.jit
def mma(a, b, UPCAST: tl.constexpr):
    """a @ b accumulated in float32 (see the module docstring for UPCAST)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, out_dtype=tl.float32)


@triton.jit
def round_to(x, dtype: tl.constexpr, EMU_BF16: tl.constexpr):
    """x (float32) rounded to `dtype`; under EMU_BF16 the bfloat16 value stays in float32."""
    if EMU_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype)
