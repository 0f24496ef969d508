"""Harder than one passkey: RULER-style generated long-context tasks, scored through a policy's cache.

Every prompt is built from real prose that ships with the Python packages installed here (the
license files of the installed distributions, found at run time, in a fixed order), with fixed
seeds, so a run is repeatable on a machine with the same packages. Tasks (RULER, arXiv:2404.06654):

- `niah_multikey`: several "special magic number for <word>" needles; asked for one of them.
- `niah_multivalue`: one word gets several numbers at several depths; all must be given back
  (scored as the share found).
- `vartrack`: a chain `VAR A = 12345 ... VAR B = VAR A ...`; asked which variables hold the value.
- `freq_words`: words repeated at different counts among the prose; asked for the three most
  frequent (scored as the share found).
- `doc_copy`: a question over the document itself: a sentence of the prose at some depth is
  quoted by its first words and the model must continue it (scored on the next words).

A task is kept for a policy comparison only where dense scores >= `--keep` (RULER's tasks are
sized for 7B+ models; a 135M model fails some outright); the dropped ones are reported.

    python bench/longctx.py --ctx 2048 --samples 4 --policies dense streaming:window=256
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402

TASKS = ("niah_multikey", "niah_multivalue", "vartrack", "freq_words", "doc_copy")
WORDS = ("apple", "river", "candle", "garden", "silver", "planet", "forest", "window", "mirror", "anchor",
         "violin", "harbor", "pepper", "castle", "meadow", "rocket")


def haystack_text() -> str:
    """The license texts of the installed distributions, sorted by distribution and file name."""
    parts = []
    for dist in sorted(md.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        for f in sorted(dist.files or [], key=str):
            if re.search(r"(LICEN[CS]E|COPYING)", f.name.upper()):
                path = Path(str(dist.locate_file(f)))
                if path.is_file() and path.stat().st_size > 500:
                    parts.append(path.read_text(encoding="utf-8", errors="replace"))
    text = re.sub(r"[ \t]+", " ", "\n\n".join(parts))
    if len(text) < 100_000:
        raise RuntimeError("too little license text in the installed packages to build haystacks")
    return text


@dataclass
class Sample:
    task: str
    prompt: str
    answers: list[str]   # every one must appear (the score is the share that does)
    max_new_tokens: int


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.;:])\s+", text) if 40 <= len(s.strip()) <= 300]


def _fill(tokenizer: Any, sents: list[str], rng: random.Random, tokens: int) -> list[str]:
    """Consecutive sentences from a random start, about `tokens` tokens of them."""
    start = rng.randrange(len(sents) - 2000)
    out, n = [], 0
    for s in sents[start:]:
        out.append(s)
        n += len(tokenizer(s, add_special_tokens=False).input_ids) + 1
        if n >= tokens:
            return out
    return out


def _insert(chunks: list[str], needles: list[str], rng: random.Random) -> str:
    at = sorted(rng.randrange(len(chunks) + 1) for _ in needles)
    for i, (pos, needle) in enumerate(zip(at, needles)):
        chunks.insert(pos + i, needle)
    return " ".join(chunks)


def make_sample(task: str, tokenizer: Any, sents: list[str], ctx: int, rng: random.Random) -> Sample:
    """One prompt of about `ctx` tokens for `task`."""
    budget = ctx - 120  # room for the needles and the question
    hay = _fill(tokenizer, sents, rng, budget)
    intro = "Read the text below and answer the question at the end.\n\n"
    if task == "niah_multikey":
        keys = rng.sample(WORDS, 4)
        nums = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        needles = [f"One of the special magic numbers for {k} is: {n}." for k, n in zip(keys, nums)]
        ask = rng.randrange(len(keys))
        q = f"What is the special magic number for {keys[ask]} mentioned in the text? The special magic number for {keys[ask]} is:"
        return Sample(task, intro + _insert(hay, needles, rng) + "\n\n" + q, [nums[ask]], 12)
    if task == "niah_multivalue":
        key = rng.choice(WORDS)
        nums = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(3)]
        needles = [f"One of the special magic numbers for {key} is: {n}." for n in nums]
        q = f"What are all the special magic numbers for {key} mentioned in the text? The special magic numbers for {key} are:"
        return Sample(task, intro + _insert(hay, needles, rng) + "\n\n" + q, nums, 36)
    if task == "vartrack":
        value = str(rng.randint(10000, 99999))
        names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        q = (f"Find all variables that are assigned the value {value} in the text above. "
             f"Answer: the variables assigned {value} are:")
        return Sample(task, intro + _insert(hay, chain, rng) + "\n\n" + q, names, 30)
    if task == "freq_words":
        words = rng.sample(WORDS, 6)
        counts = [30, 20, 12, 4, 3, 2]
        bag = [w for w, c in zip(words, counts) for _ in range(c)]
        rng.shuffle(bag)
        q = ("Which three words from the list {" + ", ".join(sorted(words)) + "} appear most often in the text "
             "above? Answer: the three most frequent words are:")
        return Sample(task, intro + _insert(hay, bag, rng) + "\n\n" + q, words[:3], 16)
    if task == "doc_copy":
        pick = rng.randrange(len(hay) // 10, len(hay) - len(hay) // 10)
        words = hay[pick].split()
        head, tail = " ".join(words[:6]), " ".join(words[6:10])
        q = f'The text above contains a sentence starting with "{head}". Continue it exactly: {head}'
        return Sample(task, intro + " ".join(hay) + "\n\n" + q, [tail], 12)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def make_samples(tokenizer: Any, ctx: int, samples: int, tasks: tuple[str, ...] = TASKS, seed: int = 0) -> list[Sample]:
    """`samples` prompts per task, the same for every policy (seeded per task and sample)."""
    sents = _sentences(haystack_text())
    out = []
    for t, task in enumerate(tasks):
        for i in range(samples):
            out.append(make_sample(task, tokenizer, sents, ctx, random.Random(seed * 1_000_003 + t * 1009 + i)))
    return out


def score(answer: str, sample: Sample) -> float:
    """Share of the expected strings found in the answer (case-insensitive; doc_copy: its words in order)."""
    a = " ".join(answer.lower().split())
    if sample.task == "doc_copy":
        return float(" ".join(sample.answers[0].lower().split()) in a)
    return sum(x.lower() in a for x in sample.answers) / len(sample.answers)


@torch.inference_mode()
def run_policy(model: Any, tokenizer: Any, policy: Any, samples: list[Sample],
               make_cache: Callable[[Any, Any], Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Greedy answers through the policy's cache; mean score per task and the largest store in bytes."""
    from kvkit.integrations.hf import KVKitCache

    per: dict[str, list[float]] = {}
    kv_bytes = 0
    for s in tqdm(samples, desc=f"longctx {policy.name}", disable=not progress, leave=False):
        ids = tokenizer(s.prompt, return_tensors="pt").input_ids
        cache = make_cache(model, policy) if make_cache else KVKitCache(model, policy)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=s.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        per.setdefault(s.task, []).append(score(answer, s))
        kv_bytes = max(kv_bytes, cache.store.nbytes())
    return {"scores": {t: sum(v) / len(v) for t, v in per.items()}, "kv_bytes": kv_bytes,
            "prompt_tokens": len(tokenizer(samples[0].prompt).input_ids) if samples else 0}


