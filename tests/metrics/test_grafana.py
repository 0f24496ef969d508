"""integrations/grafana/kvkit.json: parses, and every query names series that kvkit exports.

The system test in test_prometheus_system.py also runs each query against a real Prometheus.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvkit import metrics

GRAFANA = Path(__file__).resolve().parents[2] / "integrations" / "grafana" / "kvkit.json"
METRIC = re.compile(r"\bkvkit_[a-z0-9_]+")


def dashboard() -> dict:
    return json.loads(GRAFANA.read_text())


def targets(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query, rows' nested panels included."""
    out = []
    for panel in dash["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out += [(p["title"], t["expr"]) for t in p.get("targets", [])]
    return out


def test_grafana_json_parses_and_is_a_dashboard():
    dash = dashboard()
    assert dash["title"] and dash["uid"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dash["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "policy", "model", "cache_policy"} <= names


@pytest.mark.parametrize("title, expr", targets(dashboard()))
def test_every_query_names_exported_kvkit_series(title, expr):
    used = set(METRIC.findall(expr))
    assert used, f"panel {title!r}: query names no kvkit_* series: {expr}"
    unknown = used - metrics.series_names()
    assert not unknown, f"panel {title!r} queries {sorted(unknown)}, which kvkit.metrics does not export"


def test_the_issue_panels_are_there():
    used = {m for _, expr in targets(dashboard()) for m in METRIC.findall(expr)}
    for needed in ("kvkit_kv_resident_bytes", "kvkit_kv_dense_equivalent_bytes",
                   "kvkit_pages_read_total", "kvkit_pages_dense_total",
                   "kvkit_evicted_tokens_total", "kvkit_selection_recall_sum",
                   "kvkit_expert_cache_hits_total", "kvkit_expert_cache_misses_total",
                   "kvkit_decode_seconds_bucket", "kvkit_selection_seconds_bucket"):
        assert needed in used, f"no panel shows {needed}"
