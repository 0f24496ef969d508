"""What each compression choice costs, measured: loss on calibration text and bytes in a real store.

One dense forward per calibration sequence captures every layer's post-RoPE keys and values,
the queries of the last `scored` positions, and the residual stream entering each layer. Then,
per layer, without another forward:

- each **codec** round-trips the layer's K/V through a real `PagedKVStore` of that codec (what
  decoding would read back: full pages compressed, the open page and a codec's recent window
  as staged; the window is where it stands after the last token, so earlier scored queries see
  fewer exact keys behind them than they would at their own decode step);
- each **window** masks, for every scored query, the keys a streaming head would have evicted
  (it keeps the first `sink` positions and the last `window` before the query);
- the loss of a (layer, KV head, codec, window) choice is the energy of the change it makes to
  the residual stream, `|| W_o[:, head] (out - out_dense) ||^2`, summed over scored positions and
  divided by the energy of the residual stream entering the layer there. It is a first-order,
  per-part sensitivity: the allocator adds it over parts (interactions are not measured).
- `layer_gains` turns that unit into nats: one forward per layer with all its heads streaming
  measures the end-to-end KL from dense, divided by the residual-energy loss of the same change
  (layers differ by two orders of magnitude in how much of a change reaches the logits).

Bytes come from real allocations: a one-layer store of each (codec, window) run through a
prefill and decode steps as `KVKitCache` runs them gives what a KV head costs; a bf16 dense store
of the model's shape gives the reference.

Limits: prefill attention is dense in kvkit (only decode reads what eviction kept), and the
scored queries are teacher-forced positions at the end of each sequence, so what is measured is
the decode phase; windows longer than the calibration sequence all measure as lossless.

Shapes: L layers, Hq/Hkv query/KV heads, G = Hq // Hkv, T tokens, N scored positions, D head_dim,
C codecs, W windows (None, full, first), E hidden size.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvkit.policies.roles import Codec
from kvkit.store import PagedKVStore

ATTN_NAME = "kvkit_tune_capture"
_local = threading.local()


@dataclass
class LayerCapture:
    """One layer of one calibration sequence (float32, batch 1)."""

    q: torch.Tensor       # [Hq, N, D] queries of the scored positions
    k: torch.Tensor       # [Hkv, T, D]
    v: torch.Tensor       # [Hkv, T, D]
    scaling: float
    resid: torch.Tensor   # [] energy of the residual stream entering the layer at the scored positions


def _capture_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any):
    """transformers attention function: SDPA, keeping this layer's q tail, k and v."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    perturb = getattr(_local, "perturb", None)
    if perturb is not None and perturb[0] == module.layer_idx:
        keep, scale = perturb[1], scaling if scaling is not None else query.shape[-1] ** -0.5
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    sink = getattr(_local, "sink", None)
    if sink is not None:
        n = _local.scored
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        sink[module.layer_idx] = (query[0, :, -n:].float().clone(), key[0].float().clone(),
                                  value[0].float().clone(), float(scale))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def _register() -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _capture_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


@contextlib.contextmanager
def _capturing(model: Any, scored: int) -> Iterator[dict[int, tuple]]:
    _register()
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    _local.sink, _local.scored = {}, scored
    try:
        yield _local.sink
    finally:
        _local.sink = None
        model.set_attn_implementation(before)


@torch.inference_mode()
def capture(model: Any, ids: torch.Tensor, scored: int) -> list[LayerCapture]:
    """One dense forward of `ids` `[1, T]`; every layer's K/V and the last `scored` queries.

    Raises:
        ValueError: `scored` not in [1, T).
    """
    T = ids.shape[1]
    if not 1 <= scored < T:
        raise ValueError(f"scored positions must be in [1, {T}) for a {T}-token sequence, got {scored}")
    with _capturing(model, scored) as sink:
        out = model(ids, output_hidden_states=True, use_cache=False)
        got = dict(sink)
    hidden = out.hidden_states  # [L + 1] x [1, T, E]: the input of each layer, then the output
    layers = []
    for i in range(len(got)):
        q, k, v, scale = got[i]
        resid = hidden[i][0, -scored:].float().pow(2).sum()
        layers.append(LayerCapture(q=q, k=k, v=v, scaling=scale, resid=resid))
    return layers


def streaming_mask(T: int, scored: int, sink: int, window: int) -> torch.Tensor:
    """`[T, T]` bool: causal everywhere, and for the last `scored` queries only the keys a
    streaming head keeps (`window_masks`): what a layer reads when all its heads stream."""
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    keep[T - scored:] = window_masks(T, scored, sink, [window])[0]
    return keep


