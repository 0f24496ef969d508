"""`kvkit tune`: the policy that loses least on calibration text within a resident-bytes budget.

    kvkit tune --budget-bytes 0.125 --ctx 4800 -o tuned.json      # 8x less KV than bf16 dense

The budget is a fraction of what a bf16 dense store of the model really allocates for `ctx`
tokens of one sequence. The search space is per layer and per KV head:

- a **codec** per layer (a layer's pages share one pool): bf16, int8, or GEAR group quantization
  at 4, 3 or 2 bits (rank 0, 1% outliers, values per token), whose open page stays full precision,
  each also with full-precision pages kept out of the quantization: a recent window (KIVI's
  residual; `q4w128`: the pages holding the last 128 positions in fp16), the attention-sink
  page (`q4s`: the pages holding the first 16 positions), or both (`q4sw32`, `q4sw128`); their
  bytes are the staging rows a real store allocates for them; each also as KIVI quantizes (`k4`,
  `k4sw32`: no outliers, values in groups of 32 channels);
- per KV head, **keep everything** (a retrieval head) or **stream** with `sink` first tokens and a
  recent window (DuoAttention's streaming head), the window chosen from `windows`.

`tune_measure` measures the loss of every such choice (relative change of the residual stream at
scored positions of the calibration text and of synthetic passkey prompts, so heads that carry
retrieval are seen), scaled per layer to the end-to-end KL one forward per layer measures, and
what each choice costs a KV head in a real store; `tune_alloc` picks the
least-loss combination under the budget (a multiple-choice knapsack by Lagrangian relaxation and
a greedy fill). The per-part losses are added, and how much the passkey answers should weigh
against the text is not known in advance, so `check` allocates once per pair of weights (on what
the windows add, `WINDOW_WEIGHTS`, and on the passkey answers' losses, `PASSKEY_WEIGHTS`), decodes
each allocation end to end (every layer compressed at once), and keeps, among those that give
every passkey answer the dense model gives, the one with the least KL over the calibration text's
last `CHECK_SCORED` decode steps. The result is a plain `Policy` config (bf16 pages by default, per-layer codec and
per-(layer, head) eviction rules, the page size) with `model_shape` set, so `Policy.from_file`
plus `KVKitCache`, `PagedAttention` or `kvkit serve` load it as it is and refuse another model.

Limits: selectors (quest, lserve, tidal) change what a step reads, not what stays resident, so they
are not searched (add one to the written policy if decode speed matters); a codec's error is
measured per layer and a window's per head, and the allocator adds losses across parts (the
end-to-end check only chooses among a few allocations); KL on calibration text is not perplexity
on another text.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from kvkit.cli import UsageError, input_file, output_file, positive_int
from kvkit.policies.base import Policy, Rule
from kvkit.policies.codecs.gear import GearCodec
from kvkit.policies.codecs.plain import PlainCodec
from kvkit.policies.codecs.quant import Int8Codec
from kvkit.policies.evictors.sink_window import SinkWindowEvictor
from kvkit.policies.roles import Codec
from kvkit.tools.tune_alloc import Allocation, allocate
from kvkit.tools.tune_measure import (decoded_logprobs, dense_bytes, dense_logprobs, head_bytes, kl_sum, layer_bytes,
                                     layer_gains, sensitivities)


# Full-precision pages offered with each quantized codec: suffix -> (sink positions, recent window).
# KIVI keeps a 128-token recent window; the sink page is the first page (the first 16 positions).
CODEC_FP_PAGES: dict[str, tuple[int, int]] = {"": (0, 0), "w128": (0, 128), "s": (16, 0), "sw32": (16, 32),
                                              "sw128": (16, 128)}
CODECS: dict[str, Codec] = {
    "bf16": PlainCodec("bf16"),
    "int8": Int8Codec(),
    **{f"q{b}{suffix}": GearCodec(bits=b, rank=0, outliers=0.01, sink=sink, window=window)
       for suffix, (sink, window) in CODEC_FP_PAGES.items() for b in (4, 3, 2)},
    # KIVI's: no outliers (GEAR's cost an int16 index and an fp16 value each), values in groups of
    # 32 channels (bench/results/gear_window_ppl.md compares them).
    **{f"k{b}{suffix}": GearCodec(bits=b, rank=0, outliers=0.0, v_group=32, sink=sink, window=window)
       for suffix, (sink, window) in CODEC_FP_PAGES.items() for b in (4, 3, 2)},
}
# Shorter windows measure cheap one layer at a time but compound when many heads take them at once
# (the losses are added, not measured jointly): 32 and 64 are not offered by default.
WINDOWS: tuple[int, ...] = (128, 256, 512, 1024)
# The allocator adds per-part losses, so how parts compound across layers is unknown to it. `check`
# allocates once per weight on what windows add to the losses and keeps the allocation that does
# best end to end (bench/results/NOTES.md says which weight won where; 0.25 and 2.0 never did and
# cost a minute of check each).
WINDOW_WEIGHTS: tuple[float, ...] = (0.5, 1.0)
# Weights of the passkey answers' losses against the text's, one candidate each: a heavy weight
# keeps heads whole that the text needs less than it needs longer windows elsewhere; the check's
# passkey condition, not the weight, is what keeps retrieval. 0.0625 fit the calibration text
# better still and did worse on held-out text (bench/results/NOTES.md).
PASSKEY_WEIGHTS: tuple[float, ...] = (1.0, 0.25)
# Decode steps of the calibration text the joint check scores. One forward costs the same whatever
# the number, and the longer a decode, the more it reads of what a streaming window dropped.
CHECK_SCORED = 512
PASSKEY_DEPTHS: tuple[float, ...] = (0.1, 0.3)


@dataclass
class TuneResult:
    """The tuned policy and what it was tuned for."""

    policy: Policy
    allocation: Allocation
    report: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown: per layer, its codec, each KV head's window and its bytes."""
        rows = ["| layer | codec | windows per KV head | KiB at ctx |", "|---|---|---|---|"]
        for r in self.report["layers"]:
            heads = " ".join("all" if w is None else str(w) for w in r["windows"])
            rows.append(f"| {r['layer']} | {r['codec']} | {heads} | {r['bytes'] / 1024:.0f} |")
        return "\n".join(rows)


