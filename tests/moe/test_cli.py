"""`kvkit moe replay` / `kvkit moe sim` through register_cli."""

from __future__ import annotations

import argparse
import json

from kvkit.moe.cli import main, register_cli
from kvkit.moe.synth import simple_trace
from kvkit.moe.trace import save_trace


def test_register_cli_adds_replay_and_sim():
    ap = argparse.ArgumentParser()
    register_cli(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(["replay", "t.npz", "--capacity", "4,8", "--policy", "lru,lfu"])
    assert args.capacity == [4, 8] and args.policy == ["lru", "lfu"] and callable(args.func)
    assert callable(ap.parse_args(["sim"]).func)


def test_replay_prints_table_and_json(tmp_path, capsys):
    path = save_trace(tmp_path / "t.npz", simple_trace(tokens=120, num_experts=12, top_k=2))
    out = tmp_path / "r.json"
    rc = main(["replay", str(path), "--capacity", "4", "--policy", "lru,lfu,lookahead,score",
               "--predict", "oracle", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| policy |" in text and "lookahead" in text
    rows = json.loads(out.read_text())["rows"]
    assert {r["policy"] for r in rows} == {"lru", "belady", "lfu", "lookahead", "score"}


def test_replay_csv(tmp_path, capsys):
    path = tmp_path / "t.csv"
    path.write_text("layer,token,experts\n" + "".join(
        f"{l},{t},{(t + l) % 5} {(t + l + 1) % 5}\n" for t in range(30) for l in range(2)))
    assert main(["replay", str(path), "--capacity", "3", "--policy", "lru", "--num-experts",
                 "5"]) == 0
    assert "belady" in capsys.readouterr().out


def test_replay_errors(tmp_path, capsys):
    assert main(["replay", str(tmp_path / "missing.npz")]) == 2
    assert "no trace" in capsys.readouterr().err
    path = save_trace(tmp_path / "t.npz", simple_trace(tokens=50))
    assert main(["replay", str(path), "--policy", "lookahead"]) == 2
    assert "needs predictions" in capsys.readouterr().err
    assert main(["replay", str(path), "--capacity", "1", "--policy", "lru"]) == 2
    assert "cannot hold" in capsys.readouterr().err


def test_sim_checks_calibration_first(capsys):
    rc = main(["sim", "--tokens", "1500", "--layers", "4", "--capacity", "16",
               "--policy", "lru", "--seed", "3"])
    out = capsys.readouterr()
    if rc == 0:
        assert "calibration ok" in out.out and "| lru |" in out.out
    else:   # a short trace may miss the curves: then it must refuse to report numbers
        assert rc == 3 and "no simulated numbers" in out.err


def test_schedule_ranks_configurations_by_time(tmp_path, capsys):
    from kvkit.moe.synth import noisy_oracle_predictions

    trace = noisy_oracle_predictions(simple_trace(tokens=80, num_experts=12, top_k=2,
                                                  expert_bytes=10**6), 0.9, 0)
    path = save_trace(tmp_path / "t.npz", trace)
    out = tmp_path / "s.json"
    assert main(["schedule", str(path), "--json", str(out)]) == 0
    assert "| config |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    times = [r["ms_per_token"] for r in rows]
    assert times == sorted(times) and rows[0]["capacity"] == 3
    assert {"lru (on-demand loads)", "all-cpu misses",
            "hybrid + hints: trace predictions"} <= {r["config"] for r in rows}


def test_schedule_lowbit_rows_and_refusal_without_gate_ranks(tmp_path, capsys):
    import numpy as np

    from kvkit.moe.trace import Trace

    trace = simple_trace(tokens=80, num_experts=12, top_k=3, expert_bytes=10**6)
    path = save_trace(tmp_path / "t.npz", trace)
    out = tmp_path / "s.json"
    assert main(["schedule", str(path), "--lowbit", "4", "--lowbit-min-rank", "1",
                 "--json", str(out)]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["lru + int4 copies"]["lowbit_bits"] == 4
    assert rows["lru (on-demand loads)"]["lowbit_bits"] is None
    by_id = Trace(np.sort(trace.experts, axis=-1), trace.request, meta=trace.meta)
    bad = save_trace(tmp_path / "by_id.npz", by_id)
    capsys.readouterr()
    assert main(["schedule", str(bad), "--lowbit", "4"]) == 2
    assert "no gate ranks" in capsys.readouterr().err
    assert main(["schedule", str(bad)]) == 0


def test_schedule_bad_trace_is_a_usage_error(tmp_path, capsys):
    assert main(["schedule", str(tmp_path / "missing.npz")]) == 2
    assert "no trace at" in capsys.readouterr().err
