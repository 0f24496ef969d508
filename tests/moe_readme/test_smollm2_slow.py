"""The whole Read-ME path on the embedded SmolLM2 (30 layers): minutes on 2 cores."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_readme_end_to_end(tmp_path):
    from kvkit.models import smollm2
    from kvkit.moe.readme import calib, evaluate, pipeline
    from kvkit.moe.readme.model import MoEConfig, ReadME

    base = smollm2()
    profile = pipeline.calibrate(base, "vim:0/2", num_chunks=8, seq_len=128, progress=False)
    cfg = MoEConfig(num_experts=8, top_k=6, router="pregate")
    moe = pipeline.extract(base, cfg, profile, pregate_epochs=2, progress=False)
    dense, tok = pipeline.load_dense(base)
    ev = calib.token_chunks(tok, "vim:1/2", 128, 2)
    dense_ppl = evaluate.perplexity(dense, ev)
    moe.set_router("oracle")
    oracle = evaluate.perplexity(moe.model, ev)
    assert dense_ppl < oracle < 3 * dense_ppl  # 75% of the neurons, oracle routing
    rnd = pipeline.extract(base, cfg, profile, method="random", train_routers=False,
                           progress=False)
    assert evaluate.perplexity(rnd.model, ev) > oracle  # co-activation beats random
    moe.set_router("all")
    with torch.no_grad():
        torch.testing.assert_close(moe.model(ev[:1]).logits, dense(ev[:1]).logits,
                                   atol=1e-3, rtol=1e-3)
    moe.set_router("pregate")
    moe.save(tmp_path / "m")
    back = ReadME.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(back.model(ev[:1]).logits, moe.model(ev[:1]).logits,
                                   atol=0, rtol=0)
