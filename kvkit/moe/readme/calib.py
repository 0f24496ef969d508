"""Text that ships with the machine, cut into token chunks, and the dense profile of the MLPs.

Sources (no download), the defaults first: ``pydoc`` (Python's language reference from
``pydoc_data.topics``, one text per topic: English technical prose that ships with CPython),
``kvkit`` (the texts shipped in ``kvkit/data``: the Apache-2.0 license, English legal prose) and
``stdlib`` (Python's own standard-library sources, code); where a Debian image has them, also
``vim`` (``/usr/share/vim/vim*/doc/*.txt``) and ``licenses`` (``/usr/share/common-licenses/*``).
kvkit calibrates on one source and evaluates on another (``pydoc:0/2`` vs ``pydoc:1/2``).

The profile is what extraction and router training need from one dense pass: per layer, the
MLP input ``x`` and the per-neuron contribution ``|act(gate) * up| * ||down[:, j]||``.

Shapes: N tokens, L layers, H hidden, I intermediate (1536 for SmolLM2).
"""

from __future__ import annotations

import glob
import logging
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def source_files(source: str) -> list[Path]:
    """The files of a named text source, sorted. A path to a file or folder also works.

    ``name:i/n`` keeps every n-th file starting at i (``vim:0/2`` and ``vim:1/2`` are disjoint
    halves: calibrate on one, evaluate on the other).

    Raises:
        ValueError: unknown source name and not an existing path, or a source with no files.
    """
    name, _, split = source.partition(":")
    if split and name in ("vim", "licenses", "stdlib", "kvkit"):
        i, n = _split(split, source)
        return source_files(name)[i::n]
    if source == "kvkit":
        files = glob.glob(str(Path(__file__).resolve().parents[2] / "data" / "*.txt"))
    elif source == "vim":
        files = glob.glob("/usr/share/vim/vim*/doc/*.txt")
    elif source == "licenses":
        files = glob.glob("/usr/share/common-licenses/*")
    elif source == "stdlib":
        files = glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))
    elif os.path.isdir(source):
        files = [str(p) for p in Path(source).rglob("*") if p.is_file()]
    elif os.path.isfile(source):
        files = [source]
    else:
        raise ValueError(f"unknown text source {source!r}; use pydoc, kvkit, stdlib, vim, licenses, "
                         "or a file/folder path")
    files = sorted(f for f in files if os.path.isfile(f))
    if not files:
        raise ValueError(f"text source {source!r} has no files on this machine")
    return [Path(f) for f in files]


def _split(split: str, source: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in split.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise ValueError(f"bad split {split!r} in {source!r}; use name:i/n with 0 <= i < n") from None
    return i, n


def source_texts(source: str) -> list[str]:
    """The texts of ``source``: ``pydoc`` (``pydoc:i/n``) is Python's language reference, one text
    per distinct topic in name order; any other source is its ``source_files`` read as UTF-8.

    Raises:
        ValueError: as ``source_files``, or a Python built without ``pydoc_data``.
    """
    name, _, split = source.partition(":")
    if name != "pydoc":
        return [f.read_text(encoding="utf-8", errors="replace") for f in source_files(source)]
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ValueError("text source 'pydoc' needs Python's pydoc_data, which this Python lacks; "
                         "use kvkit, stdlib or a file/folder path") from None
    i, n = _split(split, source) if split else (0, 1)
    unique = dict.fromkeys(topics[k] for k in sorted(topics))  # two topics share one text
    return list(unique)[i::n]


def token_chunks(tokenizer: PreTrainedTokenizerBase, source: str, seq_len: int,
                 num_chunks: int, skip_chunks: int = 0) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens spread over the files of ``source``.

    Each file gives at most ``ceil((skip + num) / files)`` consecutive windows from its start, so
    the chunks cover many files; ``skip_chunks`` drops that many first (a disjoint split of the
    same source). Returns ``[num_chunks, seq_len]`` int64 (fewer rows if the source is short).
    """
    if seq_len < 2 or num_chunks < 1:
        raise ValueError(f"need seq_len >= 2 and num_chunks >= 1, got {seq_len}, {num_chunks}")
    texts = source_texts(source)
    want = skip_chunks + num_chunks
    per_file = max(1, math.ceil(want / len(texts)))
    chunks: list[torch.Tensor] = []
    for rnd in range(64):  # more rounds from each file when the source has few files
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            start = rnd * per_file * seq_len
            for j in range(per_file):
                lo = start + j * seq_len
                if lo + seq_len > len(ids):
                    break
                chunks.append(torch.tensor(ids[lo:lo + seq_len], dtype=torch.long))
            if len(chunks) >= want:
                break
        if len(chunks) >= want:
            break
    out = chunks[skip_chunks:want]
    if not out:
        raise ValueError(f"text source {source!r} is shorter than one chunk of {seq_len} tokens")
    if len(out) < num_chunks:
        logger.warning("source %s gave %d chunks of %d tokens, %d asked", source, len(out),
                       seq_len, num_chunks)
    return torch.stack(out)


@dataclass
class Profile:
    """Dense MLP statistics on calibration tokens (float16 to halve memory).

    x:    [L, N, H]  input of each layer's MLP (after the post-attention norm)
    mass: [L, N, I]  |act(gate) * up| * ||down[:, j]||, each neuron's contribution size
    ids:  [C, T]     the token chunks (N = C * T)
    """
    x: torch.Tensor
    mass: torch.Tensor
    ids: torch.Tensor


def down_norms(mlp: torch.nn.Module) -> torch.Tensor:
    """``||down_proj.weight[:, j]||`` for each intermediate neuron j: [I]."""
    return mlp.down_proj.weight.detach().float().norm(dim=0)


@torch.no_grad()
def profile_dense(model: PreTrainedModel, chunks: torch.Tensor, batch_size: int = 4,
                  keep_x: bool = True, progress: bool = True) -> Profile:
    """Run the dense model over ``chunks`` [C, T] and record each MLP's input and neuron mass."""
    from tqdm.auto import tqdm

    layers = model.model.layers
    num_layers, (c, t) = len(layers), chunks.shape
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    n = c * t
    x_all = torch.empty(num_layers, n if keep_x else 0, hidden, dtype=torch.float16)
    mass_all = torch.empty(num_layers, n, inter, dtype=torch.float16)
    norms = [down_norms(layer.mlp) for layer in layers]
    pos = [0]

    def hook(idx: int):
        def fn(mlp, args):
            x = args[0].reshape(-1, hidden).float()  # [n_b, H]
            h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # [n_b, I]
            lo = pos[0]
            if keep_x:
                x_all[idx, lo:lo + x.shape[0]] = x.half()
            mass_all[idx, lo:lo + x.shape[0]] = (h.abs() * norms[idx]).half()
        return fn

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for b in tqdm(range(0, c, batch_size), desc="kvkit: dense profile", unit="batch",
                      disable=not progress):
            ids = chunks[b:b + batch_size]
            model.model(input_ids=ids)  # the backbone only: the LM head is not needed here
            pos[0] += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return Profile(x=x_all, mass=mass_all, ids=chunks)
