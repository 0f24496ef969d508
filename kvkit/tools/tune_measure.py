"""What each compression choice costs, measured: loss on calibration text and bytes in a real store.

One dense forward per calibration sequence captures every layer's post-RoPE keys and values,
the queries of the last `scored` positions, and the residual stream entering each layer. Then,
per layer, without another forward:

- each **codec** round-trips the layer's K/V through a real `PagedKVStore` of that codec, and
  each scored query reads what it would at its own decode step (`decode_view`: a GEAR page is
  read compressed once it is full and out of the codec's recent window, else as staged);
- each **window** masks, for every scored query, the keys a streaming head would have evicted
  (it keeps the first `sink` positions and the last `window` before the query);
- the loss of a (layer, KV head, codec, window) choice is the energy of the change it makes to
  the residual stream, `|| W_o[:, head] (out - out_dense) ||^2`, summed over scored positions and
  divided by the energy of the residual stream entering the layer there. It is a first-order,
  per-part sensitivity: the allocator adds it over parts (interactions are not measured).
- `layer_gains` turns that unit into nats: one forward per layer with all its heads streaming
  measures the end-to-end KL from dense, divided by the residual-energy loss of the same change
  (layers differ by two orders of magnitude in how much of a change reaches the logits).

`joint_loss` measures a whole policy instead: one forward per sequence with every layer's codec
and every head's window applied at once, which is the KL of decoding through `KVKitCache`.

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

from kvkit.policies.base import Policy
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
    if perturb is not None:
        out = perturb(module.layer_idx, query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5)
        if out is not None:
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


@contextlib.contextmanager
def _perturbing(model: Any, perturb: Any) -> Iterator[None]:
    """Run `model`'s attention through `perturb(layer, q, k, v, scale)`; where it returns None, SDPA."""
    _register()
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    _local.perturb = perturb
    try:
        yield
    finally:
        _local.perturb = None
        model.set_attn_implementation(before)


def kl_sum(dense: torch.Tensor, logp: torch.Tensor) -> float:
    """Summed KL(dense || logp) of log-probabilities `[N, V]`."""
    return float((dense.exp() * (dense - logp)).sum())


@torch.inference_mode()
def layer_gains(model: Any, ids: torch.Tensor, scored: int, sink: int, window: int,
                progress: bool = True) -> torch.Tensor:
    """`[L]` nats of end-to-end KL per unit of the residual-energy loss `layer_losses` measures.

    For each layer, every head of that layer alone streams (`sink`, `window`) at the last `scored`
    positions of `ids` `[1, T]`; the KL from dense of the next-token distributions there, summed
    over positions, is divided by the loss `layer_losses` gives the same change. One forward per
    layer plus one dense.
    """
    from kvkit.policies.codecs.plain import PlainCodec

    T = ids.shape[1]
    caps = capture(model, ids, scored)
    dense = dense_logprobs(model, [(ids, scored, 1.0)])[0]
    layers = model.model.layers
    keep = streaming_mask(T, scored, sink, window)
    gains = torch.empty(len(layers))
    for i in tqdm(range(len(layers)), desc="tune: layer gains", disable=not progress):
        def perturb(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, i: int = i):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=True) \
                if layer == i else None

        with _perturbing(model, perturb):
            logp = model(ids, use_cache=False).logits[0, -scored:].float().log_softmax(-1)
        proxy = float(layer_losses(caps[i], layers[i].self_attn.o_proj.weight, [PlainCodec("fp32")],
                                   [None, window], sink, page_size=16)[0, 1].sum())
        gains[i] = kl_sum(dense, logp) / max(proxy, 1e-12)
    return gains


@torch.inference_mode()
def dense_logprobs(model: Any, sequences: Sequence[tuple[torch.Tensor, int, float]]) -> list[torch.Tensor]:
    """Per (ids, scored, weight) sequence, the dense model's log-probabilities `[scored, V]` at its
    last `scored` positions: the reference `joint_loss` compares with."""
    return [model(ids, use_cache=False).logits[0, -n:].float().log_softmax(-1) for ids, n, _ in sequences]