@torch.inference_mode()
def layer_gains(model: Any, ids: torch.Tensor, scored: int, sink: int, window: int,
                progress: bool = True) -> torch.Tensor:
    """`[L]` nats of end-to-end KL per unit of the residual-energy loss `layer_losses` measures.

    For each layer, every head of that layer alone streams (`sink`, `window`) at the last `scored`
    positions of `ids` `[1, T]`; the KL from dense of the next-token distributions there, summed
    over positions, is divided by the loss `layer_losses` gives the same change. One forward per
    layer plus one dense: the only place the tuner looks past a layer's own output.
    """
    from kvkit.policies.codecs.plain import PlainCodec

    T = ids.shape[1]
    caps = capture(model, ids, scored)
    dense = model(ids, use_cache=False).logits[0, -scored:].float().log_softmax(-1)  # [N, V]
    layers = model.model.layers
    keep = streaming_mask(T, scored, sink, window)
    gains = torch.empty(len(layers))
    before = model.config._attn_implementation
    _register()
    model.set_attn_implementation(ATTN_NAME)
    try:
        for i in tqdm(range(len(layers)), desc="tune: layer gains", disable=not progress):
            _local.perturb = (i, keep)
            logp = model(ids, use_cache=False).logits[0, -scored:].float().log_softmax(-1)
            kl = float((dense.exp() * (dense - logp)).sum())
            proxy = float(layer_losses(caps[i], layers[i].self_attn.o_proj.weight, [PlainCodec("fp32")],
                                       [None, window], sink, page_size=16)[0, 1].sum())
            gains[i] = kl / max(proxy, 1e-12)
    finally:
        _local.perturb = None
        model.set_attn_implementation(before)
    return gains


