"""The dashboard server and its sources over a real /metrics endpoint (no system packages)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

from kvkit import metrics
from kvkit.integrations.dashboard import server as dashboard_server
from kvkit.integrations.dashboard.sources import MetricsSource, PromSource, snapshot
from kvkit.store import PagedKVStore


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read(), resp.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, b"", ""


@pytest.fixture(scope="module")
def metrics_url() -> str:
    return f"http://127.0.0.1:{metrics.serve(0)}/metrics"


def test_metrics_source_derives_saved_memory_sparsity_and_hit_rate(metrics_url):
    store = PagedKVStore(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4)
    seq = store.add_sequence()
    store.append(seq, 0, torch.randn(32, 1, 8), torch.randn(32, 1, 8))
    store.evict(seq, 0, 0, range(24))  # 8 tokens resident; pages go back to the pool
    metrics.observe_store(store, "d_stream")
    metrics.record_decode("d_stream", pages_read=2, pages_total=8, bytes_read=128, seconds=0.01)
    metrics.record_expert_cache("d_lru", hits=3, misses=1, bytes_moved=10)

    source = MetricsSource(metrics_url)
    first = snapshot(source)
    assert first["error"] is None
    row = first["kv"]["d_stream"]
    assert row["resident_bytes"] == store.nbytes()
    assert row["memory_saved"] == pytest.approx(
        1 - store.nbytes() / store.stats().nbytes_dense_equivalent)
    assert row["tokens_resident"] == 8
    assert row["sparsity"] == pytest.approx(1 - 2 / 8)      # since start: no previous scrape
    assert row["eviction_tokens_per_s"] is None              # no rate on the first scrape
    assert first["experts"]["d_lru"]["hit_rate"] == pytest.approx(0.75)

    metrics.record_decode("d_stream", pages_read=6, pages_total=8, bytes_read=384, seconds=0.01)
    metrics.record_evictions("d_stream", 5)
    metrics.record_expert_cache("d_lru", hits=0, misses=2, bytes_moved=20)
    second = snapshot(source)
    row = second["kv"]["d_stream"]
    assert row["sparsity"] == pytest.approx(1 - 6 / 8)      # this interval only
    assert row["eviction_tokens_per_s"] > 0
    assert second["experts"]["d_lru"]["hit_rate"] == pytest.approx(0.0)
    assert second["experts"]["d_lru"]["lookups"] == 6


def test_unreachable_source_reports_what_to_check():
    snap = snapshot(MetricsSource("http://127.0.0.1:9/metrics", timeout=1))
    assert "cannot read http://127.0.0.1:9/metrics" in snap["error"]
    assert "--metrics-url" in snap["error"]
    snap = snapshot(PromSource("http://127.0.0.1:9", timeout=1))
    assert "--prometheus" in snap["error"]


def test_prom_source_builds_one_query_per_kind():
    source = PromSource("http://127.0.0.1:9090/", window="15s")
    assert source.url == "http://127.0.0.1:9090"
    assert "rate(kvkit_pages_read_total[15s])" in source.queries["rates"]
    assert 'label_replace(sum by (policy) (kvkit_kv_resident_bytes), "field", "resident_bytes"' \
        in source.queries["gauges"]


def test_server_serves_page_assets_and_snapshots(metrics_url):
    metrics.record_decode("d_http", pages_read=1, pages_total=4, bytes_read=64, seconds=0.001)
    board = dashboard_server.Dashboard(MetricsSource(metrics_url), interval=0.2, history=5)
    httpd = dashboard_server.make_server(board, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        status, page, kind = get(base + "/")
        assert status == 200 and kind.startswith("text/html")
        for asset in (b"/static/uPlot.iife.min.js", b"/static/dashboard.js", b'id="chart-memory"'):
            assert asset in page
        status, js, _ = get(base + "/static/uPlot.iife.min.js")
        assert status == 200 and b"uPlot" in js
        assert get(base + "/static/../server.py")[0] == 404
        assert get(base + "/nope")[0] == 404
        status, body, kind = get(base + "/api/snapshot")
        snap = json.loads(body)
        assert kind == "application/json" and snap["kv"]["d_http"]["sparsity"] == 0.75
        for _ in range(3):
            board.poll()
        history = json.loads(get(base + "/api/history")[1])
        assert history["interval"] == 0.2 and 2 <= len(history["snapshots"]) <= 5
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_main_rejects_bad_options(capsys):
    assert dashboard_server.main(["--interval", "0", "--port", "0"]) == 2
    captured = capsys.readouterr()
    assert "--interval must be > 0" in captured.err and captured.out == ""  # one line on stderr
    with pytest.raises(SystemExit):
        dashboard_server.main(["--metrics-url", "x", "--prometheus", "y"])
