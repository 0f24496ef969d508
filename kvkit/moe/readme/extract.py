"""Expert extraction: split each MLP's intermediate neurons into equal experts by co-activation.

Read-ME (arXiv:2410.19123) and MoEfication (arXiv:2110.01786) cut a dense FFN into experts so
that neurons that fire together sit together; then a token's output is carried by few experts.
Here a neuron is described by its contribution size over calibration tokens
(``|act(gate)*up| * ||down[:, j]||``, see ``calib.profile_dense``), normalised to unit length,
and the neurons are grouped by a balanced spherical k-means: every expert gets exactly
``(I - shared) / E`` neurons. Optionally the ``shared`` neurons with the largest mean mass are
taken out first and stay always on.

An expert is then the rows ``neurons[e]`` of gate/up and the columns ``neurons[e]`` of down.

Shapes: N tokens, I intermediate neurons, E experts, m = (I - s) / E neurons per expert.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def check_partition(neurons: torch.Tensor, shared: torch.Tensor, intermediate_size: int) -> None:
    """Raise ValueError unless ``neurons`` [E, m] and ``shared`` [s] split ``range(I)`` exactly."""
    if neurons.dim() != 2 or shared.dim() != 1:
        raise ValueError(f"neurons must be [E, m] and shared [s], got {list(neurons.shape)} "
                         f"and {list(shared.shape)}")
    every = torch.cat([neurons.reshape(-1), shared]).long()
    if every.numel() != intermediate_size or not torch.equal(
            torch.sort(every).values, torch.arange(intermediate_size)):
        raise ValueError(f"experts + shared neurons must cover each of the {intermediate_size} "
                         "neurons exactly once; the partition is corrupt")


def _balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row of ``sim`` [n, E] to one column, each column taking exactly ``capacity``.

    Greedy by rounds: every free neuron asks its best open expert; an over-asked expert keeps the
    ``capacity`` left neurons that like it most and closes; the rest ask again.
    """
    n, e = sim.shape
    assert n == e * capacity
    assign = torch.full((n,), -1, dtype=torch.long)
    left = torch.full((e,), capacity, dtype=torch.long)
    sim = sim.clone()
    while (assign < 0).any():
        free = (assign < 0).nonzero().squeeze(1)
        choice = sim[free].argmax(dim=1)  # [n_free]
        for c in choice.unique().tolist():
            cand = free[choice == c]
            take = cand if cand.numel() <= left[c] else cand[
                sim[cand, c].topk(int(left[c])).indices]
            assign[take] = c
            left[c] -= take.numel()
            if left[c] == 0:
                sim[:, c] = float("-inf")
    return assign


def coactivation_partition(mass: torch.Tensor, num_experts: int, shared_neurons: int = 0,
                           iters: int = 25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced co-activation clustering of one layer's neurons.

    Args:
        mass: [N, I] per-token neuron contribution (non-negative).
        num_experts: E; must divide ``I - shared_neurons``.
        shared_neurons: s neurons (largest mean mass) kept out of the experts, always on.
    Returns:
        ``neurons`` [E, m] (sorted within each expert) and ``shared`` [s], both int64.
    Raises:
        ValueError: E does not divide ``I - s``, or s out of range.
    """
    n_tok, inter = mass.shape
    m = check_sizes(inter, num_experts, shared_neurons)
    mass = mass.float()
    order = mass.mean(dim=0).argsort(descending=True)
    shared = order[:shared_neurons].sort().values
    routed = order[shared_neurons:].sort().values  # [I - s]
    feats = mass[:, routed].T  # [I - s, N]
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gen = torch.Generator().manual_seed(seed)
    cent = feats[torch.randperm(feats.shape[0], generator=gen)[:num_experts]]  # [E, N]
    assign = None
    for _ in range(iters):
        new = _balanced_assign(feats @ cent.T, m)  # [I - s]
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        cent = torch.stack([feats[assign == e].mean(0) for e in range(num_experts)])
        cent = cent / cent.norm(dim=1, keepdim=True).clamp_min(1e-12)
    neurons = torch.stack([routed[assign == e].sort().values for e in range(num_experts)])
    return neurons, shared


def random_partition(inter: int, num_experts: int, shared_neurons: int = 0,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: neurons dealt to experts at random (shared = the first s of a permutation)."""
    m = check_sizes(inter, num_experts, shared_neurons)
    perm = torch.randperm(inter, generator=torch.Generator().manual_seed(seed))
    shared = perm[:shared_neurons].sort().values
    neurons = perm[shared_neurons:].reshape(num_experts, m).sort(dim=1).values
    return neurons, shared


def check_sizes(inter: int, num_experts: int, shared_neurons: int) -> int:
    """Validate E and s against the width I; return m, the neurons per expert."""
    if not 0 <= shared_neurons < inter:
        raise ValueError(f"shared_neurons must be in [0, {inter}), got {shared_neurons}")
    if num_experts < 1 or (inter - shared_neurons) % num_experts:
        divisors = [d for d in range(1, 129) if (inter - shared_neurons) % d == 0]
        raise ValueError(
            f"num_experts={num_experts} must divide the {inter - shared_neurons} routed neurons "
            f"(intermediate {inter} - shared {shared_neurons}); try one of {divisors}")
    return (inter - shared_neurons) // num_experts
