"""dense model -> profile -> co-activation experts -> routers: the whole Read-ME extraction."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kvkit.moe.readme.calib import Profile, profile_dense, token_chunks
from kvkit.moe.readme.extract import coactivation_partition, random_partition
from kvkit.moe.readme.model import MoEConfig, ReadME
from kvkit.moe.readme.train import expert_mass, train_layer_routers, train_pregate

logger = logging.getLogger(__name__)


def load_dense(base_model: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the dense base: safetensors only, no code from the folder runs."""
    from kvkit.models import load_causal_lm, load_tokenizer

    return load_causal_lm(str(base_model), dtype), load_tokenizer(str(base_model))


def calibrate(base_model: str | Path, source: str = "pydoc:0/2", num_chunks: int = 128,
              seq_len: int = 256, progress: bool = True) -> Profile:
    """Profile the dense model's MLPs on ``num_chunks`` x ``seq_len`` tokens of ``source``."""
    model, tok = load_dense(base_model)
    chunks = token_chunks(tok, source, seq_len, num_chunks)
    return profile_dense(model, chunks, progress=progress)


def partition(profile: Profile, config: MoEConfig, method: str = "coactivation",
              cluster_tokens: int = 4096, seed: int = 0,
              progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer experts: ([L, E, m], [L, s]). ``method``: coactivation | random."""
    from tqdm.auto import tqdm

    num_layers, n, inter = profile.mass.shape
    config.check(inter)
    if method not in ("coactivation", "random"):
        raise ValueError(f"unknown partition method {method!r}; use coactivation or random")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n, generator=gen)[:cluster_tokens]
    parts = []
    for i in tqdm(range(num_layers), desc="kvkit: extract experts", unit="layer",
                  disable=not progress):
        if method == "random":
            parts.append(random_partition(inter, config.num_experts, config.shared_neurons,
                                          seed=seed + i))
        else:
            parts.append(coactivation_partition(profile.mass[i, pick], config.num_experts,
                                                config.shared_neurons, seed=seed + i))
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


def extract(base_model: str | Path, config: MoEConfig, profile: Profile,
            ks: Sequence[int] | None = None, method: str = "coactivation",
            train_routers: bool = True, router_epochs: int = 4, pregate_epochs: int = 20,
            progress: bool = True) -> ReadME:
    """Build the MoE from a dense profile and distil both routers from the oracle.

    ``ks``: the top-k values the routers should serve (default: ``config.top_k`` only).
    """
    t0 = time.monotonic()
    part = partition(profile, config, method=method, progress=progress)
    moe = ReadME.from_dense(base_model, config, part)
    moe.meta.update({"partition": method, "calibration_tokens": int(profile.ids.numel()),
                     "extract_seconds": round(time.monotonic() - t0, 1)})
    if train_routers:
        ks = list(ks or [config.top_k])
        emass = expert_mass(profile.mass, part[0])  # [L, N, E]
        t1 = time.monotonic()
        if profile.x.shape[1]:
            train_layer_routers(moe, profile.x, emass, ks, epochs=router_epochs,
                                progress=progress)
        train_pregate(moe, profile.ids, emass, ks, epochs=pregate_epochs, progress=progress)
        moe.meta.update({"router_ks": ks, "router_train_seconds":
                         round(time.monotonic() - t1, 1)})
    moe.set_router(config.router)
    return moe