def roundtrip(codec: Codec, k: torch.Tensor, v: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V `[Hkv, T, D]` as a store of `codec` gives them back after appending them all."""
    H, T, D = k.shape
    store = PagedKVStore(1, H, D, page_size=page_size, dtype=torch.float32, page_format=[codec])
    seq = store.add_sequence()
    store.append(seq, 0, k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())  # [T, H, D]
    ks, vs = zip(*(store.read(seq, 0, h)[1:] for h in range(H)))
    return torch.stack(ks).float(), torch.stack(vs).float()  # [H, T, D]


def window_masks(T: int, scored: int, sink: int, windows: Sequence[int | None]) -> torch.Tensor:
    """`[W, N, T]` bool: the keys each scored query reads with each window (None: all before it).

    A streaming head evicts down to `sink` first and `window` last tokens after each step, so the
    query at position p reads positions < sink and >= p - window (and none after p).
    """
    pos = torch.arange(T)
    p = torch.arange(T - scored, T)[:, None]  # [N, 1]
    causal = pos[None] <= p  # [N, T]
    masks = []
    for w in windows:
        masks.append(causal if w is None else causal & ((pos[None] < sink) | (pos[None] >= p - w)))
    return torch.stack(masks)


@torch.inference_mode()
def layer_losses(cap: LayerCapture, o_proj: torch.Tensor, codecs: Sequence[Codec], windows: Sequence[int | None],
                 sink: int, page_size: int) -> torch.Tensor:
    """Loss of every (codec, window, KV head) on one layer: `[C, W, Hkv]`, relative residual energy.

    o_proj: the layer's output projection weight `[E, Hq * D]`.
    """
    Hq, N, D = cap.q.shape
    Hkv, T, _ = cap.k.shape
    G = Hq // Hkv
    masks = window_masks(T, N, sink, windows)  # [W, N, T]
    qg = cap.q.view(Hkv, G, N, D)

    def attend(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # -> [W, Hkv, G, N, D]
        logits = torch.einsum("hgnd,htd->hgnt", qg, k) * cap.scaling  # [Hkv, G, N, T]
        logits = logits[None].masked_fill(~masks[:, None, None], float("-inf"))  # [W, Hkv, G, N, T]
        return torch.einsum("whgnt,htd->whgnd", logits.softmax(-1), v)

    ref = attend(cap.k, cap.v)[0]  # [Hkv, G, N, D]: windows[0] must be None (all)
    w_o = o_proj.float().view(o_proj.shape[0], Hkv, G * D)  # [E, Hkv, G*D]
    out = torch.empty(len(codecs), len(windows), Hkv)
    for c, codec in enumerate(codecs):
        k, v = roundtrip(codec, cap.k, cap.v, page_size)
        delta = attend(k, v) - ref  # [W, Hkv, G, N, D]
        delta = delta.permute(0, 1, 3, 2, 4).reshape(len(windows), Hkv, N, G * D)
        moved = torch.einsum("whnc,ehc->whne", delta, w_o)  # [W, Hkv, N, E]
        out[c] = moved.pow(2).sum((-1, -2)) / cap.resid
    return out


@torch.inference_mode()
def sensitivities(model: Any, sequences: Sequence[tuple[torch.Tensor, int, float]], codecs: Sequence[Codec],
                  windows: Sequence[int | None], sink: int, page_size: int, progress: bool = True) -> torch.Tensor:
    """Weighted loss of every choice: `[L, C, W, Hkv]`, summed over the calibration sequences.

    sequences: (ids `[1, T]`, scored positions, weight) each. windows[0] must be None.
    """
    if windows[0] is not None:
        raise ValueError("windows[0] must be None (the head keeps everything)")
    layers = model.model.layers
    total = None
    bar = tqdm(total=len(sequences) * (len(layers) + 1), desc="tune: sensitivities", disable=not progress)
    for ids, scored, weight in sequences:
        caps = capture(model, ids, scored)
        bar.update(1)
        per = []
        for i, cap in enumerate(caps):
            per.append(layer_losses(cap, layers[i].self_attn.o_proj.weight.detach(), codecs, windows, sink,
                                    page_size))
            bar.update(1)
        got = torch.stack(per) * weight
        total = got if total is None else total + got
        del caps
    bar.close()
    return total


def layer_bytes(codec: Codec, windows: Sequence[int | None], sink: int, ctx: int, head_dim: int,
                page_size: int, decode: int = 64, prefill_chunk: int = 512) -> int:
    """Bytes of a real one-layer store of `codec` whose KV head h keeps all (`windows[h]` None)
    or streams with that window: `ctx` tokens prefilled as `KVKitCache` does for an evicting
    policy (chunks of `prefill_chunk`, eviction after each, then `compact`), then `decode` tokens
    one at a time with eviction after each. The store's own rules decide what that allocates:
    pool growth steps, pages a compressed layer cannot give back, staging rows."""
    from kvkit.policies.base import Policy, Rule
    from kvkit.policies.evictors.sink_window import SinkWindowEvictor

    H = len(windows)
    rules = tuple(Rule(heads=(h,), evictor=SinkWindowEvictor(sink=sink, window=w))
                  for h, w in enumerate(windows) if w is not None)
    policy = Policy(codec=codec, rules=rules, page_size=page_size)
    store = policy.make_store(1, H, head_dim, dtype=torch.float32)
    seq = store.add_sequence()
    g = torch.Generator().manual_seed(0)
    evicts = bool(rules)
    for start in range(0, ctx, prefill_chunk if evicts else ctx):
        n = min(prefill_chunk if evicts else ctx, ctx - start)
        store.append(seq, 0, torch.randn(n, H, head_dim, generator=g), torch.randn(n, H, head_dim, generator=g))
        policy.evict(store, [seq], 0, None)
    store.compact([0])
    for _ in range(decode):
        store.append_step([seq], 0, torch.randn(1, H, head_dim, generator=g), torch.randn(1, H, head_dim, generator=g))
        policy.evict(store, [seq], 0, None)
    return store.nbytes()


def head_bytes(codec: Codec, window: int | None, sink: int, ctx: int, num_kv_heads: int, head_dim: int,
               page_size: int, decode: int = 64) -> float:
    """Bytes one KV head costs when every head of a layer makes the same choice (`layer_bytes`)."""
    return layer_bytes(codec, [window] * num_kv_heads, sink, ctx, head_dim, page_size, decode) / num_kv_heads


def dense_bytes(num_layers: int, num_kv_heads: int, head_dim: int, tokens: int, page_size: int = 16) -> int:
    """Bytes of a bf16 dense store of the model's shape holding `tokens` per layer (one sequence)."""
    from kvkit.policies.codecs.plain import PlainCodec

    store = PagedKVStore(num_layers, num_kv_heads, head_dim, page_size=page_size, dtype=torch.bfloat16,
                         page_format=[PlainCodec("bf16")] * num_layers)
    seq = store.add_sequence()
    zeros = torch.zeros(tokens, num_kv_heads, head_dim, dtype=torch.bfloat16)
    for layer in range(num_layers):
        store.append(seq, layer, zeros, zeros)
    store.compact()
    return store.nbytes()
