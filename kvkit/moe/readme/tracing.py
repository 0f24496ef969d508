"""Routing traces from the Read-ME model on real text, in kvkit's trace format
(``kvkit.moe.trace``): the experts each token really used per layer, the request it belongs to,
and the pre-gating router's predictions, which exist before the token's backbone runs.

Tokens of several requests are ordered as a batched decode would see them (``interleave``:
token 0 of every request, then token 1, ...; finished requests drop out) or one request after
another (``sequential``). Routing is computed per request in one causal pass, which gives the
same routing as token-by-token decoding.

Shapes: R requests, T_r tokens of request r, L layers, k top-k, k' predicted per layer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from kvkit.moe.readme.model import ReadME
from kvkit.moe.trace import Trace

logger = logging.getLogger(__name__)

ORDERS = ("interleave", "sequential")


def arrival_order(lengths: Sequence[int], order: str = "interleave") -> list[tuple[int, int]]:
    """(request, position) pairs in arrival order."""
    if order == "sequential":
        return [(r, t) for r, n in enumerate(lengths) for t in range(n)]
    if order == "interleave":
        return [(r, t) for t in range(max(lengths, default=0))
                for r, n in enumerate(lengths) if t < n]
    raise ValueError(f"unknown order {order!r}; use one of {ORDERS}")


@torch.no_grad()
def record_trace(moe: ReadME, requests: Sequence[torch.Tensor], router: str = "pregate",
                 top_k: int | None = None, predict_k: int | None = None,
                 order: str = "interleave", lookahead: int = 0, model_name: str = "smollm2",
                 expert_dtype_bytes: int = 2, extra_meta: dict | None = None) -> Trace:
    """Run each request (1-D token ids) through ``moe`` with ``router`` and record a Trace.

    ``predicted`` holds the pre-gating router's top-``predict_k`` experts (default top-k) for
    every layer, known at the start of the token (``lookahead`` tokens earlier; unit "tokens").
    With ``router="pregate"`` and ``predict_k == top_k`` the predictions are the routing itself.

    Raises:
        ValueError: no requests, an empty request, or bad top-k / predict_k / order.
    """
    if not requests or any(r.numel() == 0 for r in requests):
        raise ValueError("record_trace needs at least one non-empty request")
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; use one of {ORDERS}")
    e = moe.config.num_experts
    k = top_k or moe.config.top_k
    pk = predict_k or k
    if not 1 <= pk <= e:
        raise ValueError(f"predict_k must be in [1, {e}], got {pk}")
    moe.set_router(router, k)
    per_req_experts, per_req_pred = [], []
    for mlp in moe.mlps:
        mlp.record = True
    try:
        for ids in requests:
            ids = ids.reshape(1, -1)
            moe.model.model(input_ids=ids)  # the backbone routes every layer
            per_req_experts.append(torch.stack([m.last_routing for m in moe.mlps], 1))  # [T,L,k]
            per_req_pred.append(moe.predict(ids, pk)[0])  # [T, L, k']
    finally:
        for mlp in moe.mlps:
            mlp.record, mlp.last_routing = False, None
    arrive = arrival_order([int(r.numel()) for r in requests], order)
    experts = np.stack([per_req_experts[r][t].numpy() for r, t in arrive]).astype(np.int64)
    predicted = np.stack([per_req_pred[r][t].numpy() for r, t in arrive]).astype(np.int64)
    request = np.array([r for r, _ in arrive], dtype=np.int64)
    cfg = moe.model.config
    m = moe.config.check(cfg.intermediate_size)
    meta = {"num_experts": e, "top_k": k, "model": model_name,
            "expert_bytes": 3 * m * cfg.hidden_size * expert_dtype_bytes,
            "shared_bytes": 3 * moe.config.shared_neurons * cfg.hidden_size * expert_dtype_bytes,
            "router": router, "predict_k": pk, "order": order,
            "source": "kvkit.moe.readme", **(extra_meta or {})}
    return Trace(experts=experts, request=request, predicted=predicted, lookahead=lookahead,
                 meta=meta, lookahead_unit="tokens")
