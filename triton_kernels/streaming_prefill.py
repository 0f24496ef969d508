"""`streaming_prefill`: causal prefill with dense and streaming (sinks + window) KV heads.

Shapes: B seqs, Hq/Hkv query/kv heads, T tokens, D head_dim. Reference:
`ref.streaming_prefill_ref`. A dense-only prefill may as well use SDPA or xformers; this
kernel's point is that streaming heads cost O(T * (sink + window)) instead of O(T^2).
"""

from __future__ import annotations

import torch

from ._common import check_device, dot_mode, pow2
from ._streaming_prefill import _streaming_prefill_kernel

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def streaming_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, streaming: torch.Tensor,
                      sink: int, window: int, scale: float | None = None,
                      seq_lens: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64
                      ) -> torch.Tensor:
    """Causal attention of T new tokens (positions 0..T-1) where each KV head is dense or Λ-shaped.

    q: `[B, Hq, T, D]`; k, v: `[B, Hkv, T, D]` (same dtype; last dim contiguous); streaming:
    `[Hkv]` bool (True: the head sees keys j < sink or i - window < j <= i only); seq_lens:
    optional `[B]` int (ragged batch: tokens past a length are padding, their output is 0).
    Returns `[B, Hq, T, D]` in q's dtype.

    Raises:
        ValueError/TypeError: shapes, dtypes, devices or arguments that do not fit.
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"kvkit.kernels.streaming_prefill: q must be [B, Hq, T, D], k and v [B, Hkv, T, D], "
                         f"got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"kvkit.kernels.streaming_prefill: k, v must be [B={B}, Hkv, T={T}, D={D}] with Hkv | "
                         f"Hq={Hq}, got {list(k.shape)}")
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"kvkit.kernels.streaming_prefill: q, k, v must share one of fp16/bf16/fp32, "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if streaming.shape != (Hkv,) or streaming.dtype != torch.bool:
        raise ValueError(f"kvkit.kernels.streaming_prefill: streaming must be bool [Hkv={Hkv}], "
                         f"got {streaming.dtype} {list(streaming.shape)}")
    if sink < 0 or window < 1:
        raise ValueError(f"kvkit.kernels.streaming_prefill: need sink >= 0 and window >= 1, got {sink}, {window}")
    if seq_lens is not None and seq_lens.shape != (B,):
        raise ValueError(f"kvkit.kernels.streaming_prefill: seq_lens must be [B={B}], got {list(seq_lens.shape)}")
    if D > 256:
        raise NotImplementedError(f"kvkit.kernels.streaming_prefill: head_dim={D} unsupported (<= 256); "
                                  "use backend='ref'")
    check_device(_streaming_prefill_kernel, "streaming_prefill", q, k, v, streaming, seq_lens)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = scale if scale is not None else D ** -0.5
    out = torch.zeros_like(q)
    if out.numel() == 0:
        return out
    lens = seq_lens.to(torch.int32).contiguous() if seq_lens is not None else q.new_empty(1, dtype=torch.int32)
    _streaming_prefill_kernel[(-(-T // block_m), B * Hq)](
        q, k, v, out, streaming.contiguous().view(torch.uint8), lens,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        T, sink, window, scale * 1.4426950408889634,
        HQ=Hq, G=Hq // Hkv, D=D, HAS_LENS=seq_lens is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=pow2(D),
        **dot_mode(_streaming_prefill_kernel, q.dtype),
    )
    return out
