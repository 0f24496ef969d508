"""kvkit.kernels: Triton kernels over the paged KV store (this folder installs as `kvkit.kernels`,
never as a top-level `triton_kernels`, which vLLM takes for OpenAI's package).

Every kernel comes in threes: `_x_kernel` (the jit, in `_x.py`), `x` (the launcher: checks, grid,
launch, in `x.py`) and `x_ref` (plain torch, the definition the kernel is tested against; for
`sparse_decode` it is `kvkit.attention.ref.sparse_decode_ref`, for `page_scores`
`kvkit.scoring.quest_scores`, the others are in `ref.py`).
These modules import only torch and triton, so they can be tested alone; set
`TRITON_INTERPRET=1` before the first import to run them on CPU tensors (slow, exact).

- `sparse_decode`: decode over the pages each (sequence, KV head) selected; GQA groups share one
  read of each page; page lists split across programs (flash-decoding) and merged by `lse_merge`.
- `quant_decode`: the same over int8 / packed-int4 pages with group scales (+ zero points),
  dequantized in registers, plus GEAR's low-rank residual as a small separate product.
- `page_scores`: Quest's per-page upper bound of q·k from key min/max, aggregated over the GQA
  group, sinks/recent pages forced in (its definition: `kvkit.scoring.quest_scores`).
- `update_key_bounds`: the per-page key min/max update on append.
- `streaming_prefill`: causal prefill where each KV head is dense or Λ-shaped (sinks + local
  window), skipping masked key blocks entirely (DuoAttention / LServe block-sparse prefill).
"""

from .key_bounds import update_key_bounds
from .layout import LowRank, QuantPages
from .lse_merge import lse_merge
from .page_scores import page_scores
from .quant_decode import quant_decode
from .sparse_decode import sparse_decode
from .streaming_prefill import streaming_prefill

__all__ = ["sparse_decode", "quant_decode", "lse_merge", "page_scores",
           "update_key_bounds", "streaming_prefill", "QuantPages", "LowRank"]
