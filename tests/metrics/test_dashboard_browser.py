"""Headless Chromium loads `kvkit dashboard` while a workload runs: charts and numbers render.

Needs Debian's `chromium` (bash tests/metrics/install_system_packages.sh); fails if missing.
Saves the screenshot to bench/results/dashboard.png (or to $KVKIT_DASHBOARD_SCREENSHOT).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = Path(os.environ.get("KVKIT_DASHBOARD_SCREENSHOT",
                                 REPO_ROOT / "bench" / "results" / "dashboard.png"))
CHARTS = ("chart-memory", "chart-sparsity", "chart-evictions", "chart-experts")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}


class Dom(HTMLParser):
    """Elements by id (attributes, text) and, per id, the tags found inside it."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str]] = {}
        self.text: dict[str, str] = {}
        self.inside: dict[str, list[str]] = {}
        self.rows: dict[tuple[str, str], dict[str, str]] = {}  # (table id, policy) -> field values
        self._stack: list[tuple[str, str | None]] = []
        self._policy: str | None = None  # data-policy of the current table row
        self.feed(html)

    def _open_ids(self) -> list[str]:
        return [i for _, i in self._stack if i]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        for owner in self._open_ids():
            self.inside.setdefault(owner, []).append(tag)
        if tag == "td" and "data-field" in a:
            table = next((i for i in reversed(self._open_ids()) if i.endswith("-table")), "")
            self.rows.setdefault((table, self._policy or ""), {})[a["data-field"]] = a["data-value"]
        if tag == "tr":
            self._policy = a.get("data-policy")
        if "id" in a:
            self.by_id[a["id"]] = a
            self.text.setdefault(a["id"], "")
        if tag not in VOID:
            self._stack.append((tag, a.get("id")))

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            if self._stack.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for owner in self._open_ids():
            self.text[owner] += data

    def number(self, element_id: str) -> float:
        raw = self.by_id[element_id].get("data-value", "")
        assert raw, f"#{element_id} shows no number (text {self.text.get(element_id)!r})"
        return float(raw)

    def cell(self, table: str, policy: str, field: str) -> float:
        raw = self.rows[(table, policy)][field]
        assert raw, f"{table} row {policy!r} has no {field}"
        return float(raw)


def chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium once, offline-minded flags, bounded in time."""
    argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,1100",
            "--hide-scrollbars", "--virtual-time-budget=4000", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def dashboard_url(start_workload, tmp_path, helpers):
    """`kvkit dashboard` reading a running workload, with a few snapshots already taken."""
    work = start_workload(steps=2000, step_seconds=0.05, hold=5)
    err = tmp_path / "dashboard.stderr"
    with err.open("w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvkit.integrations.dashboard.server", "--metrics-url",
             work.metrics_url, "--port", "0", "--interval", "0.5"],
            cwd=tmp_path, env=helpers.child_env(), text=True, stdout=subprocess.PIPE,
            stderr=err_file)
    try:
        line = helpers.read_line(proc, 60, "kvkit dashboard", err)
        assert line.startswith("kvkit dashboard: http://127.0.0.1:"), line
        url = line.split()[2]

        def warmed_up() -> bool:
            snaps = json.loads(helpers.http_get(url + "api/history"))["snapshots"]
            rates = [s["kv"].get("streaming", {}).get("eviction_tokens_per_s") for s in snaps]
            return len([r for r in rates if r]) >= 6
        helpers.wait_until(warmed_up, 60, "the dashboard to hold 6 snapshots with evictions")
        yield url
    finally:
        helpers.stop(proc)


@pytest.fixture
def chromium_binary(helpers) -> str:
    """Checked before anything starts, so a missing browser fails at once."""
    return helpers.require_binary("chromium")


def test_dashboard_renders_charts_and_numbers_in_chromium(chromium_binary, dashboard_url,
                                                          tmp_path):
    binary = chromium_binary
    dom = Dom(chromium(binary, tmp_path / "profile", "--dump-dom", dashboard_url).stdout)

    assert dom.by_id["error"].get("hidden") is not None, f"page shows an error: {dom.text['error']}"
    for chart in CHARTS:
        assert "canvas" in dom.inside.get(chart, []), f"#{chart} has no chart canvas"
        assert int(dom.by_id[chart]["data-points"]) >= 6, f"#{chart} has too few points"
    assert dom.by_id["chart-memory"]["data-series"] == \
        "resident dense|resident streaming|dense bf16 equivalent"
    assert dom.by_id["chart-experts"]["data-series"] == "lru"

    # headline numbers: shown as text and carried as values
    assert dom.text["num-memory-saved"].endswith("%")
    assert 0 < dom.number("num-memory-saved") < 1
    assert 0 < dom.number("num-sparsity") < 1
    assert dom.number("num-eviction-rate") > 0
    assert 0 <= dom.number("num-expert-hit-rate") <= 1
    assert "streaming" in dom.text["num-memory-policies"]

    # per policy: streaming saves memory and reads less; dense saves nothing (page rounding)
    saved = {p: dom.cell("kv-table", p, "memory_saved") for p in ("dense", "streaming")}
    assert saved["streaming"] > 0.4 and saved["dense"] <= 0
    assert dom.cell("kv-table", "streaming", "resident_bytes") < \
        dom.cell("kv-table", "dense", "resident_bytes")
    assert saved["streaming"] == pytest.approx(
        1 - dom.cell("kv-table", "streaming", "resident_bytes")
        / dom.cell("kv-table", "streaming", "dense_bytes"))
    assert dom.cell("kv-table", "streaming", "sparsity") > 0.5
    assert dom.cell("kv-table", "dense", "sparsity") == 0
    assert dom.cell("kv-table", "streaming", "eviction_tokens_per_s") > 0
    assert dom.cell("kv-table", "dense", "selection_recall") == pytest.approx(1.0)
    assert dom.cell("kv-table", "streaming", "selection_recall") < 1.0
    assert 0 <= dom.cell("expert-table", "lru", "hit_rate") <= 1

    shot = tmp_path / "dashboard.png"
    chromium(binary, tmp_path / "profile", f"--screenshot={shot}", dashboard_url)
    assert png_size(shot) == (1280, 1100)
    assert shot.stat().st_size > 20_000, "screenshot looks blank"
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)
