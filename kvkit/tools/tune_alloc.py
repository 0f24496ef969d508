"""Choose a codec per layer and a window per KV head under a byte budget: a multiple-choice knapsack.

Each layer picks one codec c (a codec applies to a whole layer's pool) and each of its KV heads
a window w (None: keep every token). Its loss is `sum_h loss[l, c, w_h, h]` and its bytes
`sum_h cost[c, w_h]`. The total loss is minimised subject to total bytes <= budget
by Lagrangian relaxation: for a price lam, every layer independently minimises loss + lam * bytes
(exactly: given c the heads are independent), and lam is bisected to the smallest price whose
choice fits. That solves the problem exactly on the convex hull of each layer's choices; a greedy
pass then spends what the price left unused on the single changes with the best loss saved per
byte added that still fit. Pure tensor arithmetic on measured inputs: no model here.

Shapes: L layers, C codecs, W windows, H KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Allocation:
    """The chosen codec index per layer and window index per (layer, head), with totals."""

    codec: tuple[int, ...]                   # [L] index into the codecs
    window: tuple[tuple[int, ...], ...]      # [L][H] index into the windows
    loss: float
    nbytes: float


def _layer_best(loss: torch.Tensor, cost: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the codec and per-head windows minimising loss + lam * bytes.

    loss: [L, C, W, H]; cost: [C, W] bytes of one head. Returns codec [L], windows [L, H].
    """
    obj = loss + lam * cost[None, :, :, None]  # [L, C, W, H]
    best_w = obj.argmin(2)  # [L, C, H]
    per_codec = obj.gather(2, best_w[:, :, None]).squeeze(2).sum(-1)  # [L, C]
    codec = per_codec.argmin(1)  # [L]
    return codec, best_w[torch.arange(loss.shape[0]), codec]  # [L], [L, H]


def _totals(loss: torch.Tensor, cost: torch.Tensor, codec: torch.Tensor, window: torch.Tensor) -> tuple[float, float]:
    L, _, _, H = loss.shape
    li = torch.arange(L)[:, None].expand(L, H)
    hi = torch.arange(H)[None].expand(L, H)
    ci = codec[:, None].expand(L, H)
    return float(loss[li, ci, window, hi].sum()), float(cost[ci, window].sum())


def allocate(loss: torch.Tensor, cost: torch.Tensor, budget: float, iters: int = 60) -> Allocation:
    """The least-loss choice whose bytes fit `budget`.

    loss: `[L, C, W, H]` measured loss of each (layer, codec, window, head), >= 0.
    cost: `[C, W]` bytes one KV head costs with codec c and window w.

    Raises:
        ValueError: shapes that disagree, or a budget below the cheapest choice of every part.
    """
    if loss.dim() != 4 or cost.shape != loss.shape[1:3]:
        raise ValueError(f"loss must be [L, C, W, H] and cost [C, W]; got {list(loss.shape)} and {list(cost.shape)}")
    loss, cost = loss.double().clamp(min=0), cost.double()
    L, _, _, H = loss.shape
    cheapest = float(cost.min()) * L * H
    if budget < cheapest * (1 - 1e-12):
        raise ValueError(f"a budget of {budget:.0f} bytes is below the cheapest choice ({cheapest:.0f} bytes: "
                         "every head at the cheapest codec and shortest window); raise the budget")
    codec, window = _layer_best(loss, cost, 0.0)
    if _totals(loss, cost, codec, window)[1] > budget:
        lo, hi = 0.0, 1.0
        while _totals(loss, cost, *_layer_best(loss, cost, hi))[1] > budget:
            hi *= 4
            if hi > 1e30:  # only ties at the cheapest cost are left: take them
                break
        for _ in range(iters):
            mid = (lo + hi) / 2
            if _totals(loss, cost, *_layer_best(loss, cost, mid))[1] > budget:
                lo = mid
            else:
                hi = mid
        codec, window = _layer_best(loss, cost, hi)
        codec, window = _spend_rest(loss, cost, codec, window, budget)
    total_loss, total_bytes = _totals(loss, cost, codec, window)
    return Allocation(codec=tuple(int(c) for c in codec), window=tuple(tuple(int(w) for w in row) for row in window),
                      loss=total_loss, nbytes=total_bytes)


def _spend_rest(loss: torch.Tensor, cost: torch.Tensor, codec: torch.Tensor, window: torch.Tensor,
                budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy: take the single head-window change (codec kept) with the most loss saved per byte
    added while it fits, until none does."""
    L, _, W, H = loss.shape
    window = window.clone()
    _, used = _totals(loss, cost, codec, window)
    while True:
        c = codec[:, None, None].expand(L, W, H)
        here = loss.gather(1, c[:, None]).squeeze(1)  # [L, W, H] loss of each window under the layer's codec
        bytes_ = cost[codec][:, :, None].expand(L, W, H)  # [L, W, H]
        now_loss = here.gather(1, window[:, None]).squeeze(1)  # [L, H]
        now_bytes = bytes_.gather(1, window[:, None]).squeeze(1)
        gain = now_loss[:, None] - here  # [L, W, H]
        extra = bytes_ - now_bytes[:, None]
        ok = (gain > 0) & (extra > 0) & (extra <= budget - used)
        if not ok.any():
            return codec, window
        rate = torch.where(ok, gain / extra.clamp(min=1e-9), torch.full_like(gain, -1.0))
        flat = int(rate.argmax())
        li, wi, hi = flat // (W * H), (flat // H) % W, flat % H
        used += float(extra[li, wi, hi])
        window[li, hi] = wi
