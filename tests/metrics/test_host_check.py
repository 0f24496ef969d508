"""The dashboard and /metrics servers answer only Host headers that name them (DNS rebinding).

Real servers on 127.0.0.1 and real requests; http.client sets the Host header a page served
from another name would send after rebinding that name to 127.0.0.1.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator

import pytest

from kvkit import metrics
from kvkit.integrations.dashboard import server as dashboard_server
from kvkit.integrations.dashboard.sources import MetricsSource


def request(port: int, path: str, host: str | None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest("GET", path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return metrics.serve(0)


@pytest.fixture(scope="module")
def dashboard_port(metrics_port: int) -> Iterator[int]:
    board = dashboard_server.Dashboard(MetricsSource(f"http://127.0.0.1:{metrics_port}/metrics"),
                                       interval=60)
    httpd = dashboard_server.make_server(board, port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("server", ["dashboard", "metrics"])
def test_loopback_names_are_served(server, request_ports):
    port, path, marker = request_ports(server)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST.:{port}"):
        status, body = request(port, path, host)
        assert status == 200 and marker in body, host


@pytest.mark.parametrize("server", ["dashboard", "metrics"])
@pytest.mark.parametrize("host", ["attacker.example:{port}", "attacker.example", "127.0.0.1:{other}",
                                  "localhost", "127.0.0.1:{port}@attacker.example", "", None])
def test_foreign_host_gets_403(server, host, request_ports):
    port, path, _ = request_ports(server)
    sent = None if host is None else host.format(port=port, other=port + 1)
    status, body = request(port, path, sent)
    assert status == 403
    assert "is not this server's address" in body and f"http://127.0.0.1:{port}/" in body
    assert body.count("\n") == 1 and "uPlot" not in body and "# TYPE" not in body


@pytest.fixture
def request_ports(dashboard_port, metrics_port):
    def pick(server: str) -> tuple[int, str, str]:
        if server == "dashboard":
            return dashboard_port, "/api/snapshot", '"source": "metrics"'
        return metrics_port, "/metrics", "# TYPE"
    return pick


@pytest.mark.parametrize("host, addrs, allowed", [
    ("10.0.0.5:80", ("10.0.0.5",), True),
    ("10.0.0.5", ("10.0.0.5",), True),                         # no port means 80
    ("localhost:80", ("10.0.0.5",), False),                    # not loopback-bound
    ("myhost:80", ("0.0.0.0",), False),                       # names unknown to a wildcard bind
    ("192.168.1.7:80", ("0.0.0.0",), True),                   # IP literals cannot be rebound
    ("[fe80::1]:80", ("::",), True),
    ("localhost:80", ("localhost", "127.0.0.1"), True),
    ("[::1]:80", ("127.0.0.1",), True),
    ("127.0.0.1:80", ("::1",), True),
    ("[::1:80", ("127.0.0.1",), False),                        # broken bracket
    ("127.0.0.1:http", ("127.0.0.1",), False),                 # port that is no number
])
def test_host_allowed(host, addrs, allowed):
    assert metrics.host_allowed(host, addrs, 80) is allowed
