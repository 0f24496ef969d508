"""Quality of a Read-ME MoE: perplexity, passkey retrieval, and routing recall vs the oracle.

Shapes: C chunks of T tokens, L layers, N = C*T tokens, E experts, k top-k.
"""

from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from kvkit.moe.readme.model import ReadME

logger = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(model: PreTrainedModel, chunks: torch.Tensor, batch_size: int = 4,
               progress: bool = False, desc: str = "kvkit: perplexity") -> float:
    """exp(mean next-token negative log-likelihood) over chunks [C, T] (T-1 targets each)."""
    from tqdm.auto import tqdm

    nll, count = 0.0, 0
    for b in tqdm(range(0, chunks.shape[0], batch_size), desc=desc, unit="batch",
                  disable=not progress):
        ids = chunks[b:b + batch_size]
        logits = model(input_ids=ids).logits.float()  # [b, T, V]
        nll += torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def recall(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Share of the true experts that the prediction contains: [..., k'] vs [..., k] -> [...]."""
    hit = (pred[..., :, None] == truth[..., None, :]).any(-2)  # [..., k]
    return hit.float().mean(-1)


@torch.no_grad()
def routing_recall(moe: ReadME, ids: torch.Tensor, emass: torch.Tensor, top_k: int,
                   router: str = "pregate", x: torch.Tensor | None = None) -> list[float]:
    """Per-layer recall of the oracle's top-k experts on dense-model states.

    ids: [C, T]; emass: [L, N, E] oracle masses from the dense profile of ``ids``;
    x: [L, N, H] the dense MLP inputs (needed for ``router="layer"``).
    """
    truth = emass.topk(top_k, dim=-1).indices  # [L, N, k]
    if router == "pregate":
        pred = moe.predict(ids, top_k).flatten(0, 1).transpose(0, 1)  # [B,T,L,k] -> [L, N, k]
    elif router == "layer":
        if x is None:
            raise ValueError("routing_recall(router='layer') needs the dense MLP inputs x")
        pred = torch.stack([mlp.router(x[i].float()).topk(top_k, -1).indices
                            for i, mlp in enumerate(moe.mlps)])
    else:
        raise ValueError(f"routing_recall compares 'pregate' or 'layer' routers, got {router!r}")
    return recall(pred, truth).mean(-1).tolist()


FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def passkey_prompt(tokenizer: PreTrainedTokenizerBase, key: int, tokens: int,
                   depth: float) -> torch.Tensor:
    """A passkey hidden at ``depth`` (0..1) of about ``tokens`` tokens of filler: [1, T]."""
    n_fill = max(1, tokens // len(tokenizer(FILLER, add_special_tokens=False)["input_ids"]))
    at = int(round(depth * n_fill))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    text = ("There is an important piece of information hidden inside a lot of irrelevant text. "
            "Find it and memorize it.\n" + FILLER * at + needle + FILLER * (n_fill - at)
            + "\nWhat is the pass key? The pass key is")
    return tokenizer(text, return_tensors="pt")["input_ids"]


@torch.no_grad()
def passkey(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, trials: int = 6,
            tokens: int = 500, seed: int = 0) -> int:
    """Greedy passkey retrieval: how many of ``trials`` prompts (depths spread 0..1) succeed."""
    rng = random.Random(seed)
    ok = 0
    for i in range(trials):
        key = rng.randint(10000, 99999)
        ids = passkey_prompt(tokenizer, key, tokens, i / max(1, trials - 1))
        out = model.generate(ids, max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        ok += str(key) in tokenizer.decode(out[0, ids.shape[1]:])
    return ok
