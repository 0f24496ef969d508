import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvkit.moe.readme.extract import (check_partition, check_sizes, coactivation_partition,
                                      random_partition)


@settings(max_examples=25, deadline=None)
@given(inter=st.sampled_from([24, 48, 96]), num_experts=st.sampled_from([1, 2, 3, 4, 6, 8]),
       shared=st.sampled_from([0, 0, 12]), seed=st.integers(0, 10))
def test_coactivation_partition_is_a_balanced_partition(inter, num_experts, shared, seed):
    if (inter - shared) % num_experts:
        with pytest.raises(ValueError, match="must divide"):
            coactivation_partition(torch.rand(16, inter), num_experts, shared)
        return
    gen = torch.Generator().manual_seed(seed)
    mass = torch.rand(64, inter, generator=gen) ** 4
    neurons, sh = coactivation_partition(mass, num_experts, shared, seed=seed)
    m = (inter - shared) // num_experts
    assert neurons.shape == (num_experts, m) and sh.shape == (shared,)
    check_partition(neurons, sh, inter)  # every neuron exactly once
    # shared neurons are the ones with the largest mean mass
    assert set(sh.tolist()) == set(mass.mean(0).argsort(descending=True)[:shared].tolist())


def test_coactivation_groups_neurons_that_fire_together():
    # 4 planted groups of 6 neurons, each group active on its own quarter of the tokens
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(24, generator=gen)
    mass = torch.rand(80, 24, generator=gen) * 0.05
    for g in range(4):
        mass[g * 20:(g + 1) * 20, perm[g * 6:(g + 1) * 6]] += 1.0
    neurons, _ = coactivation_partition(mass, 4)
    found = {frozenset(row.tolist()) for row in neurons}
    assert found == {frozenset(perm[g * 6:(g + 1) * 6].tolist()) for g in range(4)}


def test_random_partition_is_a_partition():
    neurons, shared = random_partition(1536, 32, 0, seed=3)
    check_partition(neurons, shared, 1536)
    assert neurons.shape == (32, 48)


def test_check_partition_rejects_duplicates():
    neurons = torch.arange(8).reshape(2, 4)
    neurons[1, 0] = 0
    with pytest.raises(ValueError, match="exactly once"):
        check_partition(neurons, torch.empty(0, dtype=torch.long), 8)


@pytest.mark.parametrize("inter,e,s,match", [(1536, 7, 0, "must divide"),
                                               (1536, 0, 0, "must divide"),
                                               (1536, 8, 1536, "shared_neurons"),
                                               (1536, 8, -1, "shared_neurons")])
def test_bad_sizes_raise(inter, e, s, match):
    with pytest.raises(ValueError, match=match):
        check_sizes(inter, e, s)
