"""`kvkit --version`, `kvkit policies`, `kvkit doctor` and the demo's command line."""

import importlib.metadata
import json
import shutil
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

import kvkit
from kvkit import cli, policies
from kvkit.models import smollm2
from kvkit.testing import tiny_llama_config


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvkit {importlib.metadata.version('kvkit')}" == f"kvkit {kvkit.__version__}"


def test_policies_shows_every_parameter_with_its_default(capsys):
    assert cli.main(["policies", "--json"]) == 0
    found = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert sorted(found) == policies.names()
    assert found["quest"]["params"]["budget"] == 1024 and found["streaming"]["params"] == {"sink": 4, "window": 1024}
    assert all(d["description"].endswith(".") and "\n" not in d["description"] for d in found.values())
    assert cli.main(["policies"]) == 0
    text = capsys.readouterr().out
    assert "budget=1024" in text and "window=1024" in text and "(no parameters)" in text


def test_doctor_reports_versions_and_the_model_cache(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KVKIT_CACHE", str(tmp_path))
    assert cli.main(["doctor", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["torch"].startswith(torch.__version__)
    assert found["model cache"].startswith(str(tmp_path))
    assert found["embedded model"].startswith("not converted yet")  # an empty cache folder
    assert found["GPU"].startswith("none usable") != torch.cuda.is_available()
    assert cli.main(["doctor"]) == 0
    assert "transformers" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny Llama with SmolLM2's tokenizer: the demo's command line end to end, fast."""
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=49152)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2() / name, path / name)
    return str(path)


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
