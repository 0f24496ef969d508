import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvkit.moe.readme.model import MoEConfig, ReadME

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture
def build(random_part):
    return lambda *a, **kw: _build(random_part, *a, **kw)


def _build(random_part, path, num_experts=4, top_k=2, shared=0, router="oracle", seed=0):
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, shared_neurons=shared, router=router,
                    pregate_window=3, pregate_width=32, layer_router_hidden=16)
    torch.manual_seed(seed)
    return ReadME.from_dense(path, cfg, random_part(2, 96, num_experts, shared, seed))


def ids(n=24, batch=2, seed=0):
    return torch.randint(0, 1000, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_experts,shared", [(4, 0), (8, 0), (4, 32), (1, 0)])
def test_all_experts_active_equals_dense_logits(tiny_llama, num_experts, shared, build):
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    moe = build(tiny_llama, num_experts, 1, shared)
    x = ids()
    with torch.no_grad():
        ref = dense(x).logits
        moe.set_router("all")
        out_all = moe.model(x).logits
        for mode in ("oracle", "layer", "pregate"):  # top-k = E: every router keeps all experts
            moe.set_router(mode, num_experts)
            torch.testing.assert_close(moe.model(x).logits, ref, **TOL)
    torch.testing.assert_close(out_all, ref, **TOL)


def test_smollm2_all_experts_active_equals_dense_logits(random_part):
    """The real model (2 of its 30 layers, to stay fast): experts cut from it sum back to it."""
    from kvkit.models import smollm2

    path = smollm2()
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    dense.model.layers = dense.model.layers[:2]
    dense.config.num_hidden_layers = 2
    x = ids(16, 1)
    with torch.no_grad():
        ref = dense(x).logits
    cfg = MoEConfig(num_experts=8, top_k=8, shared_neurons=64)
    moe = ReadME(dense, cfg, str(path), random_part(2, 1536, 8, 64))
    with torch.no_grad():
        torch.testing.assert_close(moe.model(x).logits, ref, **TOL)
        moe.set_router("oracle", 4)  # half the experts: not dense any more
        assert (moe.model(x).logits - ref).abs().max() > 1e-2


@pytest.mark.parametrize("shared", [0, 16])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_sparse_compute_equals_masked_dense(tiny_llama, shared, top_k, build):
    moe = build(tiny_llama, 4, top_k, shared)
    mlp = moe.mlps[0]
    x = torch.randn(37, 64)
    gen = torch.Generator().manual_seed(top_k)
    idx = torch.stack([torch.randperm(4, generator=gen)[:top_k] for _ in range(37)])
    idx[:5] = idx[0]  # some experts get many tokens, some none
    with torch.no_grad():
        torch.testing.assert_close(mlp.experts_forward(x, idx), mlp.masked_forward(x, idx),
                                   **TOL)


@pytest.mark.parametrize("mode", ["oracle", "layer", "pregate"])
@pytest.mark.parametrize("top_k", [1, 3])
def test_router_never_picks_more_than_top_k(tiny_llama, mode, top_k, build):
    moe = build(tiny_llama, 4, top_k)
    moe.set_router(mode)
    for mlp in moe.mlps:
        mlp.record = True
    with torch.no_grad():
        moe.model(ids())
    for mlp in moe.mlps:
        r = mlp.last_routing
        assert r.shape == (48, top_k)
        assert r.min() >= 0 and r.max() < 4
        assert (r.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts


def test_oracle_picks_largest_mass(tiny_llama, build):
    moe = build(tiny_llama, 4, 2)
    mlp = moe.mlps[1]
    x = torch.randn(10, 64)
    with torch.no_grad():
        mass = mlp.expert_mass(x)
        assert torch.equal(mlp.route(x).sort(-1).values,
                           mass.topk(2, -1).indices.sort(-1).values)
        # the mass of an expert bounds the norm of its output contribution
        one = torch.zeros(10, 1, dtype=torch.long)
        assert (mlp.experts_forward(x, one).norm(dim=-1) <= mass[:, 0] + 1e-5).all()


def test_pregate_decode_matches_full_sequence(tiny_llama, build):
    """The pre-gating router keeps its window across decode steps: cached decode routes (and
    scores) every token as the full-sequence forward does."""
    moe = build(tiny_llama, 4, 2, router="pregate")
    x = ids(12, 1)
    with torch.no_grad():
        full = moe.model(x).logits
        out = moe.model(x[:, :5], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(5, 12):
            out = moe.model(x[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)
    gen = moe.model.generate(x[:, :6], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 10)


def test_pregate_predict_matches_routing_used(tiny_llama, build):
    moe = build(tiny_llama, 4, 2, router="pregate")
    x = ids(10, 1)
    for mlp in moe.mlps:
        mlp.record = True
    with torch.no_grad():
        moe.model(x)
    pred = moe.predict(x)[0]  # [T, L, k]
    for i, mlp in enumerate(moe.mlps):
        assert torch.equal(mlp.last_routing, pred[:, i])


@pytest.mark.parametrize("changed", [False, True])
def test_save_load_round_trip(tiny_llama, tmp_path, changed, build):
    moe = build(tiny_llama, 4, 2, shared=16, router="pregate")
    torch.manual_seed(1)
    with torch.no_grad():  # non-default router weights, and maybe fine-tuned experts
        for p in moe.pregate.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for mlp in moe.mlps:
            for p in mlp.router.parameters():
                p.add_(torch.randn_like(p))
            if changed:
                mlp.w_up.mul_(1.5)
                mlp.s_down.mul_(0.5)
    moe.expert_weights_changed = changed
    moe.routers_trained = ["layer", "pregate"]
    moe.meta["note"] = "round trip"
    moe.save(tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "readme_config.json").read_text())
    assert doc["expert_weights"] == ("stored" if changed else "base")
    back = ReadME.load(tmp_path / "m")
    assert back.config == moe.config and back.meta["note"] == "round trip"
    x = ids()
    for mode in ("oracle", "layer", "pregate", "all"):
        moe.set_router(mode)
        back.set_router(mode)
        with torch.no_grad():
            torch.testing.assert_close(back.model(x).logits, moe.model(x).logits, atol=0, rtol=0)
    assert back.active_params() == moe.active_params()


def test_active_params(tiny_llama, build):
    moe = build(tiny_llama, 4, 2, shared=16)
    p = moe.active_params()
    per_layer_neuron = 3 * 64
    assert p["ffn_dense"] == 2 * 96 * per_layer_neuron
    assert p["ffn_active"] == 2 * (16 + 2 * 20) * per_layer_neuron
    assert p["total_active"] < p["total_dense"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=4, top_k=5), "top_k must be in"),
    (dict(num_experts=4, top_k=0), "top_k must be in"),
    (dict(num_experts=0, top_k=1), "num_experts must be"),
    (dict(router="magic"), "unknown router"),
    (dict(shared_neurons=-1), "shared_neurons"),
    (dict(pregate_window=0), "pregate_window"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kwargs)


def test_experts_must_divide_width(tiny_llama, random_part):
    with pytest.raises(ValueError, match="must divide the 96 routed neurons"):
        MoEConfig(num_experts=5, top_k=2).check(96)
    with pytest.raises(ValueError, match="must divide"):
        ReadME.from_dense(tiny_llama, MoEConfig(num_experts=5, top_k=2),
                          random_part(2, 96, 4))
    assert MoEConfig(num_experts=32, top_k=24).active_fraction(1536) == 0.75


def test_bad_partition_and_router_raise(tiny_llama, build, random_part):
    neurons, shared = random_part(2, 96, 4)
    neurons[1, 0, 0] = neurons[1, 1, 0]
    with pytest.raises(ValueError, match="exactly once"):
        ReadME.from_dense(tiny_llama, MoEConfig(num_experts=4, top_k=2), (neurons, shared))
    with pytest.raises(ValueError, match=r"partition must be \[L, E, m\]"):
        ReadME.from_dense(tiny_llama, MoEConfig(num_experts=4, top_k=2),
                          random_part(2, 96, 8))
    moe = build(tiny_llama)
    with pytest.raises(ValueError, match="unknown router"):
        moe.set_router("best")
    with pytest.raises(ValueError, match="top_k must be in"):
        moe.set_router("oracle", 9)


def test_load_rejects_bad_folders(tiny_llama, tmp_path, build):
    with pytest.raises(ValueError, match="not a Read-ME MoE folder"):
        ReadME.load(tmp_path)
    moe = build(tiny_llama)
    moe.save(tmp_path / "m")
    cfg_file = tmp_path / "m" / "readme_config.json"
    doc = json.loads(cfg_file.read_text())
    bad = dict(doc, version=99)
    cfg_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="version"):
        ReadME.load(tmp_path / "m")
    bad = dict(doc, base=dict(doc["base"], intermediate_size=128))
    cfg_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="intermediate_size"):
        ReadME.load(tmp_path / "m")
    bad = dict(doc, moe=dict(doc["moe"], colour="red"))
    cfg_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="does not take"):
        ReadME.load(tmp_path / "m")
    bad = dict(doc, expert_weights="stored")  # promises weights the file lacks
    cfg_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="missing"):
        ReadME.load(tmp_path / "m")


def test_training_forward_matches_sparse_and_has_gradients(tiny_llama, build):
    moe = build(tiny_llama, 4, 2, shared=16)
    x = ids()
    with torch.no_grad():
        ref = moe.model(x).logits
    moe.model.train()
    out = moe.model(x).logits  # masked dense path under autograd
    torch.testing.assert_close(out, ref, **TOL)
    out.sum().backward()
    mlp = moe.mlps[0]
    assert mlp.w_gate.grad is not None and mlp.w_gate.grad.abs().sum() > 0
    moe.model.eval()
