"""`kvkit tune`: the allocation is the least-loss choice under the budget, the measured losses mean
what they say, and the policy it writes loads everywhere and only for the model it was tuned on."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

from kvkit.errors import ConfigError
from kvkit.policies import Policy
from kvkit.policies.codecs.gear import GearCodec
from kvkit.policies.codecs.plain import PlainCodec
from kvkit.tools import tune_measure
from kvkit.tools.tune import CODECS, Measurement, build_policy, check, check_sequences, choose, decode_check, measure, tune
from kvkit.tools.tune_alloc import Allocation, _layer_best, _totals, allocate


def _instance(seed: int, L: int = 3, C: int = 2, W: int = 3, H: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(C, W, generator=g).double() * 100 + 1
    loss = torch.rand(L, C, W, H, generator=g).double()
    return loss, cost


def _brute_force(loss: torch.Tensor, cost: torch.Tensor, budget: float) -> float:
    L, C, W, H = loss.shape
    best = float("inf")
    for codecs in itertools.product(range(C), repeat=L):
        for wins in itertools.product(range(W), repeat=L * H):
            b = sum(float(cost[codecs[i], wins[i * H + h]]) for i in range(L) for h in range(H))
            if b <= budget:
                best = min(best, sum(float(loss[i, codecs[i], wins[i * H + h], h]) for i in range(L) for h in range(H)))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_allocation_is_optimal_where_the_price_meets_the_budget(seed):
    loss, cost = _instance(seed)
    for lam in (1e-3, 1e-2, 3e-2):
        codec, window = _layer_best(loss, cost, lam)
        want_loss, budget = _totals(loss, cost, codec, window)
        got = allocate(loss, cost, budget)
        assert got.nbytes <= budget + 1e-9
        assert got.loss == pytest.approx(_brute_force(loss, cost, budget), abs=1e-9)
        assert got.loss <= want_loss + 1e-9


@pytest.mark.parametrize("seed", range(2))
def test_allocation_fits_any_budget_and_is_near_the_optimum(seed):
    loss, cost = _instance(seed)
    lo, hi = float(cost.min()) * 6, float(cost.max()) * 6
    for budget in torch.linspace(lo, hi, 5, dtype=torch.float64).tolist():
        got = allocate(loss, cost, budget)
        best = _brute_force(loss, cost, budget)
        assert got.nbytes <= budget + 1e-9
        assert best - 1e-9 <= got.loss <= best + 0.35 * float(loss.max())  # hull solution + greedy fill


def test_allocation_refuses_a_budget_below_the_cheapest_choice():
    loss, cost = _instance(0)
    with pytest.raises(ValueError, match="below the cheapest choice"):
        allocate(loss, cost, float(cost.min()) * 6 - 1)
    with pytest.raises(ValueError, match=r"loss must be \[L, C, W, H\]"):
        allocate(loss[0], cost, 1e9)


def test_window_masks_keep_sink_and_recent_keys():
    masks = tune_measure.window_masks(T=10, scored=2, sink=2, windows=[None, 3])
    assert masks.shape == (2, 2, 10)
    assert masks[0, 0].tolist() == [True] * 9 + [False]          # query at 8: all before it
    assert masks[1, 1].nonzero().flatten().tolist() == [0, 1, 6, 7, 8, 9]  # query at 9: sink + 9-3..9


@pytest.mark.parametrize("T, N, S, window, G", [(100, 7, 16, 0, 1), (96, 40, 16, 32, 3), (64, 63, 8, 16, 2),
                                                (32, 1, 32, 0, 4), (50, 20, 16, 200, 2)])
def test_attend_reads_what_each_query_would_read(T, N, S, window, G):
    """`attend`'s stored-then-corrected product against each query attending over its own keys
    (compressed where its decode step finds the page compressed); ragged pages, all compressed
    (32, 1, 32, 0) and none (window past the start)."""
    from kvkit.tools.tune_measure import DecodeView, attend, window_masks

    g = torch.Generator().manual_seed(T + N)
    Hkv, D, scale = 2, 8, 0.3
    k, v, ks, vs = (torch.randn(Hkv, T, D, generator=g) for _ in range(4))
    q = torch.randn(Hkv, G, N, D, generator=g)
    page_end = (torch.arange(T) // S + 1) * S - 1
    where = page_end[None] <= torch.arange(T - N, T)[:, None] - window  # [N, T]
    keep = window_masks(T, N, 2, [None, 5, 20])  # [W, N, T]
    got = attend(q, DecodeView(exact=(k, v), stored=(ks, vs), compressed=where), keep[:, None, None], scale)
    want = torch.empty(3, Hkv, G, N, D)
    for n in range(N):
        kn, vn = (torch.where(where[n, None, :, None], stored, x) for stored, x in ((ks, k), (vs, v)))
        for w in range(3):
            logits = torch.einsum("hgd,htd->hgt", q[:, :, n], kn) * scale
            want[w, :, :, n] = logits.masked_fill(~keep[w, n], float("-inf")).softmax(-1) @ vn
    assert torch.allclose(got, want, atol=1e-5)


def test_head_bytes_come_from_a_real_store_and_order_as_expected():
    dense = tune_measure.dense_bytes(1, 3, 64, 2400 + 64) / 3
    full = {c: tune_measure.head_bytes(CODECS[c], None, 16, 2400, 3, 64, 32) for c in ("bf16", "q4", "q2")}
    assert full["bf16"] >= dense > full["q4"] > full["q2"] > 0.15 * dense  # 2 bits plus scales, staging
    streaming = tune_measure.head_bytes(CODECS["bf16"], 128, 16, 2400, 3, 64, 32)
    assert 2 * (16 + 128) * 64 * 2 <= streaming < 0.15 * dense  # sink + window pages, not the prompt


def test_windowed_codecs_are_choices_whose_window_costs_real_staging_rows():
    assert CODECS["q4w128"] == GearCodec(bits=4, rank=0, outliers=0.01, window=128)
    assert {"q3w128", "q2w128", "q4s", "q2sw32", "q2sw128"} <= set(CODECS)
    assert CODECS["q2sw32"] == GearCodec(bits=2, rank=0, outliers=0.01, sink=16, window=32)
    plain = tune_measure.head_bytes(CODECS["q4"], None, 16, 2400, 3, 64, 32)
    windowed = tune_measure.head_bytes(CODECS["q4w128"], None, 16, 2400, 3, 64, 32)
    row = 2 * 32 * 64 * 2  # one fp16 staging row: K and V of a 32-token page
    # 2464 tokens fill 77 pages: the last 128 positions are 4 full pages, staged on top of their codes
    assert 4 * row <= windowed - plain <= 6 * row
    sinked = tune_measure.head_bytes(CODECS["q4s"], None, 16, 2400, 3, 64, 32)
    assert row <= sinked - plain <= 2 * row  # the first page stays staged


def _synthetic(codecs, L=2, H=3):
    """A measurement without a model: windowed q4 loses least, q4 more; streaming costs a lot."""
    loss = torch.zeros(L, len(codecs), 2, H, dtype=torch.float64)
    for c, name in enumerate(codecs):
        loss[:, c, 0] = {"bf16": 0.0, "q4": 1.0}.get(name, 0.1)
    loss[1:, codecs.index("q4"), 0] = 3.0  # the window saves more in the later layers
    loss[:, :, 1] = 100.0  # streaming window 128: never worth it here
    return Measurement(text_loss=loss, passkey_loss=torch.zeros_like(loss), codecs=list(codecs), windows=[None, 128],
                       shape=(L, H, 64), page_size=32, sink=16)


def test_a_windowed_codec_is_picked_and_its_bytes_count_in_the_budget():
    m = _synthetic(["bf16", "q4", "q4w128"])
    dense = tune_measure.dense_bytes(2, 3, 64, 2400 + 64)
    whole = 2 * tune_measure.layer_bytes(CODECS["q4w128"], [None] * 3, 16, 2400, 64, 32)  # both layers windowed
    roomy = choose(m, whole / dense * 1.01, ctx=2400)
    assert [r["codec"] for r in roomy.report["layers"]] == ["q4w128", "q4w128"]
    assert roomy.report["predicted_bytes"] == whole
    assert any(r.codec == CODECS["q4w128"] for r in roomy.policy.rules)
    tight = choose(m, whole / dense * 0.97, ctx=2400)  # the window's rows do not fit in both layers
    assert [r["codec"] for r in tight.report["layers"]] == ["q4", "q4w128"]
    assert tight.report["predicted_bytes"] <= whole * 0.97


@pytest.fixture(scope="module")
def tiny():
    """A seeded tiny random Llama with SmolLM2's tokenizer (the vocabulary a calibration text needs)."""
    from transformers import LlamaForCausalLM

    from kvkit.models import load_tokenizer, resolve_model
    from kvkit.testing import tiny_llama_config

    tok = load_tokenizer(resolve_model(None))
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), max_position_embeddings=2048)).eval()
    return model, tok


