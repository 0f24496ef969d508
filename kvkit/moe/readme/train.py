"""Router distillation from the oracle, and light fine-tuning of the experts.

Both routers learn the oracle's ranking of experts (activation mass of the dense FFN on the
calibration text). The target of expert e is ``mean_k [rank(e) < k]`` over the top-k values the
router will serve (``ks``), trained with binary cross-entropy: for one k it is the usual multi-hot
top-k label; for several it grades experts by rank, so one router serves a whole top-k curve.

Fine-tuning (Read-ME fine-tunes too) trains the expert weights only, under the routing in use,
to match the dense model's next-token distribution (KL to the dense logits on calibration text).

Shapes: L layers, N tokens, C chunks of T tokens, H hidden, I intermediate, E experts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvkit.moe.readme.model import ReadME

logger = logging.getLogger(__name__)


def expert_mass(mass: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """Per-expert oracle mass from per-neuron mass: [L, N, I] x [L, E, m] -> [L, N, E]."""
    return torch.stack([mass[i][:, neurons[i]].float().sum(-1) for i in range(mass.shape[0])])


def rank_targets(emass: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Soft labels ``mean_k [rank < k]`` from expert masses [..., E] (same shape, float)."""
    rank = emass.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = largest mass
    return torch.stack([(rank < k).float() for k in ks]).mean(0)


def train_layer_routers(moe: ReadME, x: torch.Tensor, emass: torch.Tensor, ks: Sequence[int],
                        epochs: int = 4, batch: int = 1024, lr: float = 3e-3,
                        seed: int = 0, progress: bool = True) -> list[float]:
    """Distil each layer's router from the oracle: x [L, N, H] (MLP inputs), emass [L, N, E].

    Returns the final training loss per layer.
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    losses = []
    for i, mlp in enumerate(tqdm(moe.mlps, desc="kvkit: per-layer routers", unit="layer",
                                 disable=not progress)):
        router = mlp.router.float().train()
        xs, ys = x[i].float(), rank_targets(emass[i], ks)
        opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=1e-4)
        loss = torch.tensor(0.0)
        for _ in range(epochs):
            for b in torch.randperm(xs.shape[0], generator=gen).split(batch):
                loss = nn.functional.binary_cross_entropy_with_logits(router(xs[b]), ys[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        router.eval()
        losses.append(loss.item())
    if "layer" not in moe.routers_trained:
        moe.routers_trained.append("layer")
    return losses


def train_pregate(moe: ReadME, ids: torch.Tensor, emass: torch.Tensor, ks: Sequence[int],
                  epochs: int = 20, batch: int = 8, lr: float = 1e-3, seed: int = 0,
                  progress: bool = True) -> float:
    """Distil the pre-gating router from the oracle of every layer.

    ids: [C, T] calibration chunks; emass: [L, C*T, E] oracle expert masses on those tokens.
    Returns the final training loss.
    """
    from tqdm.auto import tqdm

    c, t = ids.shape
    num_layers = emass.shape[0]
    ys = rank_targets(emass, ks).reshape(num_layers, c, t, -1).permute(1, 2, 0, 3)  # [C,T,L,E]
    with torch.no_grad():
        emb = moe.model.model.embed_tokens(ids).float()  # [C, T, H], the frozen input
    router = moe.pregate.float().train()
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=1e-2)
    total = epochs * ((c + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc="kvkit: pre-gating router", unit="step", disable=not progress)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        for b in torch.randperm(c, generator=gen).split(batch):
            loss = nn.functional.binary_cross_entropy_with_logits(router(emb[b]), ys[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    router.eval()
    if "pregate" not in moe.routers_trained:
        moe.routers_trained.append("pregate")
    return loss.item()


def finetune_experts(moe: ReadME, teacher: PreTrainedModel, ids: torch.Tensor,
                     seconds: float = 300.0, batch: int = 2, lr: float = 5e-5,
                     max_steps: int = 10_000, seed: int = 0, progress: bool = True) -> dict:
    """Train the expert (and shared) weights under the current routing to match ``teacher``.

    Loss: KL(teacher || moe) of next-token distributions on ``ids`` [C, T]. Stops after
    ``seconds`` of wall-clock or ``max_steps``. Marks the expert weights as changed (``save``
    then stores them). Returns {"steps", "seconds", "tokens", "loss_first", "loss_last"}.
    """
    from tqdm.auto import tqdm

    params = [p for mlp in moe.mlps for n, p in mlp.named_parameters()
              if not n.startswith("router.")]
    for p in moe.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    start, steps, losses = time.monotonic(), 0, []
    bar = tqdm(total=max_steps, desc="kvkit: fine-tune experts", unit="step",
               disable=not progress)
    moe.model.train()
    try:
        while steps < max_steps and time.monotonic() - start < seconds:
            b = torch.randint(0, ids.shape[0], (batch,), generator=gen)
            with torch.no_grad():
                ref = torch.log_softmax(teacher(input_ids=ids[b]).logits.float(), -1)
            out = torch.log_softmax(moe.model(input_ids=ids[b]).logits.float(), -1)
            loss = nn.functional.kl_div(out.flatten(0, 1), ref.flatten(0, 1), log_target=True,
                                        reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
    finally:
        bar.close()
        moe.model.eval()
        for p in moe.model.parameters():
            p.requires_grad_(False)
    moe.expert_weights_changed = True
    return {"steps": steps, "seconds": time.monotonic() - start,
            "tokens": steps * batch * ids.shape[1],
            "loss_first": losses[0] if losses else None,
            "loss_last": sum(losses[-10:]) / max(1, len(losses[-10:]))}
