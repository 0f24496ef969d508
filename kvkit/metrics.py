"""kvkit_* Prometheus metrics: what the KV store holds, what each decode step reads, what leaves.

The store, the policies and the MoE scheduler call the ``observe_*`` / ``record_*`` functions
below; ``serve(port)`` exposes them on ``/metrics``; the dashboard
(``kvkit.integrations.dashboard``) and ``integrations/grafana/kvkit.json`` read them back.

Two ways to run, chosen by prometheus-client when it is first imported:

- **one process** (default): the metrics live in prometheus-client's default registry, so they
  appear on any ``/metrics`` that serves it (``serve()`` here, or vLLM's in single-process mode).
- **multiprocess** (``PROMETHEUS_MULTIPROC_DIR`` set before the first import, as vLLM does):
  each process writes its values to files in that folder; ``registry()`` returns a registry
  whose ``MultiProcessCollector`` adds them up. Counters and histograms sum across processes;
  each gauge declares how it combines (``livesum`` for sizes, ``livemostrecent`` for ratios),
  and a process that exits should be reported with ``mark_process_dead(pid)``.

Series (units in the names, counters end in ``_total``, ratios are 0..1). Labels: S = policy,
model; D = policy, layer_group; P = policy (for the expert cache: the cache policy).

- S ``kvkit_kv_resident_bytes``: bytes of tensors the store really allocated (``store.nbytes()``)
- S ``kvkit_kv_dense_equivalent_bytes``: bytes a dense bf16 store would hold for the same tokens
- S+codec,head_kind ``kvkit_kv_resident_part_bytes``: resident bytes split by codec and head kind
- S ``kvkit_compression_ratio``: resident / dense-equivalent (1 = nothing saved; page rounding
  and per-slot bookkeeping can push it past 1). Memory saved vs dense = 1 - this ratio.
- S ``kvkit_pages_capacity``, ``kvkit_pages_allocated``, ``kvkit_pages_free``: the page pools
- S ``kvkit_tokens_resident``: occupied slots over sequences, layers and KV heads
- D ``kvkit_pages_read_total``, ``kvkit_pages_dense_total``: pages decode steps read, and pages a
  dense read would have needed; sparsity over any interval = 1 - rate(read) / rate(dense)
- D ``kvkit_bytes_read_total``: K/V bytes decode steps read
- D ``kvkit_decode_sparsity_ratio``: 1 - read / dense of the latest decode step
- D ``kvkit_decode_seconds``, ``kvkit_selection_seconds``: histograms per decode step
- P ``kvkit_evicted_tokens_total``: tokens evicted
- P ``kvkit_selection_recall``: histogram (0..1) of the share of dense attention mass that the
  selected pages capture, on the decode steps where the caller measured it
- P ``kvkit_expert_cache_hits_total``, ``kvkit_expert_cache_misses_total``,
  ``kvkit_expert_bytes_moved_total``, ``kvkit_expert_prefetch_issued_total``,
  ``kvkit_expert_prefetch_useful_total``: the MoE expert cache

Labels are bounded (policy, model, layer group, codec, head kind): each label takes at most
``MAX_LABEL_VALUES`` distinct values, so a request id passed by mistake fails loudly instead
of growing the series without bound.

Example::

    from kvkit import metrics
    port = metrics.serve(0)                     # http://127.0.0.1:<port>/metrics
    metrics.observe_store(store, policy="streaming", model="smollm2")
    metrics.record_decode("streaming", pages_read=12, pages_total=40, bytes_read=98304,
                          seconds=0.004, selection_seconds=0.0003)
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

try:
    from prometheus_client import (
        REGISTRY as _DEFAULT_REGISTRY,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
        make_wsgi_app,
        multiprocess,
        values as _values,
    )
except ImportError as exc:  # an optional dependency: kvkit itself imports without it
    raise ImportError("kvkit.metrics needs prometheus-client: pip install 'kvkit[metrics]'") from exc

__all__ = [
    "MAX_LABEL_VALUES", "StoreLike", "exposition", "host_allowed", "mark_process_dead",
    "multiprocess_mode", "url_host",
    "observe_resident_parts", "observe_store", "record_decode", "record_evictions",
    "record_expert_cache", "record_selection_recall", "registry", "serve", "series_names",
]

MAX_LABEL_VALUES = 64  # distinct values one label may take in one process

_DECODE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_SELECTION_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05, 0.25, 1.0)
_RECALL_BUCKETS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)

_STORE = ("policy", "model")
_DECODE = ("policy", "layer_group")
_POLICY = ("policy",)


class StoreLike(Protocol):
    """What ``observe_store`` reads: ``kvkit.store.PagedKVStore`` or anything shaped like it."""

    def nbytes(self) -> int: ...
    def stats(self) -> Any: ...  # pages_capacity, pages_used, pages_free, tokens_resident, ...


def multiprocess_mode() -> bool:
    """True when prometheus-client writes values to ``PROMETHEUS_MULTIPROC_DIR`` files.

    prometheus-client decides once, when first imported; setting the variable later changes
    nothing, so this asks prometheus-client rather than the environment.
    """
    return bool(getattr(_values.ValueClass, "_multiprocess", False))


def _gauge(name: str, doc: str, labels: tuple[str, ...], mode: str) -> Gauge:
    # multiprocess_mode only matters in multiprocess mode; prometheus-client ignores it otherwise
    return Gauge(name, doc, labels, multiprocess_mode=mode)


# --- store: what is resident ------------------------------------------------------------------
KV_RESIDENT_BYTES = _gauge(
    "kvkit_kv_resident_bytes", "Bytes of K/V tensors the store really allocated.", _STORE, "livesum")
KV_DENSE_EQUIVALENT_BYTES = _gauge(
    "kvkit_kv_dense_equivalent_bytes",
    "Bytes a dense bf16 store would hold for the same tokens (baseline for memory saved).",
    _STORE, "livesum")
KV_RESIDENT_PART_BYTES = _gauge(
    "kvkit_kv_resident_part_bytes", "Resident K/V bytes split by codec and by head kind.",
    _STORE + ("codec", "head_kind"), "livesum")
COMPRESSION_RATIO = _gauge(
    "kvkit_compression_ratio",
    "Resident bytes / dense-equivalent bytes, 0..1 (1 = nothing saved; page rounding may pass 1).",
    _STORE, "livemostrecent")
PAGES_CAPACITY = _gauge("kvkit_pages_capacity", "Pages in the store's pool.", _STORE, "livesum")
PAGES_ALLOCATED = _gauge("kvkit_pages_allocated", "Pages holding tokens.", _STORE, "livesum")
PAGES_FREE = _gauge("kvkit_pages_free", "Pages free for new tokens.", _STORE, "livesum")
TOKENS_RESIDENT = _gauge("kvkit_tokens_resident", "Tokens the store holds.", _STORE, "livesum")

# --- decode: what each step reads -------------------------------------------------------------
PAGES_READ = Counter("kvkit_pages_read", "Pages read by decode steps.", _DECODE)
PAGES_DENSE = Counter(
    "kvkit_pages_dense", "Pages a dense read would have read in the same decode steps.", _DECODE)
BYTES_READ = Counter("kvkit_bytes_read", "K/V bytes read by decode steps.", _DECODE)
DECODE_SPARSITY = _gauge(
    "kvkit_decode_sparsity_ratio", "1 - pages read / dense pages, of the latest decode step.",
    _DECODE, "livemostrecent")
DECODE_SECONDS = Histogram(
    "kvkit_decode_seconds", "Seconds of one decode step.", _DECODE, buckets=_DECODE_BUCKETS)
SELECTION_SECONDS = Histogram(
    "kvkit_selection_seconds", "Seconds spent choosing pages in one decode step.", _DECODE,
    buckets=_SELECTION_BUCKETS)

# --- eviction and selection quality -----------------------------------------------------------
EVICTED_TOKENS = Counter("kvkit_evicted_tokens", "Tokens evicted from the store.", _POLICY)
SELECTION_RECALL = Histogram(
    "kvkit_selection_recall",
    "Share (0..1) of dense attention mass that the selected pages capture, on sampled steps.",
    _POLICY, buckets=_RECALL_BUCKETS)

# --- MoE expert cache -------------------------------------------------------------------------
EXPERT_HITS = Counter("kvkit_expert_cache_hits", "Expert lookups served from the cache.", _POLICY)
EXPERT_MISSES = Counter("kvkit_expert_cache_misses", "Expert lookups that missed.", _POLICY)
EXPERT_BYTES_MOVED = Counter(
    "kvkit_expert_bytes_moved", "Expert weight bytes moved into the cache.", _POLICY)
EXPERT_PREFETCH_ISSUED = Counter(
    "kvkit_expert_prefetch_issued", "Expert prefetches started.", _POLICY)
EXPERT_PREFETCH_USEFUL = Counter(
    "kvkit_expert_prefetch_useful", "Prefetched experts later used before eviction.", _POLICY)

_ALL = (
    KV_RESIDENT_BYTES, KV_DENSE_EQUIVALENT_BYTES, KV_RESIDENT_PART_BYTES, COMPRESSION_RATIO,
    PAGES_CAPACITY, PAGES_ALLOCATED, PAGES_FREE, TOKENS_RESIDENT, PAGES_READ, PAGES_DENSE,
    BYTES_READ, DECODE_SPARSITY, DECODE_SECONDS, SELECTION_SECONDS, EVICTED_TOKENS,
    SELECTION_RECALL, EXPERT_HITS, EXPERT_MISSES, EXPERT_BYTES_MOVED, EXPERT_PREFETCH_ISSUED,
    EXPERT_PREFETCH_USEFUL,
)

# --- bounded labels ---------------------------------------------------------------------------
_seen: dict[str, set[str]] = {}
_seen_lock = threading.Lock()


def _label(name: str, value: object) -> str:
    """Return ``value`` as a label value, refusing it if label ``name`` would grow unbounded."""
    if not isinstance(value, str):
        raise TypeError(f"kvkit.metrics: label {name!r} must be a str, got {type(value).__name__}")
    with _seen_lock:
        seen = _seen.setdefault(name, set())
        if value not in seen:
            if len(seen) >= MAX_LABEL_VALUES:
                raise ValueError(
                    f"kvkit.metrics: label {name!r} already has {len(seen)} distinct values "
                    f"(limit {MAX_LABEL_VALUES}); refusing {value!r}. Labels name a policy, model "
                    "or layer group, never a request or sequence id.")
            seen.add(value)
    return value


def _count(name: str, value: int) -> int:
    if value < 0:
        raise ValueError(f"kvkit.metrics: {name} must be >= 0, got {value}")
    return value


def _ratio(read: int, total: int) -> float:
    return 0.0 if total <= 0 else 1.0 - read / total


# --- the API the rest of kvkit calls ----------------------------------------------------------
def observe_store(store: StoreLike, policy: str, model: str = "") -> None:
    """Set the resident-memory gauges from ``store.nbytes()`` and ``store.stats()``.

    Call after appends or evictions (once per decode step is plenty). ``stats()`` must carry
    int fields ``pages_capacity``, ``pages_used``, ``pages_free``, ``tokens_resident`` and
    ``nbytes_dense_equivalent``.

    Raises:
        TypeError: ``stats()`` lacks one of those fields.
    """
    labels = (_label("policy", policy), _label("model", model))
    nbytes = int(store.nbytes())
    stats = store.stats()
    needed = ("pages_capacity", "pages_used", "pages_free", "tokens_resident",
              "nbytes_dense_equivalent")
    if missing := [f for f in needed if not hasattr(stats, f)]:
        raise TypeError(f"kvkit.metrics.observe_store: store.stats() has no {missing}; "
                        f"it needs {list(needed)} (see kvkit.store.PagedKVStore.stats)")
    dense = int(stats.nbytes_dense_equivalent)
    KV_RESIDENT_BYTES.labels(*labels).set(nbytes)
    KV_DENSE_EQUIVALENT_BYTES.labels(*labels).set(dense)
    COMPRESSION_RATIO.labels(*labels).set(nbytes / dense if dense > 0 else 1.0)
    PAGES_CAPACITY.labels(*labels).set(int(stats.pages_capacity))
    PAGES_ALLOCATED.labels(*labels).set(int(stats.pages_used))
    PAGES_FREE.labels(*labels).set(int(stats.pages_free))
    TOKENS_RESIDENT.labels(*labels).set(int(stats.tokens_resident))


def observe_resident_parts(policy: str, parts: Mapping[tuple[str, str], int],
                           model: str = "") -> None:
    """Set resident bytes split by part: ``parts[(codec, head_kind)] = bytes``.

    Example: ``{("bf16", "retrieval"): 3_145_728, ("bf16", "streaming"): 262_144}``.
    """
    for (codec, head_kind), nbytes in parts.items():
        KV_RESIDENT_PART_BYTES.labels(
            _label("policy", policy), _label("model", model), _label("codec", codec),
            _label("head_kind", head_kind)).set(_count("nbytes", int(nbytes)))


def record_decode(policy: str, pages_read: int, pages_total: int, bytes_read: int,
                  seconds: float, selection_seconds: float = 0.0,
                  layer_group: str = "all") -> None:
    """Count one decode step: pages and bytes read out of ``pages_total`` a dense read needs.

    Raises:
        ValueError: a negative count, or more pages read than ``pages_total``.
    """
    if pages_read > pages_total:
        raise ValueError(f"kvkit.metrics.record_decode: pages_read={pages_read} exceeds "
                         f"pages_total={pages_total}; pass the pages a dense read would need")
    labels = (_label("policy", policy), _label("layer_group", layer_group))
    PAGES_READ.labels(*labels).inc(_count("pages_read", pages_read))
    PAGES_DENSE.labels(*labels).inc(_count("pages_total", pages_total))
    BYTES_READ.labels(*labels).inc(_count("bytes_read", bytes_read))
    DECODE_SPARSITY.labels(*labels).set(_ratio(pages_read, pages_total))
    DECODE_SECONDS.labels(*labels).observe(seconds)
    SELECTION_SECONDS.labels(*labels).observe(selection_seconds)


def record_evictions(policy: str, tokens: int) -> None:
    """Count ``tokens`` evicted from the store under ``policy``."""
    EVICTED_TOKENS.labels(_label("policy", policy)).inc(_count("tokens", tokens))


def record_selection_recall(policy: str, recall: float) -> None:
    """Record one sampled recall: the share (0..1) of dense attention mass the selection kept.

    Raises:
        ValueError: ``recall`` outside [0, 1].
    """
    if not 0.0 <= recall <= 1.0:
        raise ValueError(f"kvkit.metrics.record_selection_recall: recall must be in [0, 1], "
                         f"got {recall}")
    SELECTION_RECALL.labels(_label("policy", policy)).observe(recall)


def record_expert_cache(policy: str, hits: int, misses: int, bytes_moved: int,
                        prefetch_issued: int = 0, prefetch_useful: int = 0) -> None:
    """Count expert-cache lookups, weight bytes moved and prefetches for cache ``policy``."""
    label = _label("policy", policy)
    EXPERT_HITS.labels(label).inc(_count("hits", hits))
    EXPERT_MISSES.labels(label).inc(_count("misses", misses))
    EXPERT_BYTES_MOVED.labels(label).inc(_count("bytes_moved", bytes_moved))
    EXPERT_PREFETCH_ISSUED.labels(label).inc(_count("prefetch_issued", prefetch_issued))
    EXPERT_PREFETCH_USEFUL.labels(label).inc(_count("prefetch_useful", prefetch_useful))


# --- exposition -------------------------------------------------------------------------------
def registry() -> CollectorRegistry:
    """The registry to expose: the default one, or a multiprocess collector over all processes."""
    if not multiprocess_mode():
        return _DEFAULT_REGISTRY
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"kvkit.metrics: PROMETHEUS_MULTIPROC_DIR={path!r} is not a "
                                "folder; create it (empty) before the processes start")
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg, path=path)
    return reg


def exposition() -> bytes:
    """The current ``/metrics`` body (Prometheus text format) as ``serve`` would answer it."""
    return generate_latest(registry())


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def host_allowed(host: str | None, addrs: Iterable[str], port: int) -> bool:
    """Whether a request's ``Host`` header names a server bound to ``addrs`` on ``port``.

    A guard against DNS rebinding: a web page can point its own host name at 127.0.0.1 and then
    read a loopback server, but its requests still carry that name in ``Host``. Allowed: one of
    ``addrs`` (the address asked for, the one bound) with ``port``; when bound to loopback, also
    ``localhost`` and the loopback addresses (``127.0.0.1``, ``[::1]``); when bound to every
    interface (``0.0.0.0``, ``::``), ``localhost`` and any IP address, since the server cannot
    know its host names. A missing port means 80. Limits: any other name is refused, so reach
    a server bound to all interfaces by IP address.
    """
    if not host or any(c in host for c in "@/\\?# "):
        return False
    try:
        parts = urllib.parse.urlsplit("//" + host)
        name, asked_port = (parts.hostname or "").rstrip("."), parts.port or 80
    except ValueError:  # a port that is no number, an unclosed bracket
        return False
    if not name or asked_port != port:
        return False
    bound = {a.lower().strip("[]") for a in addrs}
    ip, bound_ips = _ip(name), {b for a in bound if (b := _ip(a)) is not None}
    if name in bound or ip in bound_ips:
        return True
    if "localhost" in bound or any(b.is_loopback for b in bound_ips):
        return name == "localhost" or (ip is not None and ip.is_loopback)
    if "" in bound or any(b.is_unspecified for b in bound_ips):
        return name == "localhost" or ip is not None
    return False


def url_host(addr: str) -> str:
    """``addr`` as the host part of a URL: IPv6 addresses in brackets."""
    return f"[{addr}]" if ":" in addr else addr


def _host_checked(app: Callable[..., Any], addrs: Iterable[str], port: int) -> Callable[..., Any]:
    """WSGI middleware: 403 for a request whose Host header fails ``host_allowed``."""
    addrs = tuple(addrs)

    def checked(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if host_allowed(environ.get("HTTP_HOST"), addrs, port):
            return app(environ, start_response)
        start_response("403 Forbidden", [("Content-Type", "text/plain")])
        return [f"kvkit metrics: Host {environ.get('HTTP_HOST')!r} is not this server's address; "
                f"ask for http://{url_host(addrs[-1])}:{port}/metrics (DNS rebinding guard)\n".encode()]

    return checked


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        pass  # a scrape every few seconds would flood stderr


def serve(port: int = 0, addr: str = "127.0.0.1") -> int:
    """Serve ``/metrics`` from a daemon thread; return the bound port (``port=0`` picks one).

    prometheus-client's WSGI app (``make_wsgi_app``, the app its ``start_http_server`` serves)
    in a threading wsgiref server, behind a Host-header check: a request whose ``Host`` does
    not name this server (see ``host_allowed``) gets 403, so a web page cannot read the metrics
    through DNS rebinding. Binds loopback unless ``addr`` says otherwise.
    """
    family, *_, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM,
                                              flags=socket.AI_PASSIVE)[0]
    server_class = type("_MetricsServer", (ThreadingMixIn, WSGIServer),
                        {"address_family": family, "daemon_threads": True})
    server = make_server(sockaddr[0], port, make_wsgi_app(registry()), server_class, _QuietHandler)
    bound = int(server.server_port)
    server.set_app(_host_checked(server.get_app(), (addr, sockaddr[0]), bound))
    threading.Thread(target=server.serve_forever, name="kvkit-metrics", daemon=True).start()
    return bound


def mark_process_dead(pid: int) -> None:
    """Multiprocess mode: drop the live gauges of process ``pid`` (call when a worker exits)."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)


def series_names() -> frozenset[str]:
    """Every sample name kvkit exports (``_total``, ``_bucket``, ``_sum``, ``_count`` included)."""
    names: set[str] = set()
    for metric in _ALL:
        base = metric.describe()[0].name  # counters are described without their _total
        if isinstance(metric, Counter):
            names |= {f"{base}_total", f"{base}_created"}
        elif isinstance(metric, Histogram):
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
        else:
            names.add(base)
    return frozenset(names)
