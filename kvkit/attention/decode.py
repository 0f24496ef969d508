"""`decode(q, store, seqs, layer, selection)`: one decode step over whatever the policy selected.

It reads only the selected pages through the layer's storage (so quantized or low-rank pages
are decoded for those pages only), masks empty slots, and runs the reference. Faster paths plug
in here: `backend` (or the environment variable KVKIT_ATTENTION_BACKEND) is "auto", "ref" or
"triton". Under "auto", CUDA tensors run the Triton kernels of `kvkit.kernels`, and plain
(DenseStorage) pages on the CPU run `kvkit.attention.fast.sparse_decode_fast` (attention in the
pages' dtype: the reference's float32 upcast of every gathered key costs more than the
attention); everything else, and `return_stats`, the reference. The kernels read plain and int8
(Int8Codec) pages in place; what they do not cover raises under "triton".
`kvkit.kernels` is imported only when a kernel runs, so TRITON_INTERPRET set later still works
(a kernel's mode is fixed when it is first imported).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from kvkit.attention import fast as fast_path
from kvkit.attention.ref import attend_pages
from kvkit.stats import AttentionStats
from kvkit.store import DenseStorage, PagedKVStore, Selection


def decode(q: torch.Tensor, store: PagedKVStore, seqs: Sequence[int], layer: int,
           selection: Selection, scale: float | None = None, return_stats: bool = False,
           backend: str | None = None) -> tuple[torch.Tensor, AttentionStats | None]:
    """Attention of one new query per sequence over the selected pages of `layer`.

    q: `[B, Hq, D]`; selection.pages: `[B, Hkv, P]`. Returns out `[B, Hq, D]` and, when
    `return_stats`, the attention each read slot received (for evictors).

    Raises:
        ValueError: when q or the selection do not match the store, or backend is unknown.
        NotImplementedError: backend="triton" for what the kernels do not cover.
    """
    B, Hq, D = _check(q, store, seqs, selection)
    scale = scale if scale is not None else D ** -0.5
    backend = backend or os.environ.get("KVKIT_ATTENTION_BACKEND") or "auto"
    if backend not in ("auto", "ref", "triton"):
        raise ValueError(f"backend must be 'auto', 'ref' or 'triton' (or KVKIT_ATTENTION_BACKEND), got {backend!r}")
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        out = _decode_triton(q, store, layer, selection, scale, return_stats, forced=backend == "triton")
        if out is not None:
            return out, None
    pages = selection.pages
    st = store.storage(layer)
    fast = backend == "auto" and not return_stats and not q.is_cuda and type(st) is DenseStorage
    if fast and selection.lengths is not None and selection.slot_mask is None:  # no per-slot positions needed
        return fast_path.sparse_decode_fast(q, st.k, st.v, pages, scale=scale, lengths=selection.lengths,
                                             run=selection.run), None
    P = pages.shape[-1]
    flat = pages.clamp(min=0).reshape(-1)
    shape = (B, store.num_kv_heads, P, store.page_size, D)
    valid = (store.slot_positions(layer).index_select(0, flat) >= 0).view(shape[:-1])  # the selected pages' slots only
    if selection.slot_mask is not None:
        valid = valid & selection.slot_mask
    if fast:
        return fast_path.sparse_decode_fast(q, st.k, st.v, pages, scale=scale, slot_mask=valid), None
    valid = valid & (pages >= 0)[..., None]
    k, v = st.read(flat)  # [B*Hkv*P, S, D]
    if return_stats:
        out, _, probs = attend_pages(q, k.view(shape), v.view(shape), valid, scale, return_probs=True)
        return out, AttentionStats(pages, probs)
    out, _ = attend_pages(q, k.view(shape), v.view(shape), valid, scale)
    return out, None


def decode_in_place(q: torch.Tensor, store: PagedKVStore, seqs: Sequence[int], layer: int,
                    scale: float | None = None) -> torch.Tensor | None:
    """`decode` of the dense selection (`store.read_all`) when it is one strided view of a plain
    pool on the CPU, every row reading its first n tokens: the usual dense decode step, with
    none of the general path's per-layer checks and branches (a decode step per layer of every
    model runs here, so each Python operation counts). Returns out `[B, Hq, D]`, or None when the
    step is not that case (then `decode` applies) or KVKIT_ATTENTION_BACKEND asks for another path."""
    if q.is_cuda or (os.environ.get("KVKIT_ATTENTION_BACKEND") or "auto") != "auto":  # as `decode` reads it
        return None
    st = store.storage(layer)
    selection = store.read_all(seqs, layer)
    n = selection.uniform_length
    if type(st) is not DenseStorage or selection.run is None or n is None or selection.run[2] * store.page_size < n:
        return None
    _check(q, store, seqs, selection)
    k, v = fast_path.run_views(st.k, st.v, selection.run, len(seqs), store.num_kv_heads, n)
    return fast_path.attend(q, k, v, None, scale if scale is not None else store.head_dim ** -0.5)


def _decode_triton(q: torch.Tensor, store: PagedKVStore, layer: int, selection: Selection, scale: float,
                   return_stats: bool, forced: bool) -> torch.Tensor | None:
    """The Triton kernels over the pages in place; None when they do not apply (and not forced)."""
    st = store.storage(layer)
    k, v = getattr(st, "k", None), getattr(st, "v", None)
    dense = torch.is_tensor(k) and k.dtype == q.dtype and not hasattr(st, "k_scale")
    int8 = torch.is_tensor(k) and k.dtype == torch.int8 and torch.is_tensor(getattr(st, "k_scale", None))
    if return_stats or not (dense or int8):
        if forced:
            what = "return_stats" if return_stats else f"{type(st).__name__} pages with q in {q.dtype}"
            raise NotImplementedError(f"kvkit.kernels: no Triton decode for {what}; use backend='ref'")
        return None
    from kvkit import kernels  # lazy: see the module docstring
    valid = store.slot_positions(layer) >= 0
    if dense:
        out, _ = kernels.sparse_decode(q, k, v, selection.pages, valid, scale, selection.slot_mask)
    else:
        out, _ = kernels.quant_decode(q, kernels.QuantPages(k, st.k_scale), kernels.QuantPages(v, st.v_scale),
                                      selection.pages, valid, scale, selection.slot_mask)
    return out


def _check(q: torch.Tensor, store: PagedKVStore, seqs: Sequence[int], selection: Selection):
    if q.dim() != 3 or q.shape[0] != len(seqs) or q.shape[-1] != store.head_dim:
        raise ValueError(f"q must be [num_seqs, num_qo_heads, head_dim] = [{len(seqs)}, Hq, {store.head_dim}], "
                         f"got {list(q.shape)}")
    if q.shape[1] % store.num_kv_heads:
        raise ValueError(f"num_qo_heads={q.shape[1]} must be a multiple of num_kv_heads={store.num_kv_heads}")
    want = (len(seqs), store.num_kv_heads)
    if selection.pages.dim() != 3 or tuple(selection.pages.shape[:2]) != want:
        raise ValueError(f"selection.pages must be [num_seqs, num_kv_heads, P] = [{want[0]}, {want[1]}, P], "
                         f"got {list(selection.pages.shape)}")
    return q.shape
