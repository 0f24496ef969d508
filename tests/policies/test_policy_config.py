import json
import re

import pytest
import torch

from kvkit import ConfigError, policies
from kvkit.policies import FullSelector, Int8Codec, NoEvictor, PlainCodec, Policy, Rule, SinkWindowEvictor


def test_registry_lists_and_builds_policies():
    assert {"dense", "streaming", "int8"} <= set(policies.names())
    p = policies.get("streaming", sink=2, window=64)
    assert p.evictor == SinkWindowEvictor(sink=2, window=64)


def test_unknown_policy_and_params_say_what_is_known():
    with pytest.raises(ValueError, match=r"unknown policy 'qeust'; known: .*dense.*streaming"):
        policies.get("qeust")
    with pytest.raises(ValueError, match=r"does not take \['windw'\]; it takes \['sink', 'window'\]"):
        policies.get("streaming", windw=3)


@pytest.mark.parametrize("bad", [dict(window=0), dict(window=-5), dict(sink=-1)])
def test_budgets_must_be_positive(bad):
    with pytest.raises(ValueError, match="SinkWindowEvictor"):
        policies.get("streaming", **bad)


def test_config_round_trips_through_json():
    p = Policy(evictor=SinkWindowEvictor(4, 128), codec=Int8Codec(group_size=32),
               rules=(Rule(layers=(0, 1), evictor=NoEvictor()), Rule(heads=(2,), selector=FullSelector())),
               name="mix")
    cfg = json.loads(json.dumps(p.to_config()))
    assert Policy.from_config(cfg) == p
    assert Policy.from_config({"name": "streaming", "params": {"window": 8}}) == policies.get("streaming", window=8)


@pytest.mark.parametrize("cfg,match", [
    ({"selector": {"type": "ful"}}, r"unknown selector type 'ful'; known: full"),
    ({"evictor": {"type": "sink_window", "windw": 3}}, r"does not take \['windw'\]; it takes \['sink', 'window'\]"),
    ({"evictor": {"type": "sink_window", "window": 0}}, "window must be an int >= 1"),
    ({"codec": "int8"}, "must be a dict with a 'type' key"),
    ({"colour": 1}, r"does not take \['colour'\]"),
    ({"rules": [{"heads": [0], "codec": {"type": "int8"}}]}, "codec applies to whole layers"),
    ({"name": "nope", "params": {}}, "unknown policy 'nope'"),
    ({"page_size": 0}, "page_size must be a positive int"),
    ({"page_size": "8"}, "page_size must be a positive int"),
])
def test_bad_configs_raise_config_error(cfg, match):
    with pytest.raises(ConfigError, match=match):
        Policy.from_config(cfg)


def test_page_size_comes_from_the_caller_then_the_policy_then_the_default():
    quest = policies.get("quest", budget=64)
    assert quest.page_size == 8 and Policy.from_config(json.loads(json.dumps(quest.to_config()))) == quest
    assert quest.make_store(2, 3, 16).page_size == 8
    assert quest.make_store(2, 3, 16, page_size=32).page_size == 32
    assert policies.get("quest", page_size=None).make_store(2, 3, 16).page_size == 16
    assert policies.get("dense").make_store(2, 3, 16).page_size == 16


def test_corrupt_config_file_is_reported(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text('{"evictor": {"type": "sink_window", ')
    with pytest.raises(ConfigError, match="is not valid JSON"):
        Policy.from_file(path)
    path.write_text(json.dumps(policies.get("int8").to_config()))
    assert Policy.from_file(path) == policies.get("int8")


@pytest.mark.parametrize("text, match", [
    ("[" * 100_000 + "]" * 100_000, "is nested too deep to parse"),
    ('{"name": ' * 100_000 + '"x"' + "}" * 100_000, "is nested too deep to parse"),
    (b'{"name": "\xff"}', "is not valid JSON"),
])
def test_a_config_file_python_cannot_parse_is_a_config_error_naming_the_file(tmp_path, text, match):
    path = tmp_path / "deep.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}.*{match}"):
        Policy.from_file(path)


