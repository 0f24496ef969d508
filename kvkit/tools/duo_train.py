"""`kvkit identify-heads MODEL`: find DuoAttention's retrieval heads by optimising gates.

DuoAttention (arXiv:2410.10819, Sec. 3.2): every KV head gets a gate alpha in [0, 1] and its
attention output becomes

    out = alpha * full_attention + (1 - alpha) * streaming_attention(sink, window)

(the G query heads of a KV head share its gate). The model's weights are frozen; only the gates
train, on synthetic passkey data, to minimise

    loss = MSE(h_gated, h_full) / mean(h_full ** 2) + l1 * mean(alpha)

where h are the final hidden states on the last `loss_tokens` positions (the question and the
teacher-forced answer, the tokens that need the needle; DuoAttention distils on the passkey's
answer span) and the L1 term pushes heads towards streaming. Gates start at 1 (all full) and are
clipped to [0, 1] after each Adam step, as in DuoAttention's code. Heads whose gate stays high
are retrieval heads.

DuoAttention trains 2000 steps on 32K-token sequences on GPUs. Here the defaults are sized for
a shared 2-core CPU: sequences of `seq_len` tokens with a window much shorter than the needle's
distance, and few steps. The policy uses only the ranking of the gates (top-k); a 12-step run
does not converge it (of the top 22 heads after 4 steps, 15 were still in the top 22 after 12).
The pattern file records every setting used.

Shapes: B batch, Hq/Hkv query/KV heads, G = Hq // Hkv, T tokens, D head_dim, L layers.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvkit.policies.duo import DuoPattern

logger = logging.getLogger(__name__)

ATTN_NAME = "kvkit_duo_gate"


@dataclass
class _GateState:
    gates: torch.Tensor | None = None      # [L, Hkv] trainable, or None: plain full attention
    stream_mask: torch.Tensor | None = None  # [T, T] bool, True where streaming may attend


_STATE = _GateState()


def streaming_mask(length: int, sink: int, window: int) -> torch.Tensor:
    """`[T, T]` bool: query i sees key j iff j <= i and (j < sink or i - j < window)."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return (j <= i) & ((j < sink) | (i - j < window))


