"""Every bad `kvkit` invocation ends with one line on stderr and a non-zero exit, no traceback.

Invocations are generated from a table: each subcommand's options crossed with bad values
(out-of-range numbers, non-numbers, folders where files go, files of the wrong kind, policies and
models kvkit refuses). They run in-process through `kvkit.cli.main` (argparse exits included);
a handful also run as real `kvkit` processes to prove the property end to end. No model weights
load and nothing trains: the work each command would do is replaced by a tripwire, so a case
that gets past the checks fails loudly instead of running.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvkit import cli
from kvkit.models import smollm2
from kvkit.moe.synth import simple_trace
from kvkit.moe.trace import save_trace

KVKIT = Path(sys.executable).with_name("kvkit")


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """A folder of bad inputs, named by what is wrong with them."""
    root = tmp_path_factory.mktemp("bad")
    (root / "dir").mkdir()
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "list.json").write_text("[1, 2]")
    (root / "broken.json").write_text("{not json")
    (root / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (root / "unknown.json").write_text(json.dumps({"name": "qeust"}))
    (root / "badparam.json").write_text(json.dumps({"name": "streaming", "params": {"window": -3}}))
    (root / "text.txt").write_text("hello " * 50)
    (root / "big.csv").write_text("layer,token,experts\n0,0,12345678901234567890123 1\n0,1,1 2\n")
    (root / "cols.csv").write_text("a,b\n1,2\n")
    (root / "latin1.csv").write_bytes(b"layer,token,experts\n0,0,\xff\xfe\n")
    (root / "notzip.npz").write_text("not a zip")
    np.savez_compressed(root / "huge.npz", experts=np.zeros((4, 2, 1), dtype=np.int64),
                        request=np.zeros(4, dtype=np.int64), format_version=np.asarray(1),
                        meta=np.asarray(json.dumps({"num_experts": 10**12, "top_k": 1,
                                                    "expert_bytes": 1, "model": "x"})))
    save_trace(root / "ok.npz", simple_trace(tokens=60, num_experts=8, top_k=2))
    model = smollm2()
    for name in ("pickle", "empty", "remote", "noweights"):
        folder = root / name
        folder.mkdir()
        shutil.copy(model / "config.json", folder / "config.json")
    (root / "pickle" / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": 1}))
    (root / "empty" / "config.json").write_text("{}")
    (root / "remote" / "config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "evil.Config"}}))
    (root / "remote" / "evil.py").write_text(f"open({str(root / 'PWNED')!r}, 'w')\n")
    (root / "nomoe").mkdir()
    (root / "nomoe" / "readme_config.json").write_text(json.dumps({"format": "kvkit-readme-moe", "version": 1}))
    return root


POSITIVE = ["0", "-1", "-2", "x", "1.5"]
PORTS = ["-1", "70000", "65536", "http"]
BAD_MODELS = ["{bad}/dir", "{bad}/missing", "{bad}/text.txt", "{bad}/pickle", "{bad}/empty",
              "{bad}/remote", "{bad}/noweights"]
BAD_CONFIGS = ["{bad}/dir", "{bad}/missing.json", "{bad}/deep.json", "{bad}/list.json",
               "{bad}/broken.json", "{bad}/binary.json", "{bad}/unknown.json", "{bad}/badparam.json"]
BAD_PARAMS = [["--policy", "streaming", "--param", "window=true"], ["--param", "window=abc"],
              ["--policy", "streaming", "--param", "window=abc"], ["--param", "window"],
              ["--param", "=3"], ["--param", "nope=1"], ["--policy", "streaming", "--param", "window=-5"],
              ["--policy", "streaming", "--param", "window=null"], ["--policy", "int8", "--param", "group_size=8.5"],
              ["--policy", "qeust"], ["--policy", "cskv", "--param", "bases=/etc/passwd"],
              ["--policy", "cskv", "--param", "bases={bad}/dir"],
              ["--policy", "streaming", "--param", "window=1e400"],
              ["--config", "{bad}/ok.npz", "--param", "window=3"]]


def _cases() -> list[list[str]]:
    cases: list[list[str]] = [[], ["bogus"], ["--bogus"], ["moe"], ["moe", "bogus"], ["policies", "extra"]]
    for cmd in ("demo", "passkey", "ppl"):
        cases += [[cmd, "--page-size", v] for v in POSITIVE]
        cases += [[cmd, "--model", m] for m in BAD_MODELS]
        cases += [[cmd, "--bogus"]]
    for cmd in ("demo", "passkey"):
        for opt in ("--ctx", "--samples"):
            cases += [[cmd, opt, v] for v in POSITIVE]
        cases += [[cmd, "--ctx", "100000"], [cmd, "--ctx", "8190"]]
    cases += [["demo", "--window", v] for v in POSITIVE]
    cases += [["demo", "--metrics-port", v] for v in PORTS]
    cases += [["passkey", "--seed", "x"]]
    for cmd in ("passkey", "ppl", "serve"):
        cases += [[cmd, "--config", c] for c in BAD_CONFIGS]
        cases += [[cmd, *p] for p in BAD_PARAMS]
    cases += [["ppl", opt, v] for opt in ("--tokens", "--context") for v in POSITIVE]
    cases += [["ppl", "--file", f] for f in ("{bad}/dir", "{bad}/missing.txt")]
    cases += [["ppl", "--context", "100000"], ["ppl", "--tokens", "9000"],
              ["ppl", "--tokens", "300", "--context", "200"]]
    cases += [["serve", "--port", v] for v in PORTS]
    for opt in ("--steps", "--samples", "--threads", "--serve-window", "--window", "--seq-len"):
        cases += [["identify-heads", opt, v] for v in ("0", "-7", "x")]
    cases += [["identify-heads", "--out", "{bad}/dir"], ["identify-heads", "--out", "{bad}/missing/p.json"],
              ["identify-heads", "--lr", "nan"], ["identify-heads", "--serve-sink", "-1"],
              *[["identify-heads", m] for m in BAD_MODELS]]
    cases += [["dashboard", "--port", v] for v in PORTS] + [["dashboard", "--bogus"],
                                                            ["dashboard", "--interval", "x"]]
    for cmd in ("replay {bad}/ok.npz", "sim --tokens 200 --layers 2 --skip-calibration-check"):
        head = ["moe", *cmd.split(), "--policy", "lru"]
        cases += [[*head, "--capacity", v] for v in ("0", "-1", "a", ",", "4,x")]
        cases += [[*head, "--warmup-tokens", "-1"], [*head, "--lookahead", "-2"],
                  [*head, "--oracle-accuracy", "2"], [*head, "--other-ms", "nan"],
                  [*head, "--prefetch-budget", "-1"], [*head, "--scope", "team"],
                  [*head, "--miss", "x"], [*head, "--predict", "x"], [*head, "--profile", "nope"],
                  [*head, "--policy", "nope"], [*head, "--json", "{bad}/dir"],
                  [*head, "--json", "{bad}/missing/r.json"], [*head, "--capacity", "1", "--policy", "lru"]]
    for trace in ("dir", "missing.npz", "notzip.npz", "huge.npz", "big.csv", "cols.csv", "latin1.csv",
                  "text.txt", "missing.csv"):
        cases += [["moe", "replay", f"{{bad}}/{trace}", "--policy", "lru"]]
    cases += [["moe", "replay", "{bad}/big.csv", "--num-experts", v] for v in ("0", "x")]
    cases += [["moe", "replay", "{bad}/ok.npz", "--policy", "lookahead"]]
    cases += [["moe", "sim", opt, v] for opt in ("--tokens", "--layers") for v in POSITIVE]
    cases += [["moe", "sim", "--preset", "nope"], ["moe", "sim", "--save-trace", "{bad}/dir"]]
    for opt in ("--experts", "--top-k", "--calib-chunks", "--seq-len", "--pregate-window", "--threads"):
        cases += [["moe", "extract", "--out", "{bad}/new", opt, v] for v in ("0", "-1", "x")]
    cases += [["moe", "extract"], ["moe", "extract", "--out", "{bad}/text.txt"],
              ["moe", "extract", "--out", "{bad}/new", "--ks", "a,b"],
              ["moe", "extract", "--out", "{bad}/new", "--ks", "0"],
              ["moe", "extract", "--out", "{bad}/new", "--experts", "8", "--top-k", "4", "--ks", "99"],
              ["moe", "extract", "--out", "{bad}/new", "--router", "x"],
              ["moe", "extract", "--out", "{bad}/new", "--finetune-seconds", "-1"],
              *[["moe", "extract", "--out", "{bad}/new", "--model", m] for m in BAD_MODELS]]
    for cmd in ("eval", "trace"):
        cases += [["moe", cmd, f"{{bad}}/{p}", *(["--out", "{bad}/t.npz"] if cmd == "trace" else [])]
                  for p in ("dir", "missing", "nomoe", "text.txt")]
    cases += [["moe", "eval", "{bad}/nomoe", opt, v] for opt in ("--top-k", "--chunks", "--threads")
              for v in ("0", "x")]
    cases += [["moe", "eval", "{bad}/nomoe", "--router", "x"], ["moe", "eval", "{bad}/nomoe", "--passkey", "-1"]]
    cases += [["moe", "trace", "{bad}/nomoe", "--out", "{bad}/t.npz", opt, v]
              for opt in ("--requests", "--tokens", "--predict-k") for v in ("0", "x")]
    cases += [["moe", "trace", "{bad}/nomoe", "--out", "{bad}/dir"], ["moe", "trace", "{bad}/nomoe"]]
    return cases


CASES = _cases()


class PastTheChecks(BaseException):
    """Raised where real work would start; a BaseException, so no handler in kvkit hides it."""


@pytest.fixture
def tripwires(monkeypatch):
    def trip(*args, **kwargs):
        raise PastTheChecks("an invalid invocation got past the argument checks")

    from kvkit import evaluate, metrics, models
    from kvkit.integrations.dashboard import server
    from kvkit.moe.readme import pipeline
    from kvkit.tools import duo_train
    for owner, name in ((evaluate, "load"), (models, "load_causal_lm"), (duo_train, "identify_heads"),
                        (pipeline, "calibrate"), (server, "main"), (metrics, "serve")):
        monkeypatch.setattr(owner, name, trip)


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def test_there_are_enough_cases():
    assert len(CASES) >= 200
    commands = {c[0] if c[:1] != ["moe"] else " ".join(c[:2]) for c in CASES if c}
    assert commands >= {"demo", "passkey", "ppl", "serve", "policies", "identify-heads", "dashboard",
                        "moe replay", "moe sim", "moe extract", "moe eval", "moe trace"}


@pytest.mark.parametrize("argv", CASES, ids=[" ".join(c) or "<none>" for c in CASES])
def test_bad_invocation_is_one_line_and_fails(argv, bad, tripwires, capsys):
    argv = [a.format(bad=bad) for a in argv]
    code, err = run_in_process(argv, capsys)
    assert code != 0, f"exit 0 for {argv}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvkit"), err
    assert "unexpected" not in lines[0], f"an error kvkit did not expect: {lines[0]}"
    assert not (bad / "PWNED").exists()


def test_bad_path_is_named_in_the_message(bad, tripwires, capsys):
    for argv in (["passkey", "--config", f"{bad}/dir"], ["passkey", "--config", f"{bad}/deep.json"],
                 ["moe", "replay", f"{bad}/dir"], ["moe", "replay", f"{bad}/big.csv"],
                 ["moe", "replay", f"{bad}/huge.npz", "--policy", "lru"],
                 ["moe", "sim", "--json", f"{bad}/dir"], ["identify-heads", "--out", f"{bad}/dir"],
                 ["moe", "eval", f"{bad}/nomoe"], ["passkey", "--model", f"{bad}/pickle"],
                 ["passkey", "--model", f"{bad}/empty"]):
        code, err = run_in_process(argv, capsys)
        assert code != 0 and str(bad) in err, (argv, err)


SUBPROCESS_CASES = [["passkey", "--samples", "0"], ["passkey", "--config", "{bad}/deep.json"],
                    ["passkey", "--policy", "cskv", "--param", "bases=/etc/passwd"],
                    ["moe", "replay", "{bad}/big.csv"], ["dashboard", "--port", "70000"],
                    ["identify-heads", "--serve-window", "-7"]]


@pytest.mark.parametrize("argv", SUBPROCESS_CASES, ids=[" ".join(c) for c in SUBPROCESS_CASES])
def test_bad_invocation_end_to_end(argv, bad):
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    done = subprocess.run([str(KVKIT), *(a.format(bad=bad) for a in argv)], capture_output=True,
                          text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kvkit {argv[0]}"), done.stderr
