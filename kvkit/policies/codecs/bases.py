"""CSKV bases files: what `kvkit.tools.calibrate_cskv` writes and `CSKVCodec` reads.

A bases file is safetensors (never pickle) holding, per layer and KV head, the channel means,
the encoder/decoder matrices and the energy per channel of K and V, validated on load.

Shapes: L layers, H KV heads, D head_dim.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT_VERSION = "1"
KEYS = ("k_mean", "v_mean", "k_enc", "v_enc", "k_dec", "v_dec", "k_energy", "v_energy")


def save_bases(bases: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write bases as safetensors (fp16 matrices, fp32 means/energies) with string metadata."""
    from safetensors.torch import save_file
    tensors = {k: (v.half() if k.endswith(("enc", "dec")) else v.float()).contiguous() for k, v in bases.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT_VERSION, **metadata})
    os.replace(tmp, path)


def load_bases(path: str | Path) -> dict[str, torch.Tensor]:
    """Read and validate a bases file (safetensors: never pickle). Tensors come back float32.

    Raises:
        ValueError: a missing key, a wrong shape or a non-finite value.
    """
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSKV bases file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: CSKV bases format {meta.get('format')!r}, expected {FORMAT_VERSION!r}")
        missing = [k for k in KEYS if k not in f.keys()]
        if missing:
            raise ValueError(f"{path}: CSKV bases file lacks {missing}; it must hold {list(KEYS)}")
        out = {k: f.get_tensor(k).float() for k in KEYS}
    L, H, D = out["k_mean"].shape
    for k, t in out.items():
        want = (L, H, D, D) if k.endswith(("enc", "dec")) else (L, H, D)
        if tuple(t.shape) != want:
            raise ValueError(f"{path}: {k} has shape {list(t.shape)}, expected {list(want)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: {k} holds non-finite values")
    return out
