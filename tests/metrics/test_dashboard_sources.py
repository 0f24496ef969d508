"""The dashboard against sources that misbehave: real local HTTP servers, no mocks.

A source that answers HTML, a malformed line or broken JSON must not stop the poller: the
snapshot carries the error while it lasts and drops it once reads succeed again. Only http(s)
URLs are taken, and a response's contents never reach stderr beyond a short excerpt.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kvkit import cli
from kvkit.integrations.dashboard import server as dashboard_server
from kvkit.integrations.dashboard.sources import MetricsSource, PromSource, snapshot

SECRET = "root:x:0:0:secret-tail-of-the-body"
HTML = "<!doctype html>\n<html><body>" + "x" * 5000 + SECRET + "</body></html>\n"
MALFORMED = 'kvkit_pages_free{policy="p"} not-a-number ' + "y" * 5000 + SECRET + "\n"
GOOD = ('# TYPE kvkit_pages_free gauge\nkvkit_pages_free{policy="p"} 7.0\n'
        '# TYPE kvkit_kv_resident_bytes gauge\nkvkit_kv_resident_bytes{policy="p"} 64.0\n')


class Scripted:
    """An HTTP server on 127.0.0.1 answering each GET with the next body; the last repeats."""

    def __init__(self, bodies: list[tuple[str, str]]) -> None:
        self.bodies = list(bodies)
        self.served = 0
        script = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                kind, text = script.bodies[min(script.served, len(script.bodies) - 1)]
                script.served += 1
                body = text.encode()
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted() -> Iterator[type[Scripted]]:
    started: list[Scripted] = []

    def start(bodies: list[tuple[str, str]]) -> Scripted:
        started.append(Scripted(bodies))
        return started[-1]

    yield start  # type: ignore[misc]
    for server in started:
        server.close()


def wait_for(check, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.02)
    raise AssertionError(f"not reached within {timeout} s")


def test_poller_survives_html_and_a_malformed_line_then_clears_the_error(scripted, capfd):
    source = scripted([("text/html", HTML), ("text/plain", MALFORMED), ("text/plain", GOOD)])
    board = dashboard_server.Dashboard(MetricsSource(source.url + "/metrics"), interval=0.02,
                                       history=100)
    board.start()
    try:
        good = wait_for(lambda: next((s for s in board.history() if s["error"] is None), None))
        assert good["kv"]["p"]["resident_bytes"] == 64.0 and good["kv"]["p"]["pages_free"] == 7.0
        errors = [s["error"] for s in board.history() if s["error"]]
        assert len(errors) == 2, errors
        assert "not Prometheus text" in errors[0] and "<!doctype html>" in errors[0]
        assert "not-a-number" in errors[1]
        for error in errors:
            assert "\n" not in error and len(error) < 400 and SECRET not in error
        assert wait_for(lambda: len(board.history()) > len(errors) + 2)  # still polling
        assert board.latest()["error"] is None
    finally:
        board.stop()
    captured = capfd.readouterr()
    assert SECRET not in captured.err and "x" * 200 not in captured.err


def test_snapshot_endpoint_reports_the_error_then_clears_it(scripted):
    source = scripted([("text/html", HTML), ("text/plain", GOOD)])
    board = dashboard_server.Dashboard(MetricsSource(source.url + "/metrics"), interval=60)
    httpd = dashboard_server.make_server(board, port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        import urllib.request
        first = json.loads(urllib.request.urlopen(base + "/api/snapshot", timeout=5).read())
        assert "not Prometheus text" in first["error"] and first["kv"] == {}
        board.poll()
        second = json.loads(urllib.request.urlopen(base + "/api/snapshot", timeout=5).read())
        assert second["error"] is None and second["kv"]["p"]["pages_free"] == 7.0
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("body", ["<html>not json</html>", '{"status": "success"}',
                                  '{"status": "success", "data": {"result": [{"metric": '
                                  '{"policy": "p", "field": "pages_free"}, "value": [0, "x"]}]}}'])
def test_prom_source_reports_a_bad_answer(scripted, body):
    source = scripted([("application/json", body)])
    snap = snapshot(PromSource(source.url, timeout=2))
    assert snap["error"].startswith(f"Prometheus at {source.url}")
    assert "\n" not in snap["error"] and snap["kv"] == {}


@pytest.mark.parametrize("url", ["file:///etc/passwd", "notaurl", "ftp://127.0.0.1/metrics",
                                 "http://", "127.0.0.1:9400/metrics"])
def test_sources_take_only_http_urls(url):
    with pytest.raises(ValueError, match=r"must be an http\(s\) URL .*got") as info:
        MetricsSource(url)
    assert "\n" not in str(info.value) and "--metrics-url" in str(info.value)
    with pytest.raises(ValueError, match=r"--prometheus must be an http\(s\) URL"):
        PromSource(url)


def test_cli_refuses_a_file_url_in_one_line(capsys):
    assert cli.main(["dashboard", "--metrics-url", "file:///etc/passwd", "--port", "0"]) != 0
    captured = capsys.readouterr()
    out = (captured.out + captured.err).strip()
    assert out.startswith("kvkit dashboard:") and "--metrics-url must be an http(s) URL" in out
    assert "\n" not in out and "root:" not in out
