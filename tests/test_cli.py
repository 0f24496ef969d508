import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from kvkit import cli
from kvkit.models import smollm2
from kvkit.testing import tiny_llama_config


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny Llama with SmolLM2's tokenizer: exercises the commands end to end, fast."""
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=49152)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2() / name, path / name)
    return str(path)


def test_policies_lists_the_registry(capsys):
    assert cli.main(["policies"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "streaming" in out and "StreamingLLM" in out


def test_passkey_json_reports_every_depth(tiny_model, capsys):
    assert cli.main(["passkey", "--model", tiny_model, "--policy", "streaming", "--param", "window=64",
                     "--ctx", "300", "--samples", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"]["evictor"] == {"type": "sink_window", "sink": 4, "window": 64}
    assert [r["depth"] for r in out["results"]] == [0.25, 0.75]
    assert all(r["kv_bytes"] > 0 and r["context_tokens"] > 250 for r in out["results"])


def test_ppl_table_and_config_file(tiny_model, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(cli.DEFAULT_TEXT.read_text()[:3000])
    config = tmp_path / "policy.json"
    config.write_text(json.dumps({"name": "int8", "params": {"group_size": 8}}))
    assert cli.main(["ppl", "--model", tiny_model, "--config", str(config), "--file", str(text),
                     "--tokens", "8", "--context", "200"]) == 0
    out = capsys.readouterr().out
    assert "| int8 | 200 | 8 |" in out


def test_bad_input_is_reported_not_raised(tiny_model, capsys, tmp_path):
    assert cli.main(["passkey", "--model", tiny_model, "--policy", "qeust"]) == 2
    assert "unknown policy 'qeust'; known:" in capsys.readouterr().err
    assert cli.main(["passkey", "--model", str(tmp_path), "--policy", "dense"]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main(["ppl", "--model", tiny_model, "--config", str(bad)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert cli.main(["passkey", "--model", tiny_model, "--param", "window"]) == 2
    assert "--param takes NAME=VALUE, got 'window'" in capsys.readouterr().err


def test_serve_command_sets_the_policy_safely(tmp_path):
    from kvkit import policies
    from kvkit.integrations.vllm.serve import SERVER_MODULE, server_command

    argv, env = server_command(policies.get("streaming", window=256), str(tmp_path), vllm_args=["--block-size", "32"],
                               env={"KVKIT_CONFIG": "other.json"})
    assert argv[1:3] == ["-m", SERVER_MODULE]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # loopback unless told otherwise
    assert argv[argv.index("--model") + 1] == str(tmp_path.resolve())
    assert argv[-3:] == ["--block-size", "32", "--no-enable-prefix-caching"]  # it frees blocks
    assert json.loads(env["KVKIT_POLICY"])["evictor"] == {"type": "sink_window", "sink": 4, "window": 256}
    assert "KVKIT_CONFIG" not in env and env["PYTHONSAFEPATH"] == "1"
    assert Path(env["PROMETHEUS_MULTIPROC_DIR"]).is_dir()  # a fresh one, as vLLM asks
    shutil.rmtree(env["PROMETHEUS_MULTIPROC_DIR"])
    quest_argv, _ = server_command(policies.get("quest"), "org/model-id", vllm_args=[],
                                   env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert "--no-enable-prefix-caching" not in quest_argv and "org/model-id" in quest_argv
    assert "--kv-transfer-config" not in quest_argv


def test_serve_command_adds_kvkits_connector_for_score_eviction(tmp_path):
    from kvkit import policies
    from kvkit.integrations.vllm.serve import server_command

    argv, _ = server_command(policies.get("a2sf", budget=512), "org/model-id", vllm_args=[],
                             env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert "--no-enable-prefix-caching" in argv  # it frees blocks
    connector = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert connector == {"kv_connector": "KVKitEvictionConnector",
                         "kv_connector_module_path": "kvkit.integrations.vllm.eviction", "kv_role": "kv_both"}
    own = ["--kv-transfer-config", "{}"]  # the user's own is left as it is (the engine checks it)
    argv, _ = server_command(policies.get("h2o"), "org/model-id", vllm_args=own,
                             env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert argv.count("--kv-transfer-config") == 1 and argv[argv.index("--kv-transfer-config") + 1] == "{}"


@pytest.mark.parametrize("argv,message", [
    (["serve", "--policy", "gear"], "does not run GearCodec"),
    (["serve", "--policy", "h2o", "--", "--enable-prefix-caching"], "drop --enable-prefix-caching"),
    (["serve", "--policy", "streaming", "--", "--enable-prefix-caching"], "drop --enable-prefix-caching"),
    (["serve", "--policy", "qeust"], "unknown policy"),
])
def test_serve_refuses_what_vllm_cannot_run(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


class PastTheChecks(BaseException):
    """Where a model would load: a BaseException, so no handler in kvkit.cli hides it."""


def _no_model_loads(*args, **kwargs):
    raise PastTheChecks("a model was loaded before the arguments were checked")


def test_ppl_reads_the_shipped_text_within_the_models_context(tiny_model, capsys):
    assert cli.DEFAULT_TEXT.is_file() and "Apache License" in cli.DEFAULT_TEXT.read_text()
    assert cli.main(["ppl", "--model", tiny_model, "--tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["file"] == str(cli.DEFAULT_TEXT)
    assert out["result"]["context_tokens"] == 1024  # the tiny model's max_position_embeddings


def test_prompts_beyond_the_models_context_are_refused_before_loading(tiny_model, capsys, monkeypatch):
    from kvkit import evaluate
    monkeypatch.setattr(evaluate, "load", _no_model_loads)
    assert cli.main(["ppl", "--model", tiny_model, "--context", "2000"]) == 2
    assert "the model's context is 1024" in capsys.readouterr().err
    assert cli.main(["passkey", "--model", tiny_model, "--ctx", "1020"]) == 2  # 1020 + the 8-token answer
    assert "needs 1028 tokens; the model's context is 1024" in capsys.readouterr().err


def test_library_refuses_windows_beyond_the_models_context(tiny_model):
    from kvkit import evaluate, policies
    model, tok = evaluate.load(tiny_model)
    with pytest.raises(ValueError, match="context is 1024"):
        evaluate.perplexity(model, tok, policies.get("dense"), "x " * 3000, tokens=4, context_tokens=2000)
    with pytest.raises(ValueError, match="at least 1 token"):
        evaluate.perplexity(model, tok, policies.get("dense"), "x " * 3000, tokens=4, context_tokens=-5)
    with pytest.raises(ValueError, match="context is 1024"):  # checked on the real prompt
        evaluate.passkey(model, tok, policies.get("dense"), 1100, depths=[0.5], progress=False)


def test_param_of_the_wrong_json_type_is_refused(capsys):
    assert cli.main(["passkey", "--policy", "streaming", "--param", "window=true"]) == 2
    assert "policy 'streaming' takes an integer for window (default 1024)" in capsys.readouterr().err


def test_a_busy_metrics_port_is_one_line(monkeypatch, capsys):
    import socket

    from kvkit import evaluate
    monkeypatch.setattr(evaluate, "load", _no_model_loads)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["demo", "--ctx", "300", "--metrics-port", str(port)]) == 2
    assert f"--metrics-port {port}: cannot listen" in capsys.readouterr().err


def test_a_subcommand_whose_import_fails_is_loud(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "kvkit.moe.readme.model", None)  # `import` of it now fails
    folder = tmp_path / "moe"
    folder.mkdir()
    (folder / "readme_config.json").write_text("{}")
    assert cli.main(["moe", "eval", str(folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvkit moe eval: error:") and "kvkit.moe.readme.model" in err
    monkeypatch.setitem(sys.modules, "kvkit.moe.readme.cli", None)  # a module that mounts commands
    with pytest.raises(ImportError):
        cli.make_parser()


def test_a_bug_is_not_passed_off_as_bad_input(monkeypatch, capsys):
    def buggy(args):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(cli, "cmd_policies", buggy)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(["policies"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected TypeError" in err and f"{cli.DEBUG_ENV}=1" in err
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(TypeError, match="unsupported operand"):
        cli.main(["policies"])


def test_demo_json_and_plot(tiny_model, tmp_path, capsys):
    png = tmp_path / "demo.png"
    assert cli.main(["demo", "--model", tiny_model, "--ctx", "300", "--samples", "1", "--policies",
                     "streaming,lserve", "--window", "64", "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in out["rows"]] == ["dense", "streaming 64", "lserve 37"]
    assert out["dtype"] == "bfloat16"
    assert all(r["kv_bytes"] > 0 and r["read_bytes_per_token"] > 0 for r in out["rows"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_refuses_bad_arguments_in_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    assert cli.main(["demo", "--model", tiny_model, "--ctx", "300", "--policies", "dense,qeust"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown policy 'qeust'" in err
    assert cli.main(["demo", "--model", tiny_model, "--ctx", "300", "--policies", str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--plot", str(tmp_path / "no" / "such" / "x.png")])
    assert "no folder" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if kvkit[plot] were not installed
    assert cli.main(["demo", "--model", tiny_model, "--ctx", "300", "--plot", str(tmp_path / "x.png")]) == 1
    assert "pip install 'kvkit[plot]'" in capsys.readouterr().err
