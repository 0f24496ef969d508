import argparse
import json

import numpy as np
import pytest

from kvkit.moe.readme.cli import register_cli
from kvkit.moe.trace import load_trace


def parse(argv):
    ap = argparse.ArgumentParser(prog="kvkit moe")
    register_cli(ap.add_subparsers(dest="command", required=True))
    return ap.parse_args(argv)


def test_register_cli_adds_three_subcommands():
    for cmd in (["extract", "--out", "x"], ["eval", "x"], ["trace", "x", "--out", "t.npz"]):
        assert callable(parse(cmd).func)


def test_extract_eval_trace_end_to_end(tiny_llama, tmp_path, capsys):
    out = tmp_path / "moe"
    args = parse(["extract", "--model", str(tiny_llama), "--experts", "4", "--top-k", "3",
                  "--ks", "2,3", "--calib", "licenses", "--calib-chunks", "2", "--seq-len", "32",
                  "--pregate-epochs", "1", "--out", str(out)])
    assert args.func(args) == 0
    doc = json.loads((out / "readme_config.json").read_text())
    assert doc["routers_trained"] == ["layer", "pregate"] and doc["moe"]["router"] == "pregate"
    args = parse(["eval", str(out), "--router", "oracle", "--top-k", "2", "--text", "vim:1/2",
                  "--chunks", "1", "--seq-len", "32", "--dense"])
    capsys.readouterr()
    assert args.func(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["router"] == "oracle" and res["top_k"] == 2 and res["ppl"] > 0
    args = parse(["trace", str(out), "--text", "licenses", "--requests", "2", "--tokens", "8",
                  "--predict-k", "4", "--out", str(tmp_path / "t.npz")])
    assert args.func(args) == 0
    trace = load_trace(tmp_path / "t.npz")
    assert trace.experts.shape == (16, 2, 3) and trace.predicted.shape == (16, 2, 4)
    assert np.array_equal(np.unique(trace.request), [0, 1])


def test_extract_rejects_bad_options_before_work(tiny_llama, tmp_path):
    args = parse(["extract", "--model", str(tiny_llama), "--experts", "5", "--top-k", "2",
                  "--out", str(tmp_path / "m")])
    with pytest.raises(ValueError, match="must divide"):
        args.func(args)
    args = parse(["extract", "--model", str(tiny_llama), "--experts", "4", "--top-k", "6",
                  "--out", str(tmp_path / "m")])
    with pytest.raises(ValueError, match="top_k must be in"):
        args.func(args)
    assert not (tmp_path / "m").exists()