def kept_tasks(dense_scores: dict[str, float], keep: float) -> tuple[list[str], dict[str, str]]:
    """Tasks dense scores at least `keep` on, and why each other one was dropped."""
    kept = [t for t, v in dense_scores.items() if v >= keep]
    dropped = {t: f"dense scores {v:.2f} < {keep}" for t, v in dense_scores.items() if v < keep}
    return kept, dropped


def main(argv: list[str] | None = None) -> int:
    from quality import parse_policy  # beside this script

    from kvkit import evaluate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, nargs="+", default=[2048])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--policies", nargs="+", default=["dense"])
    ap.add_argument("--keep", type=float, default=0.5, help="keep a task where dense scores at least this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="longctx")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.policies[0] != "dense":
        args.policies.insert(0, "dense")
    model, tok = evaluate.load(None)
    records, rows = [], []
    for ctx in args.ctx:
        samples = make_samples(tok, ctx, args.samples, tuple(args.tasks), args.seed)
        dense = None
        for spec in args.policies:
            label, policy = parse_policy(spec)
            res = run_policy(model, tok, policy, samples)
            dense = dense or res
            kept, dropped = kept_tasks(dense["scores"], args.keep)
            mean = sum(res["scores"][t] for t in kept) / len(kept) if kept else float("nan")
            records.append({"ctx": ctx, "policy": label, **res, "kept": kept, "dropped": dropped, "mean_kept": mean})
            rows.append([ctx, label, *(f"{res['scores'].get(t, float('nan')):.2f}" for t in args.tasks),
                         f"{mean:.2f}", f"{res['kv_bytes'] / 2**20:.1f} MiB"])
            header = ["ctx", "policy", *args.tasks, "mean (kept)", "KV bytes"]
            note = "\n\nDropped (dense below the bar): " + (", ".join(f"{t} ({w})" for t, w in dropped.items()) or "none")
            write_results(args.name, {"samples": args.samples, "keep": args.keep, "seed": args.seed, "rows": records},
                          f"long-context tasks (RULER-style, {args.samples} samples per task)",
                          markdown_table(header, rows) + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