@pytest.fixture(scope="module")
def measured(tiny):
    model, tok = tiny
    return measure(model, tok, calib_tokens=256, scored=16, page_size=16, sink=4, windows=(16, 64),
                   codecs=("bf16", "q4", "q2"), passkey_depths=(0.2,), progress=False)


def test_measured_losses_grow_as_windows_shrink_and_bits_drop(measured):
    loss = measured.loss()  # [L, C, W, H]: codecs bf16, q4, q2; windows all, 16, 64
    assert loss.shape == (3, 3, 3, 2) and (loss >= 0).all()
    assert (loss[:, :, 1] >= loss[:, :, 2] - 1e-9).all()  # window 16 loses at least what 64 does
    assert (loss[:, :, 2] >= loss[:, :, 0] - 1e-9).all()  # and 64 at least what keeping all does
    assert loss[:, 2, 0].sum() > loss[:, 1, 0].sum() > loss[:, 0, 0].sum()  # 2 bits > 4 bits > bf16


def test_layer_losses_are_zero_for_a_lossless_choice(tiny):
    model, tok = tiny
    ids = tok("The quick brown fox jumps over the lazy dog. " * 30, return_tensors="pt").input_ids[:, :200]
    cap = tune_measure.capture(model, ids, scored=8)[0]
    loss = tune_measure.layer_losses(cap, model.model.layers[0].self_attn.o_proj.weight, [PlainCodec("fp32")],
                                     [None, 500], sink=4, page_size=16)
    assert loss.abs().max() < 1e-10  # fp32 pages, a window longer than the sequence


