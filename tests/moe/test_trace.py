"""Trace format: round trips and every validation error path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvkit.moe.trace import Trace, TraceError, load_csv_trace, load_trace, save_trace

META = {"num_experts": 8, "top_k": 2, "expert_bytes": 1024, "model": "toy"}


def _trace(predicted: bool = True) -> Trace:
    rng = np.random.default_rng(0)
    experts = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(3)])
                        for _ in range(5)])
    pred = np.full((5, 3, 3), -1)
    pred[..., :2] = experts
    return Trace(experts, np.array([0, 0, 1, 1, 1]), pred if predicted else None,
                 1 if predicted else 0, META)


def test_save_load_round_trip(tmp_path):
    trace = _trace()
    path = save_trace(tmp_path / "t", trace)
    assert path.suffix == ".npz"
    back = load_trace(path)
    np.testing.assert_array_equal(back.experts, trace.experts)
    np.testing.assert_array_equal(back.request, trace.request)
    np.testing.assert_array_equal(back.predicted, trace.predicted)
    assert back.lookahead == 1 and back.lookahead_unit == "layers" and back.meta == META


def test_round_trip_without_predictions(tmp_path):
    back = load_trace(save_trace(tmp_path / "t.npz", _trace(predicted=False)))
    assert back.predicted is None and back.lookahead == 0


def test_available_step_units():
    trace = _trace()
    assert trace.available_step(2, 1) == 2 * 3 + 1 - 1
    tok = trace.with_predictions(trace.predicted, 1, "tokens")
    assert tok.available_step(2, 1) == 3 and tok.available_step(0, 2) == 0


@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(experts=d["experts"].astype(float)), "integer array"),
    (lambda d: d.update(experts=d["experts"][:, :, :1]), "top_k=1"),
    (lambda d: d["experts"].__setitem__((0, 0, 0), 8), r"outside \[0, num_experts=8\)"),
    (lambda d: d["experts"].__setitem__((0, 0, 1), d["experts"][0, 0, 0]), "repeats an expert"),
    (lambda d: d.update(request=d["request"][:3]), r"request must be \[tokens\]"),
    (lambda d: d.update(predicted=d["predicted"][:2]), "predicted must be"),
    (lambda d: d.update(meta={"top_k": 2}), "lacks"),
    (lambda d: d.update(lookahead_unit="steps"), "lookahead_unit"),
])
def test_invalid_trace_raises(change, match):
    t = _trace()
    fields = dict(experts=t.experts.copy(), request=t.request.copy(),
                  predicted=t.predicted.copy(), lookahead=1, meta=dict(META),
                  lookahead_unit="layers")
    change(fields)
    with pytest.raises(TraceError, match=match):
        Trace(**fields)


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trace"):
        load_trace(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="not an .npz"):
        load_trace(tmp_path / "junk.npz")
    np.savez(tmp_path / "nometa.npz", experts=np.zeros((1, 1, 1), int), request=np.zeros(1, int))
    with pytest.raises(TraceError, match=r"missing keys \['meta'\]"):
        load_trace(tmp_path / "nometa.npz")
    np.savez(tmp_path / "obj.npz", experts=np.array([[[0]]], dtype=object),
             request=np.zeros(1, int), meta=np.asarray(json.dumps(META)))
    with pytest.raises(TraceError, match="pickle|objects"):
        load_trace(tmp_path / "obj.npz")
    np.savez(tmp_path / "badmeta.npz", experts=np.zeros((1, 1, 2), int) + [[[0, 1]]],
             request=np.zeros(1, int), meta=np.asarray("{oops"))
    with pytest.raises(TraceError, match="not valid JSON"):
        load_trace(tmp_path / "badmeta.npz")


def test_csv_trace(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("layer,token,experts,request\n0,0,3 1,0\n1,0,2;0,0\n0,1,1|4,1\n1,1,5 6,1\n")
    trace = load_csv_trace(path, num_experts=8, expert_bytes=10, model="csv")
    assert trace.experts.tolist() == [[[3, 1], [2, 0]], [[1, 4], [5, 6]]]
    assert trace.request.tolist() == [0, 1] and trace.num_experts == 8


@pytest.mark.parametrize("text,match", [
    ("layer,token\n0,0\n", "needs columns"),
    ("layer,token,experts\n0,0,1 2\n0,0,1 2\n", "appears twice"),
    ("layer,token,experts\n0,0,1 2\n1,0,3\n", "different numbers"),
    ("layer,token,experts\n0,0,1 2\n1,1,3 4\n", "has no row for layer"),
    ("layer,token,experts\n0,x,1 2\n", "cannot parse"),
])
def test_csv_errors(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TraceError, match=match):
        load_csv_trace(path)


def test_num_experts_beyond_any_model_is_refused_before_allocating(tmp_path):
    from kvkit.moe.trace import MAX_EXPERTS
    meta = {**META, "num_experts": 10**12}
    with pytest.raises(TraceError, match=r"num_experts'\] = 1000000000000 is more experts per layer"):
        Trace(_trace(False).experts, np.zeros(5, dtype=np.int64), meta=meta)
    path = tmp_path / "huge.npz"
    np.savez_compressed(path, experts=np.zeros((4, 2, 1), dtype=np.int64), request=np.zeros(4, dtype=np.int64),
                        meta=np.asarray(json.dumps({**META, "top_k": 1, "num_experts": 10**12})))
    with pytest.raises(TraceError, match=str(path)):
        load_trace(path)
    assert Trace(_trace(False).experts, np.zeros(5, dtype=np.int64),
                 meta={**META, "num_experts": MAX_EXPERTS}).num_experts == MAX_EXPERTS


def test_csv_expert_id_out_of_range_names_the_line(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("layer,token,experts\n0,0,1 2\n0,1,12345678901234567890123 1\n")
    with pytest.raises(TraceError, match=r"big.csv:3: expert id 12345678901234567890123 is outside"):
        load_csv_trace(path)
    path.write_text("layer,token,experts,request\n0,0,1 2,99999999999999999999999\n")
    with pytest.raises(TraceError, match=r"big.csv:2: request 99999999999999999999999 is outside"):
        load_csv_trace(path)
    path.write_bytes(b"layer,token,experts\n0,0,\xff\n")
    with pytest.raises(TraceError, match="not a readable CSV text file"):
        load_csv_trace(path)


def test_a_folder_is_not_a_trace(tmp_path):
    for load in (load_trace, load_csv_trace):
        with pytest.raises(TraceError, match=f"{tmp_path} is a folder"):
            load(tmp_path)
