"""Committed benchmark results name no folder of one machine, and the writer keeps it so."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(r"/(tmp|work|root|home)/")


def load_common():
    """bench/common.py, which the benchmarks import as `common` from beside them."""
    spec = importlib.util.spec_from_file_location("bench_common", REPO_ROOT / "bench" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tracked_results() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "bench/results"], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return [REPO_ROOT / name for name in out if name.endswith((".json", ".md"))]


def test_results_are_tracked():
    assert len(tracked_results()) > 10


@pytest.mark.parametrize("path", tracked_results(), ids=lambda p: p.name)
def test_result_names_no_machine_folder(path):
    hits = [f"{n}: {line.strip()[:120]}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if MACHINE_PATH.search(line)]
    assert not hits, f"{path.name} records absolute paths of one machine; record them relative " \
                     f"to the repo (or a file name): {hits[:3]}"


def test_command_is_relative_to_the_repo_from_any_folder(tmp_path, monkeypatch):
    common = load_common()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(REPO_ROOT / "bench" / "speed.py"), "--out",
                                      str(REPO_ROOT / "bench" / "results" / "speed"), "--logs",
                                      str(tmp_path / "runs" / "a,1.log"), "--rows",
                                      f"cskv:bases={tmp_path}/kv/m.st;x", "--eval",
                                      "/usr/share/common-licenses/GPL-3", "--url",
                                      "http://127.0.0.1:9400/metrics"])
    assert common.command() == (
        "python bench/speed.py --out bench/results/speed --logs a,1.log --rows 'cskv:bases=m.st;x' "
        "--eval /usr/share/common-licenses/GPL-3 --url http://127.0.0.1:9400/metrics")


def test_write_results_records_no_machine_folder(tmp_path, monkeypatch):
    common = load_common()
    monkeypatch.setattr(sys, "argv", ["bench/codec_quality.py", "--save-dir", str(tmp_path / "m")])
    common.write_results("t", {"model": str(Path.home() / ".cache" / "kvkit" / "smollm2"),
                               "rows": [{"bases": f"{tmp_path}/kv/b.st"}]},
                         "title", f"| bases={tmp_path}/kv/b.st |", out_dir=tmp_path)
    for name in ("t.json", "t.md"):
        text = (tmp_path / name).read_text()
        assert not MACHINE_PATH.search(text) and str(tmp_path) not in text, text
    assert '"model": "smollm2"' in (tmp_path / "t.json").read_text()
    assert "--save-dir m" in (tmp_path / "t.md").read_text()