CODEC_ROWS = {  # per layer of the tiny model
    "exact": [PlainCodec("fp32")] * 3,
    "mixed": [GearCodec(bits=2, rank=0, outliers=0.01), PlainCodec("bf16"),
              GearCodec(bits=3, rank=0, outliers=0.0, v_group=16, sink=4, window=16)],
}


def _streaming_policy(codecs, windows, sink, page_size=16):
    from kvkit.policies.base import Rule
    from kvkit.policies.evictors.sink_window import SinkWindowEvictor

    rules = tuple(Rule(layers=(i,), heads=(h,), evictor=SinkWindowEvictor(sink=sink, window=w))
                  for i, row in enumerate(windows) for h, w in enumerate(row) if w is not None)
    rules += tuple(Rule(layers=(i,), codec=c) for i, c in enumerate(codecs))
    return Policy(codec=PlainCodec("fp32"), rules=rules, page_size=page_size)


@pytest.mark.parametrize("codecs", CODEC_ROWS, ids=str)
def test_joint_loss_is_the_kl_a_real_cache_decodes_with(tiny, codecs):
    """`joint_loss` equals the KL from dense of teacher-forced decode steps through `KVKitCache`
    running the same policy (GEAR pages compressed as each step finds them: open and window pages
    exact; streaming heads), and is zero for a lossless policy."""
    from kvkit.integrations.hf import KVKitCache

    model, tok = tiny
    T, N, sink = 160, 12, 4
    ids = torch.randint(3, len(tok), (1, T), generator=torch.Generator().manual_seed(1))
    seqs = [(ids, N, 0.5)]
    dense = tune_measure.dense_logprobs(model, seqs)
    lossless = _streaming_policy(CODEC_ROWS["exact"], [[None, 500]] * 3, sink)
    assert abs(tune_measure.joint_loss(model, seqs, dense, lossless)) < 1e-5  # rounding
    policy = _streaming_policy(CODEC_ROWS[codecs], [[None, 16], [24, None], [16, 40]], sink)
    got = tune_measure.joint_loss(model, seqs, dense, policy)

    cache = KVKitCache(model, policy)
    with torch.inference_mode():
        model(ids[:, :T - N], past_key_values=cache, use_cache=True)
        logits = [model(ids[:, p:p + 1], past_key_values=cache, use_cache=True).logits[0, -1] for p in range(T - N, T)]
    logp = torch.stack(logits).float().log_softmax(-1)
    want = 0.5 * float((dense[0].exp() * (dense[0] - logp)).sum())
    assert want > 1e-4  # the choices change what is read
    assert got == pytest.approx(want, rel=1e-3)