def gated_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers attention function mixing full and streaming attention per KV head.

    query `[B, Hq, T, D]`, key/value `[B, Hkv, T, D]` -> (`[B, T, Hq, D]`, None).
    """
    full = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    if _STATE.gates is None:
        return full.transpose(1, 2).contiguous(), None
    T = query.shape[2]
    mask = _STATE.stream_mask[:T, :T]
    stream = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    G = query.shape[1] // key.shape[1]
    alpha = _STATE.gates[module.layer_idx].clamp(0, 1).repeat_interleave(G)[None, :, None, None]  # [1, Hq, 1, 1]
    out = alpha * full + (1 - alpha) * stream  # [B, Hq, T, D]
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
    AttentionInterface.register(ATTN_NAME, gated_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _sample(tokenizer, seq_len: int, rng: random.Random) -> tuple[torch.Tensor, int]:
    """A passkey prompt of about `seq_len` tokens plus its teacher-forced answer; returns
    (ids `[1, T]`, number of trailing tokens that carry the loss)."""
    from kvkit.evaluate import QUESTION, passkey_prompt
    key = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.05, 0.8)
    prompt = passkey_prompt(tokenizer, seq_len, depth, key)
    answer = tokenizer(" " + key + ".", return_tensors="pt", add_special_tokens=False).input_ids
    question = len(tokenizer(QUESTION, add_special_tokens=False).input_ids)
    return torch.cat([prompt, answer], 1), question + answer.shape[1]


def identify_heads(model: str | Path | None = None, *, steps: int = 12, seq_len: int = 256,
                   sink: int = 4, window: int = 24, lr: float = 0.15, l1: float = 0.05,
                   samples: int | None = 4, seed: int = 0, threads: int | None = None,
                   serve_sink: int = 16, serve_window: int = 256, checkpoint: str | Path | None = None,
                   progress: bool = True) -> DuoPattern:
    """Optimise one gate per KV head of `model` (None: the embedded SmolLM2); returns the pattern.

    `samples` passkey samples (random key and depth; None: a fresh one per step) are cycled;
    the frozen model's full-attention hidden states (the teacher, no grad) are computed once
    per sample; each step runs the gated model and takes an Adam step on the gates. The gates
    are trained with the short `sink`/`window` that fit `seq_len`; the pattern's own sink/window
    (the duo policy's defaults at long context) are `serve_sink`/`serve_window`. With
    `checkpoint`, the pattern so far is written there after every step.

    Cost: one gated forward + backward per step (plus one teacher forward per sample). The
    defaults made the shipped SmolLM2 pattern: 12 steps in 350 s on a shared 2-core CPU
    (`python -m kvkit.tools.duo_train --out kvkit/data/duo_smollm2.json --threads 2`). Under
    heavy load (load average 15-29) a step at seq_len 320 took 95-430 s.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvkit.models import resolve_model

    for name, v, lo in (("steps", steps, 1), ("seq_len", seq_len, 32), ("window", window, 1), ("sink", sink, 0)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"identify_heads: {name} must be an int >= {lo}, got {v!r}")
    if sink + window >= seq_len // 2:
        raise ValueError(f"identify_heads: sink + window ({sink + window}) must be well below seq_len "
                         f"({seq_len}), or streaming heads see the needle and nothing is learned")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    _register()
    lm.set_attn_implementation(ATTN_NAME)
    cfg = lm.config
    L, Hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    gates = torch.ones(L, Hkv, requires_grad=True)
    opt = torch.optim.Adam([gates], lr=lr)
    _STATE.stream_mask = streaming_mask(seq_len + 64, sink, window)
    start, history = time.perf_counter(), []
    num_samples = min(steps, samples or steps)
    data: list[tuple[torch.Tensor, int, torch.Tensor | None]] = [(*_sample(tokenizer, seq_len, rng), None)
                                                                 for _ in range(num_samples)]
    bar = tqdm(range(steps), desc="identify-heads", disable=not progress)
    try:
        for step in bar:
            ids, n_loss, target = data[step % num_samples]
            if ids.shape[1] > _STATE.stream_mask.shape[0]:
                _STATE.stream_mask = streaming_mask(ids.shape[1], sink, window)
            if target is None:  # the teacher: full attention, computed once per sample
                _STATE.gates = None
                with torch.no_grad():
                    target = lm.model(ids).last_hidden_state[:, -n_loss:]  # [1, n, hidden]
                data[step % num_samples] = (ids, n_loss, target)
            _STATE.gates = gates
            hidden = lm.model(ids).last_hidden_state[:, -n_loss:]
            distill = F.mse_loss(hidden, target) / target.pow(2).mean()
            reg = gates.clamp(0, 1).mean()
            loss = distill + l1 * reg
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                gates.clamp_(0, 1)
            history.append(round(distill.item(), 6))
            if checkpoint is not None:  # a long run on a busy machine can be stopped and still used
                _pattern(gates, cfg, model, path, sink, window, serve_sink, serve_window,
                         {"steps_done": step + 1, "distill_last": history[-1]}).save(checkpoint)
            bar.set_postfix(distill=f"{float(distill):.4f}", mean_gate=f"{float(gates.mean()):.3f}")
    finally:
        _STATE.gates, _STATE.stream_mask = None, None
        lm.set_attn_implementation("sdpa")
    training = {"method": "DuoAttention gates (arXiv:2410.10819), kvkit.tools.duo_train",
                "train_sink": sink, "train_window": window, "steps": steps, "samples": num_samples,
                "seq_len": seq_len, "lr": lr, "l1": l1, "seed": seed,
                "loss": "MSE of final hidden states on question+answer tokens / their mean square",
                "distill_first": history[0], "distill_last": history[-1],
                "distill_last5_mean": round(sum(history[-5:]) / len(history[-5:]), 6),
                "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads()}
    return _pattern(gates, cfg, model, path, sink, window, serve_sink, serve_window, training)


def _pattern(gates: torch.Tensor, cfg, model, path: Path, sink: int, window: int, serve_sink: int,
             serve_window: int, training: dict[str, Any]) -> DuoPattern:
    name = getattr(cfg, "_name_or_path", "") or str(path)
    if model is None or str(model) in ("smollm2", "SmolLM2-135M-Instruct"):
        name = "SmolLM2-135M-Instruct"
    training = {"train_sink": sink, "train_window": window, **training}
    return DuoPattern(model=Path(name).name or name, num_layers=cfg.num_hidden_layers,
                      num_kv_heads=cfg.num_key_value_heads, gates=gates.detach().clamp(0, 1).tolist(),
                      sink=serve_sink, window=serve_window, training=training)


# ---- CLI ---------------------------------------------------------------------------------------
def cmd_identify_heads(args: argparse.Namespace) -> int:
    pattern = identify_heads(None if args.model in (None, "smollm2") else args.model, steps=args.steps,
                             seq_len=args.seq_len, sink=args.sink, window=args.window, lr=args.lr,
                             l1=args.l1, samples=args.samples, seed=args.seed, threads=args.threads,
                             serve_sink=args.serve_sink, serve_window=args.serve_window, checkpoint=args.out)
    out = pattern.save(args.out)
    ranked = sorted(((g, l, h) for l, row in enumerate(pattern.gates) for h, g in enumerate(row)), reverse=True)
    k = max(1, round(0.25 * len(ranked)))
    print(f"wrote {out}: {pattern.num_layers} layers x {pattern.num_kv_heads} KV heads, "
          f"{pattern.training['seconds']} s")
    print("top 25% (retrieval) heads, layer:head=gate: " +
          ", ".join(f"{l}:{h}={g:.2f}" for g, l, h in ranked[:k]))
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add `identify-heads` to a `kvkit` subparsers object."""
    p = subparsers.add_parser("identify-heads", help="find DuoAttention retrieval heads; write a pattern file",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="smollm2", help="local HF model folder (default: embedded SmolLM2)")
    p.add_argument("--out", default="duo_pattern.json", help="pattern file to write (JSON)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per synthetic passkey sample")
    p.add_argument("--sink", type=int, default=4, help="streaming sink while training")
    p.add_argument("--window", type=int, default=24, help="streaming window while training")
    p.add_argument("--serve-sink", type=int, default=16, help="sink written to the pattern (policy default)")
    p.add_argument("--serve-window", type=int, default=256, help="window written to the pattern (policy default)")
    p.add_argument("--lr", type=float, default=0.15)
    p.add_argument("--l1", type=float, default=0.05, help="weight of the L1 push towards streaming")
    p.add_argument("--samples", type=int, default=4, help="distinct passkey samples, cycled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.set_defaults(func=cmd_identify_heads)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m kvkit.tools.duo_train [MODEL] [options]` (the same as `kvkit identify-heads`)."""
    parser = argparse.ArgumentParser(prog="kvkit")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["identify-heads", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
