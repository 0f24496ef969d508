"""`kvkit demo`: a few policies side by side on the same passkey prompts.

Each row runs every prompt (a 5-digit key hidden at several depths of filler text) through one
policy's `KVKitCache` and greedy decoding, and measures:

- accuracy: keys answered;
- resident KV: bytes of the tensors the row's store allocated (`store.nbytes()`, the largest
  over the prompts), against a tight bf16 copy of the same tokens' K and V
  (`StoreStats.nbytes_dense_equivalent`), so the dense row shows its own overhead (page tails,
  slot positions, the room rows grow into);
- KV read per token: bytes decode attention read per generated token over all layers, counted
  from each step's selection (slots listed, times the pool's bytes per slot), plus the page
  summaries (key min/max) of every page a scoring selector's heads list, against dense's;
- ms per token: the median whole-model decode step (prefill excluded), against dense's.

Prompts are interleaved (each prompt through every policy before the next), so a machine that
slows down or speeds up mid-run affects all rows alike.

Limits: the read column counts a scoring selector's summaries at every step, an upper bound for
`lserve`, which scores only when it refreshes its choice. Bytes per slot are the pool's average,
so a codec's per-page side data (scales, low-rank factors) is spread over its slots.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from kvkit import policies
from kvkit.integrations.hf import KVKitCache
from kvkit.evaluate import PASSKEY_NEW_TOKENS, check_context, context_limit, passkey_keys, passkey_prompt
from kvkit.policies import Policy
from kvkit.store import PagedKVStore, Selection

# The composition with the best perplexity at the smallest bytes in
# bench/results/quality_composition.md (bench/compositions/r25_w512_gear4_rank0.json): DuoAttention
# heads, Quest pages on the retrieval heads, 4-bit GEAR pages everywhere.
BEST_COMPOSITION: dict[str, Any] = {
    "name": "duo",
    "params": {"retrieval_ratio": 0.25, "sink": 16, "window": 512,
               "retrieval_selector": {"type": "quest", "budget": 1024, "sink": 16, "window": 64},
               "codec": {"type": "gear", "bits": 4, "rank": 0, "outliers": 0.01}},
}


SELECTORS = ("quest", "lserve", "tidal")  # registered policies with a token `budget`


def build_rows(specs: Sequence[str], context_tokens: int, window: int = 256,
               budget: int | None = None) -> list[tuple[str, Policy]]:
    """(label, policy) for each spec: a registered name, `best` (`BEST_COMPOSITION`) or a JSON
    policy file. Selectors read `budget` tokens (default 1/8 of the context), `streaming` keeps
    4 sinks and `window` recent tokens, other names their defaults. Dense comes first, added if
    missing, since every ratio is against it.

    Raises:
        ValueError: an unknown name, or a file that is not a policy config.
    """
    budget = budget or max(8, context_tokens // 8)
    rows: list[tuple[str, Policy]] = []
    for spec in ["dense", *[s for s in specs if s != "dense"]]:
        if spec == "best":
            rows.append(("duo+quest+gear4", Policy.from_config(BEST_COMPOSITION)))
        elif spec.endswith(".json"):
            rows.append((Path(spec).stem, Policy.from_file(spec)))
        elif spec in SELECTORS:
            rows.append((f"{spec} {budget}", policies.get(spec, budget=budget)))
        elif spec == "streaming":
            rows.append((f"streaming {window}", policies.get(spec, sink=4, window=window)))
        else:
            rows.append((spec, policies.get(spec)))
    return rows


class ReadCounter:
    """A decode monitor (`attention_step(monitor=...)`) that adds up the KV bytes each step read."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.nbytes = 0

    def __call__(self, store: PagedKVStore, seqs: Sequence[int], layer: int, q: torch.Tensor,
                 selection: Selection, *_: Any) -> None:
        pages = selection.pages  # [B, H, P], -1 padding
        if selection.lengths is not None:
            slots = int(selection.lengths.sum())
        else:
            held = store.slot_positions(layer)[pages.clamp(min=0)] >= 0  # [B, H, P, S]
            held &= (pages >= 0)[..., None]
            if selection.slot_mask is not None:
                held &= selection.slot_mask
            slots = int(held.sum())
        kv = store.storage(layer).tensors()
        capacity = store.slot_positions(layer).numel()
        self.nbytes += slots * sum(t.numel() * t.element_size() for t in kv) // max(1, capacity)
        for selector, heads in self.policy.selectors(layer, store.num_kv_heads):
            if selector.needs_key_bounds:
                key_min, key_max = store.key_bounds(layer)  # [N, D] each
                listed = int((store.page_tables(seqs, layer, heads) >= 0).sum())
                self.nbytes += listed * (key_min[0].numel() * key_min.element_size()) * 2


