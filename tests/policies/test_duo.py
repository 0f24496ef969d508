import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from kvkit import ConfigError, policies
from kvkit.integrations.hf import KVKitCache
from kvkit.policies import Policy, SinkWindowEvictor
from kvkit.policies.duo import DuoPattern, load_pattern, shipped_pattern
from kvkit.tools.duo_train import _STATE, gated_attention_forward, streaming_mask
from kvkit.testing import tiny_llama_config

REPO = Path(__file__).resolve().parents[2]
GATES = [[0.9, 0.1], [0.2, 0.3], [0.05, 0.8]]  # tiny Llama: 3 layers x 2 KV heads


def write_pattern(tmp_path, **changes):
    d = DuoPattern("tiny", 3, 2, GATES, sink=2, window=6).to_dict()
    d.update(changes)
    path = tmp_path / "pattern.json"
    path.write_text(json.dumps(d))
    return path


def test_pattern_round_trips_through_json(tmp_path):
    pat = DuoPattern("tiny", 3, 2, GATES, sink=2, window=6, training={"steps": 1})
    path = pat.save(tmp_path / "p.json")
    assert load_pattern(path) == pat
    assert load_pattern(path).training == {"steps": 1}


@pytest.mark.parametrize("changes,match", [
    (dict(gates=[[0.9, 0.1], [0.2, 0.3]]), "gates must be a list of num_layers=3 rows, got 2"),
    (dict(gates=[[0.9], [0.2, 0.3], [0.1, 0.1]]), r"gates\[0\] must hold num_kv_heads=2"),
    (dict(gates=[[0.9, 1.5], [0.2, 0.3], [0.1, 0.1]]), r"gates\[0\]\[1\] must be a number in \[0, 1\], got 1.5"),
    (dict(gates=[[0.9, "x"], [0.2, 0.3], [0.1, 0.1]]), r"gates\[0\]\[1\] must be a number"),
    (dict(gates=[[0.9, True], [0.2, 0.3], [0.1, 0.1]]), r"gates\[0\]\[1\] must be a number"),
    (dict(num_layers=0), "num_layers must be an int >= 1"),
    (dict(sink=-1), "sink must be an int >= 0"),
    (dict(window=0), "window must be an int >= 1"),
    (dict(format="pickle"), "format must be 'kvkit-duo-pattern'"),
    (dict(version=2), "version 2 is not supported"),
    (dict(colour=1), r"unknown keys \['colour'\]"),
])
def test_bad_pattern_files_say_what_is_wrong(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        load_pattern(write_pattern(tmp_path, **changes))


def test_missing_key_and_non_json_are_rejected(tmp_path):
    d = DuoPattern("tiny", 3, 2, GATES, sink=2, window=6).to_dict()
    del d["gates"]
    (tmp_path / "a.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"missing keys \['gates'\]"):
        load_pattern(tmp_path / "a.json")
    (tmp_path / "b.json").write_bytes(b"\x80\x04K\x01.")  # a pickle
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_pattern(tmp_path / "b.json")
    with pytest.raises(ConfigError, match="a duo pattern is a JSON object"):
        (tmp_path / "c.json").write_text("[1, 2]")
        load_pattern(tmp_path / "c.json")


def test_retrieval_heads_by_ratio_and_threshold():
    pat = DuoPattern("tiny", 3, 2, GATES, sink=2, window=6)
    assert pat.retrieval_heads(retrieval_ratio=2 / 6) == {(0, 0), (2, 1)}
    assert pat.retrieval_heads(threshold=0.25) == {(0, 0), (1, 1), (2, 1)}
    with pytest.raises(ValueError, match="exactly one"):
        pat.retrieval_heads(0.5, 0.5)
    with pytest.raises(ConfigError, match="has 3 layers x 2 KV heads; the model has 30 x 3"):
        pat.check_fits(30, 3)


def test_duo_policy_gives_streaming_heads_a_sink_window_evictor(tmp_path):
    policy = policies.get("duo", pattern=str(write_pattern(tmp_path)), retrieval_ratio=2 / 6, window=4)
    for layer in range(3):
        for evictor, heads in policy.evictors(layer, 2):
            for h in heads:
                streaming = (layer, h) not in {(0, 0), (2, 1)}
                assert isinstance(evictor, SinkWindowEvictor) == streaming
                if streaming:
                    assert evictor == SinkWindowEvictor(sink=2, window=4)
    assert Policy.from_config(json.loads(json.dumps(policy.to_config()))) == policy


def test_shipped_smollm2_pattern_validates_and_builds():
    pat = shipped_pattern()
    assert (pat.model, pat.num_layers, pat.num_kv_heads) == ("SmolLM2-135M-Instruct", 30, 3)
    # produced by identify-heads (a finished run records "steps", a checkpoint "steps_done")
    assert (pat.training.get("steps") or pat.training.get("steps_done", 0)) >= 1
    policy = policies.get("duo")
    retrieval = pat.retrieval_heads(retrieval_ratio=0.25)
    assert len(retrieval) == round(0.25 * 90)
    streaming = sum(len(r.layers) for r in policy.rules)
    assert streaming == 90 - len(retrieval)


def test_composition_example_loads():
    policy = Policy.from_file(REPO / "kvkit" / "data" / "compose_example.json")
    assert policy.name == "duo" and policy.rules
    assert Policy.from_config(policy.to_config()) == policy


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def test_streaming_heads_hold_sink_plus_window_retrieval_heads_hold_all(tmp_path, tiny):
    policy = policies.get("duo", pattern=str(write_pattern(tmp_path)), retrieval_ratio=2 / 6)
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    cache = KVKitCache(tiny, policy, page_size=4)
    tiny.generate(ids, past_key_values=cache, max_new_tokens=10, do_sample=False, pad_token_id=0)
    store, retrieval = cache.store, {(0, 0), (2, 1)}
    for seq in cache.seqs:
        for layer in range(3):
            length = store.length(seq, layer)
            for h in range(2):
                pos = store.positions(seq, layer, h).tolist()
                if (layer, h) in retrieval:
                    assert pos == list(range(length))
                else:
                    assert pos == [0, 1] + list(range(length - 6, length))
    dense = KVKitCache(tiny, "dense", page_size=4)
    tiny.generate(ids, past_key_values=dense, max_new_tokens=10, do_sample=False, pad_token_id=0)
    used = store.stats().tokens_resident
    assert used < 0.6 * dense.store.stats().tokens_resident


def test_all_retrieval_heads_equal_dense(tmp_path, tiny):
    policy = policies.get("duo", pattern=str(write_pattern(tmp_path)), retrieval_ratio=1.0)
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(1))
    a = tiny.generate(ids, past_key_values=KVKitCache(tiny, policy), max_new_tokens=8, do_sample=False, pad_token_id=0)
    b = tiny.generate(ids, past_key_values=KVKitCache(tiny, "dense"), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_streaming_mask():
    m = streaming_mask(8, sink=1, window=3)
    assert m[7].tolist() == [True, False, False, False, False, True, True, True]
    assert m[2].tolist() == [True, True, True, False, False, False, False, False]


def test_gate_mixes_full_and_streaming_attention_and_has_a_gradient():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    module = torch.nn.Module()
    module.layer_idx = 0
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    mask = streaming_mask(10, 1, 2)
    stream = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    try:
        _STATE.stream_mask = mask
        _STATE.gates = torch.tensor([[1.0, 0.0]], requires_grad=True)
        out, _ = gated_attention_forward(module, q, k, v, None)
        torch.testing.assert_close(out[:, :, :3], full[:, :, :3])
        torch.testing.assert_close(out[:, :, 3:], stream[:, :, 3:])
        out.sum().backward()
        assert _STATE.gates.grad is not None and _STATE.gates.grad.abs().sum() > 0
    finally:
        _STATE.gates, _STATE.stream_mask = None, None


def test_identify_heads_cli_parses_into_its_function():
    import argparse

    from kvkit.tools.duo_train import cmd_identify_heads, register_cli
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["identify-heads", "/some/model", "--steps", "3", "--out", "p.json"])
    assert (args.model, args.steps, args.out, args.func) == ("/some/model", 3, "p.json", cmd_identify_heads)


@pytest.mark.slow
def test_identify_heads_on_smollm2_writes_a_valid_pattern(tmp_path):
    from kvkit.tools.duo_train import identify_heads
    pattern = identify_heads(steps=1, samples=1, seq_len=96, sink=4, window=8, progress=False)
    assert (pattern.num_layers, pattern.num_kv_heads) == (30, 3)
    assert all(0.0 <= g <= 1.0 for row in pattern.gates for g in row)
    loaded = load_pattern(pattern.save(tmp_path / "p.json"))
    assert (loaded.model, loaded.num_layers, loaded.sink, loaded.window) == (
        pattern.model, pattern.num_layers, pattern.sink, pattern.window)
    flat = [g for row in pattern.gates for g in row]
    assert [g for row in loaded.gates for g in row] == pytest.approx(flat, abs=1e-6)  # saved to 6 places
