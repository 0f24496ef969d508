"""`kvkit --version`, `kvkit policies` and `kvkit doctor` (the demo's command line: test_cli.py)."""

import importlib.metadata
import json

import pytest
import torch

import kvkit
from kvkit import cli, policies


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