def calibration_text() -> str:
    """Default calibration text: Python's language reference (`pydoc_data.topics`), which ships
    with CPython and is neither of the texts kvkit evaluates perplexity on."""
    from kvkit.tools.calibrate_cskv import reference_text

    text = reference_text()
    if not text:
        raise ValueError("this Python has no pydoc_data; give calibration text with --calib FILE")
    return text


def _passkey_sequence(tokenizer: Any, tokens: int, depth: float, key: str) -> tuple[torch.Tensor, int]:
    from kvkit.evaluate import passkey_prompt

    prompt = passkey_prompt(tokenizer, tokens, depth, key)
    answer = tokenizer(f" {key}.", add_special_tokens=False, return_tensors="pt").input_ids
    return torch.cat([prompt, answer], 1), answer.shape[1] + 1  # the question's last token predicts the key


def calibration_sequences(tokenizer: Any, text: str | None, calib_tokens: int, scored: int,
                          passkey_depths: Sequence[float] = PASSKEY_DEPTHS) -> list[tuple[torch.Tensor, int, float]]:
    """(ids `[1, calib_tokens]`, scored positions, weight) of the text's last `calib_tokens` tokens
    (its last `scored` positions weigh 1 in all) and of one passkey prompt per depth (their answer
    tokens weigh 1 in all).

    Raises:
        ValueError: a text shorter than `calib_tokens`.
    """
    from kvkit.evaluate import passkey_keys

    ids = tokenizer(text if text is not None else calibration_text(), return_tensors="pt").input_ids
    if ids.shape[1] < calib_tokens:
        raise ValueError(f"the calibration text has {ids.shape[1]} tokens; {calib_tokens} are needed")
    seqs = [(ids[:, -calib_tokens:], scored, 1.0 / scored)]
    for depth, key in zip(passkey_depths, passkey_keys(len(passkey_depths), seed=1)):
        pk, n = _passkey_sequence(tokenizer, calib_tokens, depth, key)
        seqs.append((pk, n, 1.0 / (n * len(passkey_depths))))
    return seqs