def test_rules_resolve_per_layer_and_head():
    stream = SinkWindowEvictor(4, 32)
    p = Policy(evictor=stream, rules=(Rule(layers=(0,), evictor=NoEvictor()),
                                      Rule(layers=(1,), heads=(0,), evictor=NoEvictor())))
    assert p.evictors(0, 3) == [(NoEvictor(), [0, 1, 2])]
    groups = {type(e).__name__: h for e, h in p.evictors(1, 3)}
    assert groups == {"NoEvictor": [0], "SinkWindowEvictor": [1, 2]}
    assert p.evictors(2, 3) == [(stream, [0, 1, 2])]


def test_equal_components_of_separate_rules_serve_their_heads_as_one_group(tmp_path):
    # the tuner writes a rule per (KV head, window); a JSON round trip makes each rule's evictor its own object
    rules = tuple(Rule(layers=(0, 1), heads=(h,), evictor=SinkWindowEvictor(4, 32 if h < 2 else 64)) for h in range(3))
    path = tmp_path / "p.json"
    path.write_text(json.dumps(Policy(rules=rules).to_config()))
    p = Policy.from_file(path)
    assert p.evictors(0, 3) == [(SinkWindowEvictor(4, 32), [0, 1]), (SinkWindowEvictor(4, 64), [2])]
    assert p.evictors(2, 3) == [(NoEvictor(), [0, 1, 2])]


def test_streaming_bounds_resident_tokens_per_head():
    p = policies.get("streaming", sink=4, window=32)
    store = p.make_store(1, 2, 8, page_size=8, dtype=torch.float32)
    seq = store.add_sequence()
    for step in range(100):
        store.append(seq, 0, torch.randn(1, 2, 8), torch.randn(1, 2, 8))
        p.evict(store, [seq], 0, None)
        assert store.num_resident(seq, 0, 1) == min(step + 1, 36)
    pos = store.positions(seq, 0, 0).tolist()
    assert pos == [0, 1, 2, 3] + list(range(68, 100))
    assert store.stats().pages_used <= 2 * (36 // 8 + 2)


def test_int8_codec_meets_error_bound_and_stores_fewer_bytes():
    torch.manual_seed(0)
    k, v = torch.randn(64, 3, 64), torch.randn(64, 3, 64)
    stores = {}
    for name in ("dense", "int8"):
        store = policies.get(name).make_store(1, 3, 64, page_size=16, dtype=torch.bfloat16)
        seq = store.add_sequence()
        store.append(seq, 0, k.bfloat16(), v.bfloat16())
        stores[name] = (store, seq)
    store, seq = stores["int8"]
    for h in range(3):
        _, rk, rv = store.read(seq, 0, h)
        bound = k[:, h].abs().amax(-1, keepdim=True) / 254 + 1e-2 * k[:, h].abs()  # half a step + bf16
        assert ((rk.float() - k[:, h]).abs() <= bound + 1e-3).all()
        cos = torch.nn.functional.cosine_similarity(rv.float(), v[:, h], dim=-1)
        assert cos.min() > 0.999
    dense_bytes, int8_bytes = stores["dense"][0].nbytes(), store.nbytes()
    # int8 codes + fp16 scale per token vs bf16: (64 + 2) / 128 of the K/V bytes, plus slot positions
    assert int8_bytes < 0.56 * dense_bytes


def test_int8_group_size_must_divide_head_dim():
    with pytest.raises(ValueError, match="group_size=48 must divide head_dim=64"):
        policies.get("int8", group_size=48).make_store(1, 1, 64)


def test_each_selector_sees_the_queries_of_its_own_heads():
    seen = {}

    class Recording(FullSelector):
        def select(self, store, seqs, layer, q, heads):
            seen[tuple(heads)] = q.clone()
            return super().select(store, seqs, layer, q, heads)

    p = Policy(selector=Recording(), rules=(Rule(heads=(1,), selector=FullSelector()),))
    store = p.make_store(1, 3, 4, dtype=torch.float32)
    seq = store.add_sequence()
    store.append(seq, 0, torch.randn(5, 3, 4), torch.randn(5, 3, 4))
    q = torch.arange(6 * 4, dtype=torch.float32).view(1, 6, 4)  # 1 seq, 6 query heads, G = 2
    sel = p.select(store, [seq], 0, q)
    assert torch.equal(seen[(0, 2)], q[:, [0, 1, 4, 5]])  # query heads of KV heads 0 and 2
    assert sel.pages.shape == (1, 3, 1)
