"""bench/tune_frontier.py: its held-out perplexity text is long enough for the contexts it is
used at, holds each paragraph once and is not the tuner's calibration text."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def frontier(bench_script):
    return bench_script("tune_frontier")


def test_the_licenses_text_is_long_unrepeated_and_not_the_calibration_text(frontier):
    from kvkit.models import load_tokenizer, resolve_model
    from kvkit.tools.tune import calibration_text

    text = frontier.held_out_text("licenses")
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    assert len(paragraphs) == len(set(paragraphs)) and all(paragraphs)
    tok = load_tokenizer(resolve_model(None))
    assert len(tok(text).input_ids) > 8192 + 128  # 7.2K contexts and more, plus the scored tokens
    calib = calibration_text()
    assert not any(len(p) > 200 and p in calib for p in paragraphs)
    assert frontier.held_out_text("apache") == frontier.APACHE.read_text()


def test_quality_reads_the_tuned_policy_of_a_frontier_result(bench_script, tmp_path):
    import json

    from kvkit.policies import Policy

    quality = bench_script("quality")
    row = {"budget": 0.125, "method": "tuned", "config": "tuned",
           "policy": Policy(name="tuned", page_size=32, model_shape=(30, 3)).to_config()}
    path = tmp_path / "frontier.json"
    path.write_text(json.dumps({"rows": [{"budget": None, "method": "dense"}, row]}))
    label, policy = quality.parse_policy(f"{path}:0.125")
    assert label == f"{path}:0.125" and policy == Policy.from_config(row["policy"])
    with pytest.raises(SystemExit, match="no tuned policy at budget 0.25"):
        quality.parse_policy(f"{path}:0.25")


def test_the_model_check_splits_a_tuned_policy_into_codecs_and_windows(bench_script):
    from kvkit.policies.codecs.plain import PlainCodec
    from kvkit.tools.tune import CODECS, build_policy
    from kvkit.tools.tune_alloc import Allocation
    from kvkit.tools.tune_measure import streaming_reads

    check = bench_script("tune_model_check")
    alloc = Allocation(codec=(0, 2, 1), window=((0, 1), (2, 0), (1, 1)), loss=0.0, nbytes=0.0)
    policy = build_policy(alloc, ["bf16", "q4", "q3sw32"], [None, 128, 512], 16, 32, (3, 2))
    parts = check.parts(policy)
    assert parts["policy"] is policy
    codecs, windows = parts["codecs alone"], parts["windows alone"]
    assert [codecs.codec_for(i) for i in range(3)] == [CODECS["bf16"], CODECS["q3sw32"], CODECS["q4"]]
    assert not codecs.evicts and codecs.page_size == 32 and codecs.model_shape == (3, 2)
    assert [windows.codec_for(i) for i in range(3)] == [PlainCodec("bf16")] * 3
    assert streaming_reads(windows, 3, 2) == [[(0, None), (16, 128)], [(16, 512), (0, None)], [(16, 128), (16, 128)]]


def test_the_check_scoring_bench_scores_held_out_tokens_as_perplexity_does(bench_script):
    import math

    import torch

    scoring = bench_script("tune_check_scoring")
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (1, 12))
    dense = torch.randn(5, 7).log_softmax(-1)  # positions 7..11 (the prefill's last, then 4 decoded)
    assert scoring.held_out_ratio(dense, dense[1:], ids) == pytest.approx(1.0)
    target = ids[0, -4:]  # predicted by positions 7 (prefill, dense in both), 8, 9, 10
    worse = dense[1:].clone()
    worse[torch.arange(3), target[1:]] -= 0.3  # each decoded position but the last gives its token less
    got = scoring.held_out_ratio(dense, worse.log_softmax(-1), ids)
    nll = lambda lp, t: -float(lp.gather(1, t[:, None]).sum())  # noqa: E731
    want = math.exp((nll(worse.log_softmax(-1)[:3], target[1:]) - nll(dense[1:4], target[1:])) / 4)
    assert got == pytest.approx(want) and got > 1


def test_the_log_loss_change_scores_the_tokens_the_decoded_positions_predict(bench_script):
    import torch

    scoring = bench_script("tune_check_scoring")
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (1, 12))
    dense = torch.randn(4, 7).log_softmax(-1)  # positions 8..11; 8, 9, 10 predict ids 9, 10, 11
    assert scoring.logloss_change(dense, dense, ids) == 0.0
    worse = dense.clone()
    worse[torch.arange(3), ids[0, -3:]] -= 0.3  # each position but the last gives its token less
    worse[3] = worse[3].roll(1)  # the last predicts no token here: ignored
    assert scoring.logloss_change(dense, worse, ids) == pytest.approx(0.3, abs=1e-6)
    assert scoring.logloss_change(dense[3:], worse[3:], ids) == 0.0  # one position predicts nothing here
    assert scoring.held_out_ratio(dense[2:], worse[3:], ids) == 1.0  # one token, predicted densely in both
