import pytest
import torch

from kvkit.moe.readme.calib import profile_dense, source_files, token_chunks
from kvkit.moe.readme.evaluate import recall
from kvkit.moe.readme.model import MoEConfig, ReadME
from kvkit.moe.readme.train import expert_mass, rank_targets, train_layer_routers, train_pregate


def test_source_splits_are_disjoint_and_cover():
    files = source_files("vim")
    a, b = source_files("vim:0/2"), source_files("vim:1/2")
    assert not set(a) & set(b) and sorted(a + b) == files
    with pytest.raises(ValueError, match="bad split"):
        source_files("vim:2/2")
    with pytest.raises(ValueError, match="unknown text source"):
        source_files("no-such-source")


def test_token_chunks_shape_and_skip(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    c = token_chunks(tok, "licenses", 64, 6)
    assert c.shape == (6, 64) and c.dtype == torch.long
    later = token_chunks(tok, "licenses", 64, 2, skip_chunks=4)
    assert later.shape == (2, 64)
    assert not any(torch.equal(row, first) for row in later for first in c[:4])


def test_rank_targets_and_recall():
    mass = torch.tensor([[0.1, 0.9, 0.5, 0.0]])
    assert rank_targets(mass, [1]).tolist() == [[0, 1, 0, 0]]
    assert rank_targets(mass, [1, 3]).tolist() == [[0.5, 1.0, 0.5, 0.0]]
    assert recall(torch.tensor([[1, 2]]), torch.tensor([[2, 3]])).tolist() == [0.5]
    assert recall(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3]])).tolist() == [1.0]


def test_routers_learn_the_oracle(tiny_llama, random_part):
    """Distilled on the dense profile, both routers beat chance against the oracle."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (16, 32), generator=gen)  # a small vocabulary: learnable
    prof = profile_dense(dense, ids, progress=False)
    assert prof.x.shape == (2, 512, 64) and prof.mass.shape == (2, 512, 96)
    cfg = MoEConfig(num_experts=4, top_k=2, pregate_window=2, pregate_width=64,
                    layer_router_hidden=32)
    part = random_part(2, 96, 4)
    moe = ReadME.from_dense(tiny_llama, cfg, part)
    emass = expert_mass(prof.mass, part[0])
    assert emass.shape == (2, 512, 4)
    with torch.no_grad():  # the profile's mass equals the MoE oracle's mass
        torch.testing.assert_close(moe.mlps[0].expert_mass(prof.x[0].float()), emass[0],
                                   atol=2e-2, rtol=2e-2)
    train_layer_routers(moe, prof.x, emass, [2], epochs=30, batch=128, progress=False)
    train_pregate(moe, ids, emass, [2], epochs=40, batch=4, lr=3e-3, progress=False)
    truth = emass.topk(2, -1).indices  # [L, N, 2]
    with torch.no_grad():
        layer_pred = torch.stack([m.router(prof.x[i].float()).topk(2, -1).indices
                                  for i, m in enumerate(moe.mlps)])
        pre_pred = moe.predict(ids, 2).flatten(0, 1).transpose(0, 1)
    assert recall(layer_pred, truth).mean() > 0.75  # chance is 0.5
    assert recall(pre_pred, truth).mean() > 0.6
    assert moe.routers_trained == ["layer", "pregate"]