@dataclass
class DemoRow:
    """What one policy did over all the prompts."""

    label: str
    policy: dict[str, Any]
    correct: int = 0
    samples: int = 0
    kv_bytes: int = 0
    dense_bytes: int = 0  # a tight bf16 copy of the same tokens: the memory baseline
    read_bytes: int = 0
    decode_tokens: int = 0
    step_seconds: list[float] = field(default_factory=list)

    @property
    def read_bytes_per_token(self) -> float:
        return self.read_bytes / max(1, self.decode_tokens)

    @property
    def ms_per_token(self) -> float:
        return 1000 * statistics.median(self.step_seconds) if self.step_seconds else float("nan")


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, cache, new_tokens: int, eos: int | None) -> tuple[list[int], list[float]]:
    """Greedy decoding through `cache`: (new token ids, seconds of each decode step after prefill).

    ids: `[1, T]`. Stops after `new_tokens` tokens or at `eos`.
    """
    logits = model(ids, past_key_values=cache, use_cache=True).logits[0, -1]
    tokens, steps = [int(logits.argmax())], []
    while len(tokens) < new_tokens and tokens[-1] != eos:
        start = time.perf_counter()
        logits = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
        steps.append(time.perf_counter() - start)
        tokens.append(int(logits.argmax()))
    return tokens, steps


def run(model, tokenizer, chosen: Sequence[tuple[str, Policy]], context_tokens: int,
        depths: Sequence[float], page_size: int | None = None, seed: int = 0, progress: bool = True,
        on_cache: Callable[[Policy, KVKitCache], None] | None = None) -> list[DemoRow]:
    """Every prompt through every (label, policy), interleaved; one `DemoRow` per policy, in
    order. A short dense run first warms the model up, untimed. `on_cache(policy, cache)` sees
    each cache after its prompt (e.g. to export metrics).

    Raises:
        ValueError: no depths or policies, or a prompt longer than the model's context.
    """
    if not depths or not chosen:
        raise ValueError("the demo needs at least one depth and one policy")
    rows = [DemoRow(name, p.to_config()) for name, p in chosen]
    limit = context_limit(model)
    greedy(model, passkey_prompt(tokenizer, 256, 0.5, "12345"), KVKitCache(model), 4, None)  # warm-up
    work = [(d, k, p, r) for d, k in zip(depths, passkey_keys(len(depths), seed))
            for (_, p), r in zip(chosen, rows)]
    for depth, key, policy, row in tqdm(work, desc="demo", disable=not progress, leave=False):
        ids = passkey_prompt(tokenizer, context_tokens, depth, key)
        check_context(ids.shape[1] + PASSKEY_NEW_TOKENS, limit,
                      f"a passkey prompt of {ids.shape[1]} tokens plus the answer")
        cache = KVKitCache(model, policy, page_size=page_size)
        cache.monitor = counter = ReadCounter(policy)
        tokens, steps = greedy(model, ids, cache, PASSKEY_NEW_TOKENS, tokenizer.eos_token_id)
        if on_cache is not None:
            on_cache(policy, cache)
        answer = tokenizer.decode(tokens, skip_special_tokens=True)
        row.correct += key in answer
        row.samples += 1
        row.kv_bytes = max(row.kv_bytes, cache.nbytes())
        row.dense_bytes = max(row.dense_bytes, cache.store.stats().nbytes_dense_equivalent)
        row.read_bytes += counter.nbytes
        row.decode_tokens += len(steps)
        row.step_seconds += steps
    return rows


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "–"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def table(rows: Sequence[DemoRow]) -> str:
    """A markdown table of the rows: memory against bf16 dense, read and time against the first
    (dense) row."""
    base = rows[0]
    head = ["policy", "passkey", "resident KV", "vs bf16 dense", "KV read/token", "vs dense", "ms/token", "vs dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("-" * (len(h) + 2) for h in head) + "|"]
    for r in rows:
        cells = [r.label, f"{r.correct}/{r.samples}", _mib(r.kv_bytes), _ratio(r.kv_bytes, r.dense_bytes),
                 _mib(r.read_bytes_per_token), _ratio(r.read_bytes_per_token, base.read_bytes_per_token),
                 f"{r.ms_per_token:.1f}", _ratio(r.ms_per_token, base.ms_per_token)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: Sequence[DemoRow]) -> str:
    """One line: which rows kept the first (dense) row's accuracy, at what share of bf16 dense's
    bytes and of the dense row's read and time."""
    base = rows[0]
    kept = [r for r in rows[1:] if r.correct >= base.correct]
    lost = [r.label for r in rows[1:] if r.correct < base.correct]
    said = ", ".join(f"{r.label} ({r.kv_bytes / r.dense_bytes:.2f}x memory, "
                     f"{r.read_bytes_per_token / base.read_bytes_per_token:.2f}x read, "
                     f"{r.ms_per_token / base.ms_per_token:.2f}x time)" for r in kept)
    return (f"kept dense's {base.correct}/{base.samples}: {said or 'none'}"
            + (f"; lost keys: {', '.join(lost)}" if lost else "") + ".")


def as_dict(row: DemoRow) -> dict[str, Any]:
    """A row as JSON: counts, bytes, and the median step time."""
    return {"label": row.label, "policy": row.policy, "correct": row.correct, "samples": row.samples,
            "kv_bytes": row.kv_bytes, "dense_bytes": row.dense_bytes, "read_bytes_per_token": row.read_bytes_per_token,
            "ms_per_token": row.ms_per_token}
