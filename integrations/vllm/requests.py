"""Per-request budgets: a request may carry its own page-selection budget through vLLM's sampling
params, falling back to the configured policy's, in tokens or in bytes:

    SamplingParams(..., extra_args={"kvkit_budget": 512})          # tokens per KV head per layer
    SamplingParams(..., extra_args={"kvkit_budget_bytes": 8 << 20})
    # OpenAI API: {"prompt": ..., "vllm_xargs": {"kvkit_budget": 512}}
    # (vLLM copies vllm_xargs into extra_args; its values must be flat: no nested objects)

`kvkit_budget_bytes` is what one decode step of the request may read of K and V in the layers
that select pages, all KV heads of all those layers together; it becomes tokens per KV head per
layer (rounded down). It applies to the layers whose selector picks pages (quest, lserve); dense and
streaming layers ignore it. A budget smaller than one block reads one block: the request's
newest. Under score eviction (h2o, a2sf: eviction.py) it is what the request keeps instead: tokens
per KV head per layer, or K and V bytes over all layers and KV heads; the sink and window blocks
are kept whatever the budget.

- `validate_extra_args` runs where vLLM checks sampling params (the API server, `LLM`), so a bad
  value is the client's error (HTTP 400 / an exception from `generate`), never the engine's.
- `publish_row_budgets` wraps the model runner's attention-metadata step: it lists the budget and
  the request id of each batch row (vLLM's rows are its input batch's requests, already
  reordered) for kvkit's metadata builder, which reads them with `row_budgets()` and
  `row_request_ids()` while that step runs.
"""

from __future__ import annotations

import functools
from typing import Any

BUDGET_KEY = "kvkit_budget"  # tokens per KV head per layer
BYTES_KEY = "kvkit_budget_bytes"  # K and V bytes per decode step, all selecting layers and heads
_rows: list[tuple[str, int] | None] | None = None  # budgets of the rows of the step being built
_ids: list[str] | None = None  # request ids of those rows


def validate_extra_args(extra: dict[str, Any] | None) -> None:
    """Raise ValueError when `extra` has a kvkit budget that is not an int >= 1, or both kinds."""
    if not extra:
        return
    given = [key for key in (BUDGET_KEY, BYTES_KEY) if key in extra]
    if len(given) == 2:
        raise ValueError(f"extra_args: give {BUDGET_KEY!r} (tokens) or {BYTES_KEY!r} (bytes), not both")
    for key in given:
        value = extra[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            unit = "tokens per KV head per layer" if key == BUDGET_KEY else "bytes of K and V per decode step"
            raise ValueError(f"extra_args[{key!r}] must be an int >= 1 ({unit} that page selection may "
                             f"read, or score eviction keep), got {value!r}")


def request_budget(sampling_params) -> tuple[str, int] | None:
    """`("tokens", n)` or `("bytes", n)`: the budget a request asked for; None: the policy's."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if BUDGET_KEY in extra:
        return "tokens", extra[BUDGET_KEY]
    if BYTES_KEY in extra:
        return "bytes", extra[BYTES_KEY]
    return None


def row_budgets() -> list[tuple[str, int] | None] | None:
    """Per batch row, the budget its request asked for (`request_budget`; None: the policy's);
    None outside a model-runner step or when no request asked."""
    return _rows


def row_request_ids() -> list[str] | None:
    """Per batch row, its request id (LServe keeps a request's choice across steps); None
    outside a model-runner step."""
    return _ids


def patch_validation() -> None:
    """Check kvkit's extra args wherever vLLM verifies sampling params. Idempotent."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    stock = SamplingParams._verify_extra_args
    if getattr(stock, "_kvkit", False):
        return

    @functools.wraps(stock)
    def _verify_extra_args(self) -> None:
        stock(self)
        try:
            validate_extra_args(self.extra_args)
        except ValueError as e:
            raise VLLMValidationError(str(e), parameter="extra_args") from e

    _verify_extra_args._kvkit = True  # type: ignore[attr-defined]
    SamplingParams._verify_extra_args = _verify_extra_args


def publish_row_budgets() -> None:
    """Wrap the model runner's `_build_attention_metadata` to publish the rows' budgets and
    request ids. Idempotent."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    stock = GPUModelRunner._build_attention_metadata
    if getattr(stock, "_kvkit", False):
        return

    @functools.wraps(stock)
    def _build_attention_metadata(self, num_tokens: int, num_reqs: int, *args, **kwargs):
        global _rows, _ids
        _ids = list(self.input_batch.req_ids[:num_reqs])
        budgets = [request_budget(getattr(self.requests.get(rid), "sampling_params", None)) for rid in _ids]
        _rows = budgets if any(b is not None for b in budgets) else None
        try:
            return stock(self, num_tokens, num_reqs, *args, **kwargs)
        finally:
            _rows = _ids = None

    _build_attention_metadata._kvkit = True  # type: ignore[attr-defined]
    GPUModelRunner._build_attention_metadata = _build_attention_metadata