def test_joint_loss_reads_each_head_s_sink_and_refuses_evictors_it_cannot_model(tiny):
    from kvkit.policies.base import Rule
    from kvkit.policies.evictors.h2o import H2OEvictor
    from kvkit.policies.evictors.sink_window import SinkWindowEvictor

    policy = Policy(rules=(Rule(layers=(1,), heads=(0,), evictor=SinkWindowEvictor(sink=2, window=8)),
                           Rule(layers=(2,), heads=(1,), evictor=SinkWindowEvictor(sink=6, window=32))))
    assert tune_measure.streaming_reads(policy, 3, 2) == [[(0, None)] * 2, [(2, 8), (0, None)], [(0, None), (6, 32)]]
    model, _ = tiny
    h2o = Policy(rules=(Rule(layers=(1,), evictor=H2OEvictor()),))
    with pytest.raises(ValueError, match="sink_window eviction only; layer 1 has h2o"):
        tune_measure.joint_loss(model, [(torch.zeros(1, 8, dtype=torch.long), 4, 1.0)], [None], h2o)


def test_choose_weighs_the_passkey_answers_by_passkey_weight():
    """Room for one whole head: the text wants head (1, 2) whole, the passkey answers head (0, 0)."""
    text = torch.ones(2, 1, 2, 3, dtype=torch.float64)
    text[:, :, 0] = 0.0
    text[1, 0, 1, 2] = 5.0
    passkey = torch.zeros_like(text)
    passkey[0, 0, 1, 0] = 10.0
    m = Measurement(text_loss=text, passkey_loss=passkey, codecs=["bf16"], windows=[None, 128], shape=(2, 3, 64),
                    page_size=32, sink=16)
    whole = {w: [(r["layer"], h) for r in choose(m, 0.25, ctx=2400, passkey_weight=w).report["layers"]
                 for h, win in enumerate(r["windows"]) if win is None] for w in (1.0, 0.25)}
    assert whole == {1.0: [(0, 0)], 0.25: [(1, 2)]}
    assert choose(m, 0.25, ctx=2400, passkey_weight=0.25).report["predicted_loss"] == pytest.approx(5 + 0.25 * 10)