@dataclass
class Measurement:
    """What every choice loses on one model, `[L, C, W, H]` each: on the calibration text's scored
    positions and on the passkey answers (each weighing 1 in all); the choices measured."""

    text_loss: torch.Tensor
    passkey_loss: torch.Tensor
    codecs: list[str]
    windows: list[int | None]  # windows[0] is None: keep everything
    shape: tuple[int, int, int]  # num_layers, num_kv_heads, head_dim
    page_size: int
    sink: int
    info: dict[str, Any] = field(default_factory=dict)
    sequences: list[tuple[torch.Tensor, int, float]] = field(default_factory=list)  # the text, then passkeys

    def loss(self, passkey_weight: float = 1.0) -> torch.Tensor:
        """`[L, C, W, H]`: the text's loss plus `passkey_weight` x the passkey answers'."""
        return self.text_loss + passkey_weight * self.passkey_loss


def measure(model: Any, tokenizer: Any, text: str | None = None, calib_tokens: int = 2048, scored: int = 128,
            page_size: int = 32, sink: int = 16, windows: Sequence[int] = WINDOWS,
            codecs: Sequence[str] = tuple(CODECS), passkey_depths: Sequence[float] = PASSKEY_DEPTHS,
            gain_tokens: int = 512, progress: bool = True) -> Measurement:
    """Measure the loss of every (layer, codec, window, KV head) and each codec's bytes per page.

    text: calibration text (default `calibration_text()`); its last `calib_tokens` tokens are read
    and the last `scored` positions scored. Passkey prompts of `calib_tokens` tokens, one per
    depth, are scored on their answer; their losses are kept apart from the text's. The losses are
    then scaled per layer to nats of KL (`layer_gains` on the text's last `gain_tokens` tokens).

    Raises:
        ValueError: an unknown codec, bad windows, a text shorter than `calib_tokens`, or
            `calib_tokens` beyond the model's context.
    """
    from kvkit.evaluate import check_context, context_limit

    if unknown := sorted(set(codecs) - set(CODECS)):
        raise ValueError(f"unknown codecs {unknown}; known: {', '.join(CODECS)}")
    if not windows or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in windows):
        raise ValueError(f"windows must be ints >= 1, got {list(windows)}")
    check_context(calib_tokens + 8, context_limit(model), f"calibration sequences of {calib_tokens} tokens")
    start = time.perf_counter()
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    seqs = calibration_sequences(tokenizer, text, calib_tokens, scored, passkey_depths)
    chosen = [CODECS[c] for c in codecs]
    wins: list[int | None] = [None, *sorted(set(windows))]
    text_loss = sensitivities(model, seqs[:1], chosen, wins, sink, page_size, progress)  # [L, C, W, H]
    passkey_loss = (sensitivities(model, seqs[1:], chosen, wins, sink, page_size, progress) if seqs[1:]
                    else torch.zeros_like(text_loss))
    gain_ids = seqs[0][0][:, -min(gain_tokens, calib_tokens):]
    gains = layer_gains(model, gain_ids, min(64, gain_ids.shape[1] // 4), sink, wins[1], progress)  # [L]
    info = {"calib_tokens": calib_tokens, "scored": scored, "passkey_depths": list(passkey_depths),
            "gain_tokens": gain_tokens, "layer_gains": [round(g, 3) for g in gains.tolist()],
            "measure_seconds": round(time.perf_counter() - start, 1),
            "codecs": {c: {"type": CODECS[c].type_name, **asdict(CODECS[c])} for c in codecs}}
    gains = gains[:, None, None, None]  # residual energy -> nats of KL, per layer
    return Measurement(text_loss=text_loss * gains, passkey_loss=passkey_loss * gains, codecs=list(codecs),
                       windows=wins, shape=(L, H, D), page_size=page_size, sink=sink, info=info, sequences=seqs)


def costs(m: Measurement, ctx: int, decode: int = 64) -> torch.Tensor:
    """`[C, W]` bytes one KV head costs with each codec and window at `ctx` tokens plus `decode`
    decode steps, from real one-layer stores (`head_bytes`)."""
    L, H, D = m.shape
    return torch.tensor([[head_bytes(CODECS[c], w, m.sink, ctx, H, D, m.page_size, decode) for w in m.windows]
                         for c in m.codecs], dtype=torch.float64)


def choose(m: Measurement, budget: float, ctx: int = 4800, decode: int = 64,
           window_weight: float = 1.0, passkey_weight: float = 1.0) -> TuneResult:
    """The least-loss policy of measurement `m` whose store holds at most `budget` x a bf16 dense
    store after `ctx` prompt tokens and `decode` generated ones. The loss is the text's plus
    `passkey_weight` x the passkey answers' (`m.loss`); `window_weight` multiplies what each
    streaming window adds to a head's loss (over keeping every token) before allocating. The
    report's losses are `m.loss(passkey_weight)`, unscaled by `window_weight`.

    Raises:
        ValueError: a budget outside (0, 1] or below the cheapest choice.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction of bf16 dense in (0, 1], got {budget}")
    L, H, D = m.shape
    cost = costs(m, ctx, decode)  # [C, W]
    dense = dense_bytes(L, H, D, ctx + decode)
    loss = m.loss(passkey_weight)
    keep_all = loss[:, :, :1]
    weighted = keep_all + window_weight * (loss - keep_all)
    target = budget * dense
    for _ in range(4):  # the cost table adds heads; a layer's pool is shared: check with real stores
        alloc = allocate(weighted, cost, target)
        real = sum(layer_bytes(CODECS[m.codecs[c]], [m.windows[w] for w in alloc.window[i]], m.sink, ctx, D,
                               m.page_size, decode) for i, c in enumerate(alloc.codec))
        if real <= budget * dense:
            break
        target *= budget * dense / real * 0.99
    policy = build_policy(alloc, m.codecs, m.windows, m.sink, m.page_size, (L, H))
    layers = [{"layer": i, "codec": m.codecs[alloc.codec[i]],
               "windows": [m.windows[w] for w in alloc.window[i]],
               "bytes": float(sum(cost[alloc.codec[i], w] for w in alloc.window[i])),
               "loss": float(sum(loss[i, alloc.codec[i], w, h] for h, w in enumerate(alloc.window[i])))}
              for i in range(L)]
    report = {"budget": budget, "ctx": ctx, "decode": decode, "dense_bf16_bytes": dense,
              "predicted_bytes": real, "predicted_fraction": real / dense, "window_weight": window_weight,
              "passkey_weight": passkey_weight,
              "predicted_loss": sum(r["loss"] for r in layers), "page_size": m.page_size, "sink": m.sink,
              "windows": m.windows,
              "head_bytes": {c: dict(zip(map(str, m.windows), cost[i].tolist())) for i, c in enumerate(m.codecs)},
              **m.info, "layers": layers}
    return TuneResult(policy=policy, allocation=alloc, report=report)


def check_sequences(m: Measurement, scored: int = CHECK_SCORED) -> list[tuple[torch.Tensor, int, float]]:
    """The sequences `m` was measured on, with the calibration text's last `scored` positions
    scored (weighing 1 in all, as when measured) and the passkey answers as they were (weighing 1
    in all).

    Raises:
        ValueError: `scored` not below the text's length (a decode needs a prefill before it).
    """
    (ids, _, _), *passkeys = m.sequences
    if not 0 < scored < ids.shape[1]:
        raise ValueError(f"the joint check scores 1 to {ids.shape[1] - 1} decode steps of the "
                         f"{ids.shape[1]}-token calibration text; got {scored}")
    return [(ids, scored, 1.0 / scored), *passkeys]


@dataclass
class Decoded:
    """An allocation decoded end to end on the check's sequences (`decoded_logprobs`)."""

    text_kl: float      # KL from dense per scored decode step of the calibration text, nats
    passkey_kl: float   # KL from dense over the passkey answers (weighing 1 in all), nats
    passkey_kept: int   # passkey prompts whose every answer token is the dense model's greedy one


def decode_check(model: Any, sequences: Sequence[tuple[torch.Tensor, int, float]], dense: Sequence[torch.Tensor],
                 policy: Policy) -> Decoded:
    """`policy` decoded on `check_sequences` (the text first, then the passkey prompts), against
    their `dense_logprobs`. A passkey answer is kept when the greedy token at each position that
    predicts one of its tokens is the dense model's (the last scored position predicts what
    follows the answer and is not compared)."""
    logps = [decoded_logprobs(model, ids, n, policy) for ids, n, _ in sequences]
    kls = [w * kl_sum(d, lp) for (_, _, w), d, lp in zip(sequences, dense, logps)]
    kept = sum(bool((lp[:-1].argmax(-1) == d[:-1].argmax(-1)).all()) for d, lp in zip(dense[1:], logps[1:]))
    return Decoded(text_kl=kls[0], passkey_kl=sum(kls[1:]), passkey_kept=kept)


def check(model: Any, m: Measurement, budget: float, ctx: int = 4800, decode: int = 64,
          window_weights: Sequence[float] = WINDOW_WEIGHTS, passkey_weights: Sequence[float] = PASSKEY_WEIGHTS,
          scored: int = CHECK_SCORED, progress: bool = True) -> TuneResult:
    """`choose` once per (passkey weight, window weight), each distinct allocation decoded end to
    end (`decode_check`: every layer compressed at once) on `check_sequences(m, scored)`: the
    last `scored` decode steps of the calibration text and the passkey prompts. The winner keeps
    the most passkey answers (all, when any candidate does) and, among those, loses the least on
    the text. The report lists every candidate (`joint_check`).

    Raises:
        ValueError: as `choose` and `check_sequences`, or no window or passkey weight.
    """
    if not window_weights or not passkey_weights:
        raise ValueError("give at least one window weight and one passkey weight (1 and 1: the losses as measured)")
    start = time.perf_counter()
    sequences = check_sequences(m, scored)
    dense = dense_logprobs(model, sequences)
    decoded: dict[tuple, Decoded] = {}  # (codecs, windows) -> its decode: weights may agree
    candidates = []
    pairs = [(p, w) for p in passkey_weights for w in window_weights]
    for passkey_weight, window_weight in tqdm(pairs, desc="tune: joint check", disable=not progress):
        result = choose(m, budget, ctx, decode, window_weight=window_weight, passkey_weight=passkey_weight)
        a = result.allocation
        if (a.codec, a.window) not in decoded:
            decoded[a.codec, a.window] = decode_check(model, sequences, dense, result.policy)
        candidates.append((decoded[a.codec, a.window], result))
    got, best = min(candidates, key=lambda c: (-c[0].passkey_kept, c[0].text_kl))
    best.report.update(asdict(got), passkey_of=len(sequences) - 1, check_scored=scored,
                       check_seconds=round(time.perf_counter() - start, 1))
    best.report["joint_check"] = [{k: r.report[k] for k in ("window_weight", "passkey_weight", "predicted_loss",
                                                             "predicted_fraction")} | asdict(d) for d, r in candidates]
    return best


def tune(model: Any, tokenizer: Any, budget: float, ctx: int = 4800, progress: bool = True,
         window_weights: Sequence[float] = WINDOW_WEIGHTS, passkey_weights: Sequence[float] = PASSKEY_WEIGHTS,
         check_scored: int = CHECK_SCORED, **measure_args: Any) -> TuneResult:
    """`measure` then `check`: a policy for `model` within `budget` x bf16 dense at `ctx` tokens.

    Raises:
        ValueError: as `measure` and `check` (the budget is checked first).
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction of bf16 dense in (0, 1], got {budget}")
    calib_tokens = measure_args.get("calib_tokens", 2048)
    if not 0 < check_scored < calib_tokens:  # before the minutes `measure` takes
        raise ValueError(f"check_scored must be in [1, {calib_tokens - 1}] (below calib_tokens), got {check_scored}")
    m = measure(model, tokenizer, progress=progress, **measure_args)
    return check(model, m, budget, ctx, window_weights=window_weights, passkey_weights=passkey_weights,
                 scored=check_scored, progress=progress)


def build_policy(alloc: Allocation, codecs: Sequence[str], windows: Sequence[int | None], sink: int,
                 page_size: int, model_shape: tuple[int, int], name: str = "tuned") -> Policy:
    """The Policy of an allocation: bf16 pages, a codec rule per group of layers sharing a codec,
    an eviction rule per (KV head, window) naming its layers; `model_shape` pins the model."""
    rules = []
    for c, codec_name in enumerate(codecs):
        layers = tuple(i for i, ci in enumerate(alloc.codec) if ci == c)
        if layers and codec_name != "bf16":
            rules.append(Rule(layers=layers, codec=CODECS[codec_name]))
    num_heads = model_shape[1]
    for h in range(num_heads):
        for w, window in enumerate(windows):
            layers = tuple(i for i, row in enumerate(alloc.window) if row[h] == w)
            if layers and window is not None:
                rules.append(Rule(layers=layers, heads=(h,), evictor=SinkWindowEvictor(sink=sink, window=window)))
    return Policy(codec=PlainCodec("bf16"), rules=tuple(rules), name=name, page_size=page_size,
                  model_shape=model_shape)


# ---- the command --------------------------------------------------------------------------------
def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction of bf16 dense such as 0.125, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (a fraction of bf16 dense bytes), got {text}")
    return value


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _weights(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


def _codecs(text: str) -> list[str]:
    names = [c for c in text.split(",") if c]
    if not names or (unknown := sorted(set(names) - set(CODECS))):
        raise argparse.ArgumentTypeError(f"codecs are a comma-separated subset of {','.join(CODECS)}, got {text!r}")
    return names


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add `tune` to a `kvkit` subparsers object."""
    p = subparsers.add_parser("tune", help="the least-loss policy for a KV memory budget; writes a policy JSON",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2)")
    p.add_argument("--budget-bytes", type=_fraction, required=True,
                   help="resident KV bytes as a fraction of a bf16 dense store at --ctx tokens (0.125: 8x less)")
    p.add_argument("--ctx", type=positive_int, default=4800, help="context length the budget holds for")
    p.add_argument("--calib", type=input_file, default=None,
                   help="calibration text file (default: Python's language reference, pydoc_data)")
    p.add_argument("--calib-tokens", type=positive_int, default=2048, help="tokens per calibration sequence")
    p.add_argument("--scored", type=positive_int, default=128, help="scored positions at the text's end, measured")
    p.add_argument("--check-scored", type=positive_int, default=CHECK_SCORED,
                   help="decode steps at the text's end the joint check scores (below --calib-tokens)")
    p.add_argument("--page-size", type=positive_int, default=32)
    p.add_argument("--sink", type=positive_int, default=16, help="first tokens a streaming head keeps")
    p.add_argument("--windows", type=_ints, default=list(WINDOWS), help="streaming windows to consider")
    p.add_argument("--codecs", type=_codecs, default=list(CODECS), help=f"codecs to consider ({','.join(CODECS)})")
    p.add_argument("--passkey-weights", type=_weights, default=list(PASSKEY_WEIGHTS),
                   help="weights of the passkey answers' losses against the text's, one candidate allocation each")
    p.add_argument("--window-weights", type=_weights, default=list(WINDOW_WEIGHTS),
                   help="weights on the windows' losses, one candidate allocation each, checked end to end")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--report", type=output_file, default=None, help="also write the tuning report (JSON)")
    p.add_argument("-o", "--out", type=output_file, required=True, help="policy JSON to write")
    p.set_defaults(func=cmd_tune, check_args=_check_scored_positions)
    return p


def _check_scored_positions(args: argparse.Namespace) -> None:
    """Scored positions need a prefill before them: refuse, before the model loads, any not below
    --calib-tokens."""
    for flag, value in (("--scored", args.scored), ("--check-scored", args.check_scored)):
        if value >= args.calib_tokens:
            raise UsageError(f"argument {flag}: must be below --calib-tokens ({args.calib_tokens}), got {value}")


def cmd_tune(args: argparse.Namespace) -> int:
    from kvkit import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    text = Path(args.calib).read_text(encoding="utf-8", errors="replace") if args.calib else None
    model, tok = evaluate.load(args.model)
    result = tune(model, tok, args.budget_bytes, ctx=args.ctx, text=text, calib_tokens=args.calib_tokens,
                  scored=args.scored, page_size=args.page_size, sink=args.sink, windows=args.windows,
                  codecs=args.codecs, window_weights=args.window_weights, passkey_weights=args.passkey_weights,
                  check_scored=args.check_scored)
    Path(args.out).write_text(json.dumps(result.policy.to_config(), indent=1) + "\n")
    if args.report:
        Path(args.report).write_text(json.dumps(result.report, indent=1) + "\n")
    r = result.report
    print(result.table())
    print(f"\ncandidates (passkey weight, window weight: text KL per step, nats; passkey answers kept of {r['passkey_of']}):",
          "; ".join(f"{c['passkey_weight']:g}, {c['window_weight']:g}: {c['text_kl']:.4f}, {c['passkey_kept']}"
                    for c in r["joint_check"]))
    print(f"\npredicted {r['predicted_bytes'] / 2**20:.1f} MiB = {r['predicted_fraction']:.3f}x of bf16 dense "
          f"({r['dense_bf16_bytes'] / 2**20:.1f} MiB at {r['ctx']} tokens); budget {r['budget']}x; "
          f"measured in {r['measure_seconds']:.0f} s, checked in {r['check_seconds']:.0f} s. Wrote {args.out}")
    return 0
