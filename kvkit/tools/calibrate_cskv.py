"""Calibration of CSKV's low-rank channel bases on a model's own activations.

CSKV (arXiv:2409.10593) caches keys and values in a low-rank channel space. Projecting onto the
singular vectors of the K/V projection *weights* loses far more on SmolLM2 (bench/results/NOTES.md,
"CSKV"), so the bases here come from activations: the model runs on
text *other than* the evaluation text (Python standard-library sources by default) and, per
layer and KV head, we keep

- the mean of the post-RoPE keys (values), and
- an eigenbasis of their covariance in a *weighted* metric: for keys the metric is the second
  moment of the queries that read them, `E[q q^T]` over the query heads of the group, so the
  basis minimises the error of the attention logits `q.k` rather than of `k`; for values it is
  `sum_j W_o[j]^T W_o[j]` over the group's blocks of `o_proj`, so it minimises the error the
  values put into the layer output. This is the closed-form, per-token stand-in for CSKV's
  reconstruction fine-tuning.

RoPE: kvkit caches keys after RoPE, so keys are calibrated after RoPE too (positions 0..chunk).

For a metric `M = C^{1/2}` and a vector `x`: `c = E (x - mean)` with `E = W^T M` (the top rows
kept), `x_hat = mean + D c` with `D = M^{-1} W` (the first columns kept). The file stores the
full `E`, `D` and eigenvalues, so any rank can be cut from it later.

File format (safetensors, no pickle): `k_mean`, `v_mean` `[L, H, D]`; `k_enc`, `v_enc`
`[L, H, D, D]` (row i = i-th encoder direction); `k_dec`, `v_dec` `[L, H, D, D]` (column i);
`k_energy`, `v_energy` `[L, H, D]` descending; metadata: model, text, tokens, format version.

Shapes: L layers, H KV heads, G query heads per KV head, D head_dim, T tokens.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path

import torch

from kvkit.evaluate import load
from kvkit.policies.codecs.bases import save_bases

logger = logging.getLogger(__name__)

DEFAULT_FILES = ("argparse.py", "collections/__init__.py", "json/decoder.py", "textwrap.py",
                 "logging/__init__.py", "inspect.py", "typing.py", "dataclasses.py")


PROSE_CHUNKS = 4  # chunks of ~12K characters of prose, each followed by one of code


def reference_text() -> str:
    """English technical prose found on any CPython: the language reference topics that
    `pydoc` ships (`pydoc_data.topics`), in a fixed order; empty where a distribution strips it."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return ""
    return "\n\n".join(topics[name] for name in sorted(topics))


def calibration_text(max_chars: int = 400_000) -> str:
    """English prose and code, other text than the license text used for evaluation: Python's
    language reference (`reference_text`) interleaved with standard-library sources. Both come
    with Python itself, so the text is the same on every machine with the same Python."""
    prose, code = reference_text(), stdlib_text(max_chars)
    parts = []
    for i in range(PROSE_CHUNKS if prose else 0):  # ~one chunk of prose, then ~one of code, ...
        parts += [prose[i * 12_000:(i + 1) * 12_000], code[i * 12_000:(i + 1) * 12_000]]
    return ("\n\n".join(parts) or code)[:max_chars]


def stdlib_text(max_chars: int = 400_000) -> str:
    """Python standard-library sources (other text than the GPL used for evaluation)."""
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in DEFAULT_FILES:
        p = root / name
        if p.is_file():
            parts.append(p.read_text(errors="replace"))
    if not parts:  # an unusual layout: take any .py files
        parts = [Path(p).read_text(errors="replace") for p in sorted(glob.glob(str(root / "*.py")))[:8]]
    return "\n\n".join(parts)[:max_chars]