def test_check_keeps_the_passkey_answers_then_the_least_text_kl(tiny, measured):
    model, _ = tiny
    result = check(model, measured, 0.3, ctx=600, window_weights=(0.25, 1.0, 8.0), passkey_weights=(1.0, 0.25),
                   scored=64)
    cands = result.report["joint_check"]
    assert [(c["passkey_weight"], c["window_weight"]) for c in cands] == [(p, w) for p in (1.0, 0.25)
                                                                            for w in (0.25, 1.0, 8.0)]
    most = max(c["passkey_kept"] for c in cands)
    assert result.report["passkey_kept"] == most and result.report["passkey_of"] == 1
    assert result.report["text_kl"] == min(c["text_kl"] for c in cands if c["passkey_kept"] == most) > 0
    seqs = check_sequences(measured, 64)  # the text scored over 64 decode steps, not the 16 measured
    assert [n for _, n, _ in seqs] == [64, measured.sequences[1][1]] and result.report["check_scored"] == 64
    dense = tune_measure.dense_logprobs(model, seqs)
    got = decode_check(model, seqs, dense, result.policy)
    assert got.text_kl == pytest.approx(result.report["text_kl"])
    assert got.text_kl == pytest.approx(tune_measure.joint_loss(model, seqs[:1], dense[:1], result.policy))
    with pytest.raises(ValueError, match="scores 1 to 255 decode steps of the 256-token calibration text; got 256"):
        check_sequences(measured, 256)
    with pytest.raises(ValueError, match=r"check_scored must be in \[1, 255\]"):  # before measuring
        tune(model, tiny[1], 0.3, calib_tokens=256, check_scored=256)
    assert result.report["predicted_fraction"] <= 0.3
    plain = choose(measured, 0.3, ctx=600, window_weight=result.report["window_weight"],
                   passkey_weight=result.report["passkey_weight"])
    assert plain.policy == result.policy  # the winner is that weight's allocation, as `choose` makes it
    heavy = choose(measured, 0.3, ctx=600, window_weight=8.0).allocation.window
    light = choose(measured, 0.3, ctx=600, window_weight=0.25).allocation.window
    assert sum(w > 0 for row in heavy for w in row) <= sum(w > 0 for row in light for w in row)  # fewer streams
    with pytest.raises(ValueError, match="at least one window weight"):
        check(model, measured, 0.3, window_weights=())
    with pytest.raises(ValueError, match="one passkey weight"):
        check(model, measured, 0.3, passkey_weights=())


def test_a_passkey_answer_is_kept_when_every_answer_token_is_dense_s_greedy_one(tiny, measured):
    model, _ = tiny
    seqs = check_sequences(measured, 32)
    dense = tune_measure.dense_logprobs(model, seqs)
    exact = Policy(codec=PlainCodec("fp32"))
    same = decode_check(model, seqs, dense, exact)
    assert same.passkey_kept == 1 and abs(same.text_kl) < 1e-5
    answer = dense[1]
    other = answer.argmax(-1) + 1  # a different greedy token at every position
    flipped = torch.full_like(answer, -30.0).scatter(-1, other[:, None], 0.0)
    last_only = answer.clone()
    last_only[-1] = flipped[-1]  # what follows the answer is not part of it
    assert decode_check(model, seqs, [dense[0], flipped], exact).passkey_kept == 0
    assert decode_check(model, seqs, [dense[0], last_only], exact).passkey_kept == 1


def test_tuned_policy_holds_its_budget_in_a_real_cache_and_loads_unchanged(tiny, measured, tmp_path):
    from kvkit.attention.paged import PagedAttention
    from kvkit.integrations.hf import KVKitCache

    model, tok = tiny
    ctx = 600
    result = choose(measured, 0.3, ctx=ctx)
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(result.policy.to_config()))
    policy = Policy.from_file(path)
    assert policy == result.policy and policy.model_shape == (3, 2) and policy.page_size == 16
    ids = torch.randint(3, len(tok), (1, ctx), generator=torch.Generator().manual_seed(0))
    cache = KVKitCache(model, policy)
    model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False, pad_token_id=0)
    dense = tune_measure.dense_bytes(3, 2, 16, ctx + 2)
    assert cache.store.nbytes() <= 0.3 * dense * 1.1  # the pool rounds to pages; 10% slack
    attn = PagedAttention(num_heads=6, num_kv_heads=2, head_dim=16, policy=policy, num_layers=3,
                          page_size=policy.page_size)
    assert attn(torch.randn(1, 6, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)).shape == (1, 6, 40, 16)


