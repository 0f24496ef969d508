"""Quality checks that show when a policy loses information: passkey retrieval and perplexity
of real text, both run through a policy's cache on a real model (transformers).

The passkey task hides a 5-digit key at a given depth of filler text and asks for it back;
perplexity predicts the last N tokens of a text one at a time through the cache, as in real
decoding, so an evicted or badly selected token shows up as loss.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from kvkit.policies.base import Policy

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
QUESTION = "What is the pass key? The pass key is"
PASSKEY_NEW_TOKENS = 8  # tokens generated for the answer


@dataclass(frozen=True)
class PasskeyResult:
    policy: str
    context_tokens: int
    depth: float
    key: str
    answer: str
    correct: bool
    kv_bytes: int
    kv_bytes_dense_equivalent: int
    decode_ms_per_token: float


def load(model_path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a local HF model folder; None loads the embedded SmolLM2.

    Safetensors weights only, and no code from the folder runs (`kvkit.models.load_causal_lm`).
    """
    from kvkit.models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model(model_path)
    return load_causal_lm(path, dtype), load_tokenizer(path)


def context_limit(model) -> int | None:
    """Positions a loaded model was trained for (`config.max_position_embeddings`), if it says."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def check_context(tokens: int, limit: int | None, what: str = "the prompt") -> None:
    """Refuse `tokens` beyond the model's `limit` (None: no limit known) or below 1.

    Raises:
        ValueError: saying how many tokens were asked, the limit, and what to lower.
    """
    if tokens < 1:
        raise ValueError(f"{what}: needs at least 1 token, got {tokens}")
    if limit is not None and tokens > limit:
        raise ValueError(f"{what} needs {tokens} tokens; the model's context is {limit} "
                         f"(max_position_embeddings). Ask for fewer")


def passkey_prompt(tokenizer, context_tokens: int, depth: float, key: str) -> torch.Tensor:
    """Token ids of a prompt of about `context_tokens` with `key` hidden at `depth` (0..1)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    per_filler = len(tokenizer(FILLER).input_ids)
    overhead = len(tokenizer(needle + QUESTION).input_ids) + 8
    n_fill = max(1, (context_tokens - overhead) // per_filler)
    at = round(depth * n_fill)
    text = ("There is an important piece of information hidden inside a lot of irrelevant text. "
            "Find it and memorize it. " + FILLER * at + needle + FILLER * (n_fill - at) + QUESTION)
    return tokenizer(text, return_tensors="pt").input_ids


def passkey_keys(n: int, seed: int = 0) -> list[str]:
    """The 5-digit keys `passkey(..., seed)` hides at its first `n` depths, in order: benchmarks
    that run the same samples another way draw them here."""
    rng = random.Random(seed)
    return [str(rng.randint(10000, 99999)) for _ in range(n)]


def make_cache(model, policy: Policy, page_size: int | None = None):
    from kvkit.integrations.hf import KVKitCache
    return KVKitCache(model, policy, page_size=page_size)


@torch.inference_mode()
def passkey(model, tokenizer, policy: Policy, context_tokens: int = 2400,
            depths: Iterable[float] = (0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0,
            page_size: int | None = None, progress: bool = True,
            on_cache: Callable[[Policy, Any], None] | None = None) -> list[PasskeyResult]:
    """Hide a key at each depth, generate greedily through the policy's cache, check the answer.

    `on_cache(policy, cache)` is called after each sample (e.g. to export metrics).

    Raises:
        ValueError: no depths, a depth outside [0, 1], or a prompt and answer longer than the
            model's context.
    """
    depths = list(depths)
    if not depths:
        raise ValueError("passkey needs at least one depth")
    limit = context_limit(model)
    results = []
    for depth, key in tqdm(list(zip(depths, passkey_keys(len(depths), seed))),
                           desc=f"passkey {policy.name} @{context_tokens}", disable=not progress, leave=False):
        ids = passkey_prompt(tokenizer, context_tokens, depth, key)
        check_context(ids.shape[1] + PASSKEY_NEW_TOKENS, limit,
                      f"a passkey prompt of {ids.shape[1]} tokens plus the answer")
        cache = make_cache(model, policy, page_size)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=PASSKEY_NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        if on_cache is not None:
            on_cache(policy, cache)
        stats = cache.store.stats()
        new = out.shape[1] - ids.shape[1]
        results.append(PasskeyResult(
            policy=policy.name, context_tokens=int(ids.shape[1]), depth=depth, key=key,
            answer=answer.strip(), correct=key in answer, kv_bytes=stats.nbytes,
            kv_bytes_dense_equivalent=stats.nbytes_dense_equivalent,
            decode_ms_per_token=1000 * cache.decode_seconds / max(1, new - 1)))
    return results


@dataclass(frozen=True)
class PerplexityResult:
    policy: str
    context_tokens: int
    scored_tokens: int
    perplexity: float
    kv_bytes: int
    kv_bytes_dense_equivalent: int
    seconds: float


@torch.inference_mode()
def perplexity(model, tokenizer, policy: Policy, text: str, tokens: int = 256,
               context_tokens: int | None = None, page_size: int | None = None,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of the last `tokens` tokens of `text`, fed one at a time through the cache.

    The text's last `context_tokens` tokens are read (default: as many as the model's context
    holds, else all); the first part is prefilled, then each scored token is predicted from the
    cache alone, as in decoding.

    Raises:
        ValueError: `context_tokens` beyond the model's context or below 1; a text too short.
    """
    limit = context_limit(model)
    if context_tokens is None:
        context_tokens = limit
    if context_tokens is not None:
        check_context(context_tokens, limit, f"a perplexity window of {context_tokens} tokens")
    ids = tokenizer(text, return_tensors="pt").input_ids
    if context_tokens is not None:
        ids = ids[:, -context_tokens:]
    if tokens < 1 or ids.shape[1] < tokens + 2:
        raise ValueError(f"need a text of more than {tokens + 1} tokens and tokens >= 1; "
                         f"got {ids.shape[1]} tokens, tokens={tokens}")
    start = time.perf_counter()
    cache = make_cache(model, policy, page_size)
    prefix, rest = ids[:, :-tokens], ids[:, -tokens:]
    logits = model(prefix, past_key_values=cache, use_cache=True).logits[:, -1]
    nll = 0.0
    for i in tqdm(range(tokens), desc=f"ppl {policy.name}", disable=not progress, leave=False):
        target = rest[:, i]
        nll -= torch.log_softmax(logits.float(), -1)[0, target].item()
        if i + 1 < tokens:
            logits = model(target[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
    stats = cache.store.stats()
    return PerplexityResult(policy=policy.name, context_tokens=int(ids.shape[1]), scored_tokens=tokens,
                            perplexity=math.exp(nll / tokens), kv_bytes=stats.nbytes,
                            kv_bytes_dense_equivalent=stats.nbytes_dense_equivalent,
                            seconds=time.perf_counter() - start)


def as_dicts(results: Iterable[Any]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