def _sqrtm(c: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root and its inverse of `c + ridge * mean(diag) * I` (float64)."""
    d = c.shape[-1]
    c = c + ridge * c.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(d, dtype=c.dtype)
    w, u = torch.linalg.eigh(c)
    w = w.clamp(min=1e-12)
    return (u * w.sqrt()[..., None, :]) @ u.transpose(-1, -2), (u * w.rsqrt()[..., None, :]) @ u.transpose(-1, -2)


def _basis(sum_x: torch.Tensor, sum_xx: torch.Tensor, n: int, metric: torch.Tensor | None,
           ridge: float) -> dict[str, torch.Tensor]:
    """Mean, encoder, decoder, energy of one (layer, head) from running sums (float64)."""
    mean = sum_x / n
    cov = sum_xx / n - torch.outer(mean, mean)
    d = cov.shape[0]
    if metric is None:
        m, m_inv = torch.eye(d, dtype=cov.dtype), torch.eye(d, dtype=cov.dtype)
    else:
        m, m_inv = _sqrtm(metric, ridge)
    w, u = torch.linalg.eigh(m @ cov @ m)  # ascending
    w, u = w.flip(-1).clamp(min=0), u.flip(-1)
    return {"mean": mean, "enc": u.T @ m, "dec": m_inv @ u, "energy": w}


@torch.inference_mode()
def calibrate(model, tokenizer=None, text: str | None = None, chunk_tokens: int = 2048,
              max_chunks: int = 4, weighted: bool = True, ridge: float = 1e-3,
              progress: bool = True, ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Run `model` on `text` (or token `ids` `[T]`) and return CSKV bases (layout: module docstring).

    The model must be a Llama-like transformers model; its attention is routed through a
    capturing wrapper of SDPA for the duration of the call.
    """
    from tqdm.auto import tqdm
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    cfg = model.config
    L, Hq = cfg.num_hidden_layers, cfg.num_attention_heads
    H = cfg.num_key_value_heads or Hq
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // Hq
    G = Hq // H
    f64 = torch.float64
    sums = {n: torch.zeros(L, H, *s, dtype=f64) for n, s in
            (("k", (D,)), ("kk", (D, D)), ("v", (D,)), ("vv", (D, D)), ("qq", (D, D)))}
    count = [0]

    def capture(module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        q = query[0].to(f64).reshape(H, G, -1, D)  # [H, G, T, D]
        k, v = key[0].to(f64), value[0].to(f64)     # [H, T, D]
        sums["k"][layer] += k.sum(1)
        sums["kk"][layer] += k.transpose(1, 2) @ k
        sums["v"][layer] += v.sum(1)
        sums["vv"][layer] += v.transpose(1, 2) @ v
        qf = q.reshape(H, -1, D)
        sums["qq"][layer] += qf.transpose(1, 2) @ qf / G
        if layer == 0:
            count[0] += k.shape[1]
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    if ids is None:
        text = text if text is not None else calibration_text()
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    chunks = [ids[i:i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)]
    chunks = [c for c in chunks if len(c) == chunk_tokens][:max_chunks] or chunks[:1]
    AttentionInterface.register("kvkit_calibrate", capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation("kvkit_calibrate")
    try:
        for c in tqdm(chunks, desc="kvkit: calibrating CSKV bases", disable=not progress):
            model(c[None], use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    n = count[0]
    # value metric: sum over the group's query heads of W_o[j]^T W_o[j], per layer
    out = {key: torch.zeros(L, H, *s, dtype=torch.float32) for key, s in
           (("k_mean", (D,)), ("v_mean", (D,)), ("k_enc", (D, D)), ("v_enc", (D, D)),
            ("k_dec", (D, D)), ("v_dec", (D, D)), ("k_energy", (D,)), ("v_energy", (D,)))}
    for layer in range(L):
        w_o = model.model.layers[layer].self_attn.o_proj.weight.detach().to(f64)  # [hidden, Hq*D]
        for h in range(H):
            wv = sum(w_o[:, j * D:(j + 1) * D].T @ w_o[:, j * D:(j + 1) * D]
                     for j in range(h * G, (h + 1) * G))
            kb = _basis(sums["k"][layer, h], sums["kk"][layer, h], n,
                        sums["qq"][layer, h] / n if weighted else None, ridge)
            vb = _basis(sums["v"][layer, h], sums["vv"][layer, h], n, wv if weighted else None, ridge)
            for pre, b in (("k", kb), ("v", vb)):
                for name, t in b.items():
                    out[f"{pre}_{name}"][layer, h] = t.float()
    return out


def main() -> None:  # python -m kvkit.tools.calibrate_cskv OUT.safetensors
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--chunk-tokens", type=int, default=2048)
    ap.add_argument("--max-chunks", type=int, default=4)
    ap.add_argument("--unweighted", action="store_true", help="plain PCA of the activations")
    ap.add_argument("--text", choices=("mixed", "stdlib"), default="mixed")
    args = ap.parse_args()
    model, tok = load()
    text = calibration_text() if args.text == "mixed" else stdlib_text()
    bases = calibrate(model, tok, text=text, chunk_tokens=args.chunk_tokens, max_chunks=args.max_chunks,
                      weighted=not args.unweighted)
    what = ("python language reference (pydoc_data.topics) + " if args.text == "mixed" else "") + \
        "python stdlib " + ",".join(DEFAULT_FILES)
    save_bases(bases, args.out, {"model": "SmolLM2-135M-Instruct", "text": what,
                                 "weighted": str(not args.unweighted), "chunks": str(args.max_chunks),
                                 "chunk_tokens": str(args.chunk_tokens)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