def test_a_policy_tuned_for_another_shape_is_refused(tiny, tmp_path):
    from transformers import LlamaForCausalLM

    from kvkit.attention.paged import PagedAttention
    from kvkit.integrations.hf import KVKitCache
    from kvkit.testing import tiny_llama_config

    alloc = Allocation(codec=(1,) * 30, window=((0, 1, 0),) * 30, loss=0.0, nbytes=0.0)
    tuned = build_policy(alloc, ["bf16", "q4"], [None, 128], 16, 32, (30, 3))  # SmolLM2's shape
    assert any(r.codec == GearCodec(bits=4, rank=0, outliers=0.01) for r in tuned.rules)
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(tuned.to_config()))
    policy = Policy.from_file(path)
    other = LlamaForCausalLM(tiny_llama_config()).eval()  # 3 layers x 2 KV heads
    with pytest.raises(ConfigError, match=r"made for 30 layers x 3 KV heads; the model has 3 layers x 2 KV heads"):
        KVKitCache(other, policy)
    with pytest.raises(ConfigError, match="made for 30 layers x 3 KV heads"):
        PagedAttention(num_heads=6, num_kv_heads=2, head_dim=16, policy=policy, num_layers=3)
    with pytest.raises(ConfigError, match="made for 30 layers x 3 KV heads"):
        policy.make_store(30, 2, 64)
    assert policy.make_store(30, 3, 64).num_layers == 30


def test_the_tune_command_writes_a_loadable_policy_and_its_report(tiny, tmp_path, capsys):
    from kvkit.cli import main

    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out, report = tmp_path / "tuned.json", tmp_path / "report.json"
    assert main(["tune", "--model", str(tmp_path / "m"), "--budget-bytes", "0.3", "--ctx", "600",
                 "--calib-tokens", "256", "--scored", "16", "--page-size", "16", "--sink", "4", "--windows", "16,64",
                 "--codecs", "bf16,q4,q2", "--window-weights", "0.5,2", "--passkey-weights", "0.25",
                 "--check-scored", "32",
                 "-o", str(out), "--report", str(report)]) == 0
    assert Policy.from_file(out).model_shape == (3, 2)
    r = json.loads(report.read_text())
    assert [(c["passkey_weight"], c["window_weight"]) for c in r["joint_check"]] == [(0.25, 0.5), (0.25, 2.0)]
    assert r["predicted_fraction"] <= 0.3
    assert "candidates (passkey weight, window weight" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--budget-bytes", "0", "-o", "x.json"], "must be in (0, 1]"),
    (["--budget-bytes", "0.1", "--codecs", "q5", "-o", "x.json"], "codecs are a comma-separated subset"),
    (["--budget-bytes", "0.1", "--windows", "64,-1", "-o", "x.json"], "expected integers >= 1"),
    (["--budget-bytes", "0.1"], "required: -o/--out"),
    (["--budget-bytes", "0.1", "--window-weights", "1,0", "-o", "x.json"], "expected numbers > 0"),
    (["--budget-bytes", "0.1", "--passkey-weights", "1,x", "-o", "x.json"], "expected comma-separated numbers"),
    (["--budget-bytes", "0.1", "--check-scored", "2048", "-o", "x.json"],
     "argument --check-scored: must be below --calib-tokens (2048), got 2048"),
    (["--budget-bytes", "0.1", "--calib-tokens", "256", "--scored", "300", "-o", "x.json"],
     "argument --scored: must be below --calib-tokens (256), got 300"),
])
def test_bad_tune_arguments_are_one_line_before_any_model_loads(argv, match, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvkit.cli", "tune", *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and match in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
