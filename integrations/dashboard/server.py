"""`kvkit dashboard`: a small web server for the live kvkit metrics page.

A background thread polls the source (a kvkit ``/metrics`` endpoint, or a Prometheus server
with ``--prometheus``) every ``--interval`` seconds and keeps the last ``--history`` snapshots.
The page (``static/index.html`` with the vendored uPlot, so it works offline) fetches them:

- ``GET /``                 the page
- ``GET /static/<file>``    its script, styles and the chart library
- ``GET /api/snapshot``     the latest snapshot (see ``sources.snapshot`` for its fields)
- ``GET /api/history``      every snapshot kept, oldest first

It binds 127.0.0.1 unless told otherwise, and prints its URL on the first line of stdout. A
request whose ``Host`` header does not name the bound address gets 403 (a guard against DNS
rebinding, ``kvkit.metrics.host_allowed``): open the page by the address it prints.

A failed poll (no answer, HTML, a malformed line) becomes the snapshot's one-line ``error`` and
polling goes on; the next good read clears it.

Example::

    kvkit demo --metrics-port 9400 &
    kvkit dashboard --metrics-url http://127.0.0.1:9400/metrics --port 8050
    kvkit dashboard --prometheus http://127.0.0.1:9090 --window 1m
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import mimetypes
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kvkit.metrics import host_allowed, url_host

from .sources import MetricsSource, PromSource, Source, excerpt, snapshot

STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger(__name__)

__all__ = ["Dashboard", "build_parser", "main", "make_server"]


class Dashboard:
    """Polls a source on a timer and keeps a bounded history of snapshots."""

    def __init__(self, source: Source, interval: float = 1.0, history: int = 300) -> None:
        if interval <= 0:
            raise ValueError(f"--interval must be > 0 seconds, got {interval}")
        if history < 1:
            raise ValueError(f"--history must be >= 1 snapshot, got {history}")
        self.source = source
        self.interval = interval
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=history)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvkit-dashboard-poll", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 10)

    def poll(self) -> dict[str, Any]:
        """Take one snapshot now and keep it; any failure is its ``error``, never an exception."""
        try:
            snap = snapshot(self.source)
        except Exception as exc:  # noqa: BLE001 (a source bug must not end polling)
            snap = {"time": time.time(), "source": self.source.kind, "url": self.source.url,
                    "error": f"reading {self.source.url} failed: {type(exc).__name__}: "
                             f"{excerpt(str(exc))}",
                    "kv": {}, "experts": {}, "totals": {}}
        if snap["error"]:
            log.warning("kvkit dashboard: %s", snap["error"])
        with self._lock:
            self._history.append(snap)
        return snap

    def latest(self) -> dict[str, Any] | None:
        with self._lock:
            return self._history[-1] if self._history else None

    def history(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._history)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)


def _handler(dashboard: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "kvkit-dashboard"

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if not self._host_ok():
                return
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._file(STATIC / "index.html")
            elif path.startswith("/static/"):
                name = path.removeprefix("/static/")
                target = (STATIC / name).resolve()
                if "/" in name or not target.is_file() or target.parent != STATIC:
                    self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
                else:
                    self._file(target)
            elif path == "/api/snapshot":
                snap = dashboard.latest() or dashboard.poll()
                self._json({**snap, "interval": dashboard.interval})
            elif path == "/api/history":
                self._json({"interval": dashboard.interval, "snapshots": dashboard.history()})
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

        def _host_ok(self) -> bool:
            """Refuse (403) a Host header that does not name this server: DNS rebinding."""
            addrs = self.server.allowed_addrs  # type: ignore[attr-defined] (set by make_server)
            port = self.server.server_address[1]
            host = self.headers.get("Host")
            if host_allowed(host, addrs, port):
                return True
            message = (f"kvkit dashboard: Host {host!r} is not this server's address; open "
                       f"http://{url_host(addrs[-1])}:{port}/ (DNS rebinding guard)\n")
            self._send(HTTPStatus.FORBIDDEN, message.encode(), "text/plain")
            return False

        def _file(self, path: Path) -> None:
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            self._send(HTTPStatus.OK, path.read_bytes(), kind)

        def _json(self, body: Any) -> None:
            self._send(HTTPStatus.OK, json.dumps(body).encode(), "application/json")

        def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("kvkit dashboard: " + fmt, *args)

    return Handler


def make_server(dashboard: Dashboard, addr: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for ``dashboard`` (not started: call ``serve_forever``).

    It answers only requests whose ``Host`` names ``addr`` or the address bound (and, bound to
    loopback, ``localhost``): see ``kvkit.metrics.host_allowed``.
    """
    server = ThreadingHTTPServer((addr, port), _handler(dashboard))
    server.daemon_threads = True
    server.allowed_addrs = (addr, server.server_address[0])  # type: ignore[attr-defined]
    return server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvkit dashboard", description="Serve a live page of kvkit's KV-cache metrics.")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--metrics-url", default="http://127.0.0.1:9400/metrics",
                     help="a kvkit /metrics endpoint to scrape (default: %(default)s)")
    src.add_argument("--prometheus", metavar="URL",
                     help="read from a Prometheus server's query API instead, e.g. http://127.0.0.1:9090")
    parser.add_argument("--window", default="1m",
                        help="rate window for --prometheus, a PromQL duration (default: %(default)s)")
    parser.add_argument("--addr", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8050, help="port to bind, 0 = any free one "
                        "(default: %(default)s)")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between polls of the source (default: %(default)s)")
    parser.add_argument("--history", type=int, default=300,
                        help="snapshots kept for the charts (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the dashboard until interrupted; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        source: Source = (PromSource(args.prometheus, window=args.window) if args.prometheus
                          else MetricsSource(args.metrics_url))
        dashboard = Dashboard(source, interval=args.interval, history=args.history)
        server = make_server(dashboard, args.addr, args.port)
    except (ValueError, OSError) as exc:
        print(f"kvkit dashboard: {exc}", file=sys.stderr, flush=True)
        return 2
    host, port = server.server_address[:2]
    print(f"kvkit dashboard: http://{url_host(host)}:{port}/ (reading {source.kind} at {source.url})",
          flush=True)
    dashboard.start()
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        dashboard.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
