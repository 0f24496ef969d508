"""The README: two screens, and every snippet in it runs (or, for servers, parses)."""

import json
import re
import shlex
from pathlib import Path

import pytest

from kvkit import cli
from kvkit.policies import Policy

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, re.S)
COMMANDS = [line for lang, body in BLOCKS if not lang for line in body.splitlines() if line.startswith("kvkit ")]
SERVERS = ("serve", "dashboard")  # they start a server: parsed here, run by their own tests


def _python(marker: str) -> str:
    return re.search(re.escape(marker) + r".*?```python\n(.*?)```", README, re.S).group(1)


def test_readme_fits_on_two_screens_and_starts_with_the_two_commands():
    assert len(README.splitlines()) <= 160
    first = BLOCKS[0][1].split("\n")
    assert first[0].startswith("make demo") and first[1].startswith("make test")


def test_readme_standalone_example_runs(capsys):
    exec(compile(_python("**Plain import**"), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "260"


def test_readme_transformers_example_runs():
    scope: dict = {}
    exec(compile(_python("**transformers**"), "README.md", "exec"), scope)
    assert scope["out"].shape[1] == scope["ids"].shape[1] + 8
    assert scope["model"].config._attn_implementation == "kvkit"


def test_readme_policy_config_builds():
    (block,) = [body for lang, body in BLOCKS if lang == "json"]
    policy = Policy.from_config(json.loads(block))
    assert policy.name == "duo" and policy.to_config()["codec"]["type"] == "gear"


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_commands_parse(line):
    args = cli.make_parser().parse_args(shlex.split(line)[1:]) if "--version" not in line else None
    known = {"demo", "passkey", "ppl", "tune", "policies", "doctor", *SERVERS}
    assert line == "kvkit --version" or args.command in known


@pytest.mark.parametrize("line", [c for c in COMMANDS if c.split()[1] in ("policies", "doctor")])
def test_readme_quick_commands_run(line, capsys):
    assert cli.main(shlex.split(line)[1:]) == 0
    assert capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("line", [c for c in COMMANDS if c.split()[1] in ("demo", "passkey", "ppl")])
def test_readme_model_commands_run(line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # --plot demo.png lands here
    assert cli.main(shlex.split(line)[1:]) == 0
    assert "|" in capsys.readouterr().out


def test_readme_names_only_files_that_exist():
    named = set(re.findall(r"\((bench/results/[\w.]+\.png)\)", README))
    named |= set(re.findall(r"`((?:bench|integrations|kvkit|tests)/[\w/.]+\.(?:md|py|png))`", README))
    assert named, "the README names its results"
    assert [p for p in sorted(named) if not (ROOT / p).exists()] == []
