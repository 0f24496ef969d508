import json
import shutil

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
    text.write_text(open("/usr/share/common-licenses/GPL-3").read()[:3000])
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
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        cli.main(["passkey", "--model", tiny_model, "--param", "window"])