def streaming_reads(policy: Policy, num_layers: int, num_kv_heads: int) -> list[list[tuple[int, int | None]]]:
    """Per (layer, KV head), the (sink, window) a policy's streaming evictor keeps; (0, None) where
    the head keeps every token.

    Raises:
        ValueError: an evictor other than `sink_window` (what it keeps depends on attention scores,
            which the tuner's model does not follow).
    """
    from kvkit.policies.evictors.none import NoEvictor
    from kvkit.policies.evictors.sink_window import SinkWindowEvictor

    reads = []
    for layer in range(num_layers):
        row: list[tuple[int, int | None]] = [(0, None)] * num_kv_heads
        for evictor, heads in policy.evictors(layer, num_kv_heads):
            if isinstance(evictor, SinkWindowEvictor):
                for h in heads:
                    row[h] = (evictor.sink, evictor.window)
            elif not isinstance(evictor, NoEvictor):
                raise ValueError(f"joint_loss models sink_window eviction only; layer {layer} has "
                                 f"{evictor.type_name}")
        reads.append(row)
    return reads


@torch.inference_mode()
def decoded_logprobs(model: Any, ids: torch.Tensor, scored: int, policy: Policy) -> torch.Tensor:
    """Log-probabilities `[scored, V]` at the last `scored` positions of `ids` `[1, T]` when each is
    a decode step with `policy`, all in one forward.

    Layer i's scored queries read its keys and values as a store of the policy's codec for that
    layer gives them at their decode step (`decode_view`), and each KV head answers them from the
    keys its streaming evictor keeps (`streaming_reads`); positions before the scored ones attend
    densely, as kvkit's prefill does. So it is teacher-forced decoding through `KVKitCache` with
    that policy (a test compares), interactions across layers, heads and codecs included.

    Raises:
        ValueError: as `streaming_reads`.
    """
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    codecs = [policy.codec_for(layer) for layer in range(L)]
    page_size = policy.resolve_page_size()
    T = ids.shape[1]
    masks = [torch.stack([window_masks(T, scored, sink, [window])[0] for sink, window in row])
             for row in streaming_reads(policy, L, H)]  # [Hkv, N, T] per layer

    def perturb(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
        view = decode_view(codecs[layer], k[0].float(), v[0].float(), scored, page_size)
        tail = attend(q[0, :, -scored:].float().reshape(Hkv, Hq // Hkv, scored, D), view, masks[layer][:, None], scale)
        out[0, :, -scored:] = tail.reshape(Hq, scored, D).to(out.dtype)
        return out

    with _perturbing(model, perturb):
        return model(ids, use_cache=False).logits[0, -scored:].float().log_softmax(-1)


def joint_loss(model: Any, sequences: Sequence[tuple[torch.Tensor, int, float]], dense: Sequence[torch.Tensor],
               policy: Policy) -> float:
    """Weighted end-to-end KL from dense of decoding with `policy` (`decoded_logprobs`), in the
    unit the measured losses are scaled to (nats). One forward per sequence.

    sequences: (ids `[1, T]`, scored positions, weight) each; dense: their `dense_logprobs`.

    Raises:
        ValueError: as `streaming_reads`.
    """
    return float(sum(weight * kl_sum(ref, decoded_logprobs(model, ids, scored, policy))
                     for (ids, scored, weight), ref in zip(sequences, dense)))


def roundtrip(codec: Codec, k: torch.Tensor, v: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V `[Hkv, T, D]` as a store of `codec` gives them back after appending them all."""
    H, T, D = k.shape
    store = PagedKVStore(1, H, D, page_size=page_size, dtype=torch.float32, page_format=[codec])
    seq = store.add_sequence()
    store.append(seq, 0, k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())  # [T, H, D]
    ks, vs = zip(*(store.read(seq, 0, h)[1:] for h in range(H)))
    return torch.stack(ks).float(), torch.stack(vs).float()  # [H, T, D]


@dataclass
class DecodeView:
    """What the last `scored` queries of a sequence read from a store of one codec, as decoding
    reads it: `exact` K/V `[Hkv, T, D]` (as staged), `stored` K/V (as the store holds them after
    the last token: compressed where the codec compresses), and `compressed` `[N, T]`: where
    query n reads the stored copy (None: everywhere)."""

    exact: tuple[torch.Tensor, torch.Tensor]
    stored: tuple[torch.Tensor, torch.Tensor]
    compressed: torch.Tensor | None


def decode_view(codec: Codec, k: torch.Tensor, v: torch.Tensor, scored: int, page_size: int) -> DecodeView:
    """K/V `[Hkv, T, D]` as each of the last `scored` queries reads them from a store of `codec`.

    A GEAR page is compressed once it is full and its newest token is `window` positions old, so
    the query at position p reads a key from its compressed copy iff the key's page ends at or
    before p - window (sink pages stay exact, as the stored copy already has them); the rest
    comes from the staging rows (`buffer_dtype`). A page's compressed content does not depend on
    when it was written (the store never refills a GEAR page), so one round trip serves every
    query. Other codecs are read as the store holds them after the last token.
    """
    from kvkit.policies.codecs.gear import BUFFER_DTYPES, GearCodec

    stored = roundtrip(codec, k, v, page_size)
    if not isinstance(codec, GearCodec):
        return DecodeView(exact=stored, stored=stored, compressed=None)
    T = k.shape[1]
    dtype = BUFFER_DTYPES[codec.buffer_dtype]
    page_end = (torch.arange(T) // page_size + 1) * page_size - 1  # [T]
    p = torch.arange(T - scored, T)[:, None]  # [N, 1]
    return DecodeView(exact=(k.to(dtype).float(), v.to(dtype).float()), stored=stored,
                      compressed=page_end[None] <= p - codec.window)


def attend(q: torch.Tensor, view: DecodeView, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of queries `q` `[Hkv, G, N, D]` over `view`, each query reading only the
    keys `keep` marks (broadcast against `[Hkv, G, N, T]`, e.g. `[W, 1, 1, N, T]` for W windows
    or `[Hkv, 1, N, T]` per head). Returns `[..., Hkv, G, N, D]`.

    Every query is scored against the stored copy, then corrected by the exact-minus-stored
    difference where it reads the exact copy: that is only the last pages before the queries, so
    the correction costs a fraction of the full product.
    """
    (k, v), (ks, vs), where = view.exact, view.stored, view.compressed
    logits = torch.einsum("hgnd,htd->hgnt", q, ks) * scale
    first = T = ks.shape[1]
    if where is not None and not bool(where.all()):
        first = int((~where).any(0).nonzero()[0])  # keys before it are read compressed by every query
        exact = ~where[:, first:]  # [N, R]
        logits[..., first:] += exact * (torch.einsum("hgnd,htd->hgnt", q, k[:, first:] - ks[:, first:]) * scale)
    probs = logits.masked_fill(~keep, float("-inf")).softmax(-1)
    out = torch.einsum("...hgnt,htd->...hgnd", probs, vs)
    if first < T:
        out = out + torch.einsum("...hgnt,htd->...hgnd", probs[..., first:] * exact, v[:, first:] - vs[:, first:])
    return out


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
    keep = window_masks(T, N, sink, windows)[:, None, None]  # [W, 1, 1, N, T]
    qg = cap.q.view(Hkv, G, N, D)
    exact = DecodeView(exact=(cap.k, cap.v), stored=(cap.k, cap.v), compressed=None)
    ref = attend(qg, exact, keep[:1], cap.scaling)[0]  # [Hkv, G, N, D]: windows[0] must be None (all)
    w_o = o_proj.float().view(o_proj.shape[0], Hkv, G * D)  # [E, Hkv, G*D]
    out = torch.empty(len(codecs), len(windows), Hkv)
    for c, codec in enumerate(codecs):
        delta = attend(qg, decode_view(codec, cap.k, cap.v, N, page_size), keep, cap.scaling) - ref  # [W, Hkv, G, N, D]
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
    from kvkit.policies.base import Rule
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
