"""Where the dashboard's numbers come from: a ``/metrics`` endpoint or a Prometheus server.

Both sources produce the same ``Reading`` — per policy, the kvkit gauges (current values),
the counters (cumulative) and the counters' per-second rates — and ``snapshot()`` turns a
reading into the JSON the page draws:

- ``MetricsSource`` scrapes a kvkit ``/metrics`` endpoint, parses the Prometheus text format and
  takes rates as the change since its previous scrape (the first scrape has no rates).
- ``PromSource`` asks a Prometheus server's HTTP query API: current sums for gauges and counters,
  ``rate(...[window])`` for rates, summed over every scraped kvkit process.

Both take only http(s) URLs. Whatever goes wrong in a read (no answer, HTML, a malformed line,
broken JSON) raises ``SourceError`` with a one-line message quoting at most a short excerpt of
the response, and ``snapshot()`` turns it into the snapshot's ``error`` field.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Protocol

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as exc:
    raise ImportError("kvkit dashboard needs prometheus-client: pip install 'kvkit[metrics]'") from exc

# dashboard field -> kvkit sample name
KV_GAUGES = {
    "resident_bytes": "kvkit_kv_resident_bytes",
    "dense_bytes": "kvkit_kv_dense_equivalent_bytes",
    "tokens_resident": "kvkit_tokens_resident",
    "pages_allocated": "kvkit_pages_allocated",
    "pages_free": "kvkit_pages_free",
}
KV_COUNTERS = {
    "pages_read": "kvkit_pages_read_total",
    "pages_dense": "kvkit_pages_dense_total",
    "bytes_read": "kvkit_bytes_read_total",
    "evicted_tokens": "kvkit_evicted_tokens_total",
    "decode_seconds_sum": "kvkit_decode_seconds_sum",
    "decode_steps": "kvkit_decode_seconds_count",
    "recall_sum": "kvkit_selection_recall_sum",
    "recall_count": "kvkit_selection_recall_count",
}
EXPERT_COUNTERS = {
    "hits": "kvkit_expert_cache_hits_total",
    "misses": "kvkit_expert_cache_misses_total",
    "bytes_moved": "kvkit_expert_bytes_moved_total",
    "prefetch_issued": "kvkit_expert_prefetch_issued_total",
    "prefetch_useful": "kvkit_expert_prefetch_useful_total",
}
LAST_SPARSITY = "kvkit_decode_sparsity_ratio"

PerPolicy = dict[str, dict[str, float]]  # policy -> field -> value


@dataclass
class Reading:
    """One poll: per-policy gauges, cumulative counters, and counter rates (per second)."""

    gauges: PerPolicy = field(default_factory=dict)
    counters: PerPolicy = field(default_factory=dict)
    rates: PerPolicy | None = None  # None: not known yet (first scrape of a /metrics endpoint)


class Source(Protocol):
    """Anything the dashboard server can poll."""

    url: str
    kind: str

    def read(self) -> Reading: ...


class SourceError(RuntimeError):
    """The metrics endpoint or Prometheus server could not be read; the message says why."""


EXCERPT_CHARS = 60  # of a bad response, quoted in the error message


def excerpt(text: str | bytes) -> str:
    """The first ``EXCERPT_CHARS`` characters of ``text`` as one quoted line (for error messages)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    short = text[:EXCERPT_CHARS]
    return repr(short) + ("..." if len(text) > EXCERPT_CHARS else "")


def check_url(url: str, option: str, example: str) -> str:
    """Return ``url`` if it is an http(s) URL with a host; raise a one-line ValueError if not.

    Other schemes are refused: urllib would read ``file://`` (any local file) and more.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed [ipv6 bracket
        ok = False
    if not ok:
        raise ValueError(f"{option} must be an http(s) URL such as {example}, got {excerpt(url)}")
    return url


def _get(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (user's URL)
            return resp.read()
    except (urllib.error.URLError, OSError) as exc:
        raise SourceError(f"cannot read {url}: {exc}. Is the kvkit process (or Prometheus) "
                          "running there? Check --metrics-url / --prometheus.") from exc


def _add(table: PerPolicy, policy: str, name: str, value: float) -> None:
    if math.isnan(value):
        return
    row = table.setdefault(policy, {})
    row[name] = row.get(name, 0.0) + value


# --- a /metrics endpoint ----------------------------------------------------------------------
def parse_exposition(text: str) -> tuple[PerPolicy, PerPolicy, dict[str, list[float]]]:
    """Sum kvkit samples by policy: (gauges, counters, latest sparsity values per policy).

    Raises:
        ValueError: ``text`` is not the Prometheus text format (prometheus-client's message,
            which may quote the offending line in full).
    """
    by_sample = {v: k for k, v in {**KV_GAUGES, **KV_COUNTERS, **EXPERT_COUNTERS}.items()}
    gauges: PerPolicy = {}
    counters: PerPolicy = {}
    sparsity: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            policy = sample.labels.get("policy")
            if policy is None:
                continue
            if sample.name == LAST_SPARSITY:
                sparsity.setdefault(policy, []).append(sample.value)
            elif sample.name in KV_GAUGES.values():
                _add(gauges, policy, by_sample[sample.name], sample.value)
            elif sample.name in by_sample:
                _add(counters, policy, by_sample[sample.name], sample.value)
    return gauges, counters, sparsity


class MetricsSource:
    """Scrape a kvkit ``/metrics`` endpoint; rates are the change since the previous scrape."""

    kind = "metrics"

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = check_url(url, "--metrics-url", "http://127.0.0.1:9400/metrics")
        self.timeout = timeout
        self._previous: tuple[float, PerPolicy] | None = None

    def read(self) -> Reading:
        """Scrape once. Raises ``SourceError`` (one line) if the URL gives no Prometheus text."""
        text = _get(self.url, self.timeout).decode("utf-8", errors="replace")
        now = time.monotonic()
        try:
            gauges, counters, sparsity = parse_exposition(text)
        except ValueError as exc:
            raise SourceError(f"{self.url} answered, but not Prometheus text ({excerpt(str(exc))}; "
                              f"the body starts {excerpt(text)}). Is --metrics-url a kvkit "
                              "/metrics endpoint?") from None
        for policy, values in sparsity.items():
            gauges.setdefault(policy, {})["last_sparsity"] = sum(values) / len(values)
        rates = None
        if self._previous is not None:
            then, before = self._previous
            dt = max(now - then, 1e-6)
            rates = {}
            for policy, row in counters.items():
                old = before.get(policy, {})
                # a counter that went down means the process restarted: count from zero
                rates[policy] = {k: (v - old.get(k, 0.0) if v >= old.get(k, 0.0) else v) / dt
                                 for k, v in row.items()}
        self._previous = (now, counters)
        return Reading(gauges=gauges, counters=counters, rates=rates)


# --- a Prometheus server ----------------------------------------------------------------------
def _union(parts: dict[str, str]) -> str:
    """One PromQL query returning every part, each tagged with label ``field``."""
    return " or ".join(f'label_replace({expr}, "field", "{name}", "", "")'
                       for name, expr in parts.items())


class PromSource:
    """Read kvkit series from a Prometheus server's ``/api/v1/query`` (summed over targets)."""

    kind = "prometheus"

    def __init__(self, url: str, window: str = "1m", timeout: float = 5.0) -> None:
        self.url = check_url(url, "--prometheus", "http://127.0.0.1:9090").rstrip("/")
        self.window = window
        self.timeout = timeout
        gauges = {**KV_GAUGES}
        counters = {**KV_COUNTERS, **EXPERT_COUNTERS}
        self.queries = {
            "gauges": _union({**{k: f"sum by (policy) ({v})" for k, v in gauges.items()},
                              "last_sparsity": f"avg by (policy) ({LAST_SPARSITY})"}),
            "counters": _union({k: f"sum by (policy) ({v})" for k, v in counters.items()}),
            "rates": _union({k: f"sum by (policy) (rate({v}[{window}]))"
                             for k, v in counters.items()}),
        }

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Run an instant query; return its ``result`` list (vector samples).

        Raises:
            SourceError: no answer, an answer that is not the query API's JSON, or a refusal.
        """
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        raw = _get(url, self.timeout)
        try:
            body = json.loads(raw)
            status = body.get("status")
        except (ValueError, AttributeError):
            raise self._bad_answer(raw) from None
        if status != "success":
            reason = f"{body.get('errorType')}: {body.get('error')}"
            raise SourceError(f"Prometheus at {self.url} refused the query: {excerpt(reason)}")
        try:
            return list(body["data"]["result"])
        except (KeyError, TypeError):
            raise self._bad_answer(raw) from None

    def _bad_answer(self, raw: bytes) -> SourceError:
        return SourceError(f"Prometheus at {self.url} answered, but not with its query API's JSON "
                           f"(the body starts {excerpt(raw)}). Is --prometheus a Prometheus "
                           "server's base URL?")

    def _table(self, promql: str) -> PerPolicy:
        table: PerPolicy = {}
        for item in self.query(promql):
            try:
                labels = item["metric"]
                if "policy" in labels:
                    _add(table, labels["policy"], labels["field"], float(item["value"][1]))
            except (KeyError, TypeError, IndexError, ValueError):
                raise SourceError(f"Prometheus at {self.url} answered a sample the dashboard "
                                  f"cannot read: {excerpt(json.dumps(item))}") from None
        return table

    def read(self) -> Reading:
        return Reading(gauges=self._table(self.queries["gauges"]),
                       counters=self._table(self.queries["counters"]),
                       rates=self._table(self.queries["rates"]))


# --- from a reading to what the page shows ----------------------------------------------------
def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def _interval_or_total(rates: dict[str, float] | None, totals: dict[str, float],
                       num: str, den: str) -> float | None:
    """num/den over the recent interval when it saw any, else since the process started."""
    if rates and rates.get(den):
        return rates.get(num, 0.0) / rates[den]
    return _ratio(totals.get(num), totals.get(den))


def snapshot(source: Source) -> dict[str, Any]:
    """Poll ``source`` once and return the page's JSON: per-policy rows and headline totals."""
    started = time.time()
    try:
        reading = source.read()
    except SourceError as exc:
        return {"time": started, "source": source.kind, "url": source.url, "error": str(exc),
                "kv": {}, "experts": {}, "totals": {}}
    rates = reading.rates or {}
    kv: dict[str, dict[str, float | None]] = {}
    experts: dict[str, dict[str, float | None]] = {}
    for policy in sorted(set(reading.gauges) | set(reading.counters)):
        g, c, r = reading.gauges.get(policy, {}), reading.counters.get(policy, {}), rates.get(policy)
        if "hits" in c or "misses" in c:
            experts[policy] = {
                "hit_rate": _hit_rate(r, c),
                "bytes_moved_per_s": None if r is None else r.get("bytes_moved", 0.0),
                "prefetch_accuracy": _ratio(c.get("prefetch_useful"), c.get("prefetch_issued")),
                "lookups": c.get("hits", 0.0) + c.get("misses", 0.0),
            }
        if g or "pages_read" in c or "evicted_tokens" in c:
            sparsity = _interval_or_total(r, c, "pages_read", "pages_dense")
            kv[policy] = {
                "resident_bytes": g.get("resident_bytes"),
                "dense_bytes": g.get("dense_bytes"),
                "memory_saved": _saved(g.get("resident_bytes"), g.get("dense_bytes")),
                "tokens_resident": g.get("tokens_resident"),
                "pages_allocated": g.get("pages_allocated"),
                "pages_free": g.get("pages_free"),
                "sparsity": g.get("last_sparsity") if sparsity is None else 1.0 - sparsity,
                "eviction_tokens_per_s": None if r is None else r.get("evicted_tokens", 0.0),
                "decode_ms": _scaled(_interval_or_total(r, c, "decode_seconds_sum",
                                                        "decode_steps"), 1e3),
                "selection_recall": _interval_or_total(r, c, "recall_sum", "recall_count"),
                "decode_steps": c.get("decode_steps"),
            }
    return {"time": started, "source": source.kind, "url": source.url, "error": None,
            "kv": kv, "experts": experts, "totals": _totals(reading, rates, kv)}


def _hit_rate(r: dict[str, float] | None, c: dict[str, float]) -> float | None:
    if r and (r.get("hits", 0.0) + r.get("misses", 0.0)) > 0:
        return r.get("hits", 0.0) / (r.get("hits", 0.0) + r.get("misses", 0.0))
    return _ratio(c.get("hits", 0.0), c.get("hits", 0.0) + c.get("misses", 0.0))


def _saved(resident: float | None, dense: float | None) -> float | None:
    return None if resident is None or not dense else 1.0 - resident / dense


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _totals(reading: Reading, rates: PerPolicy, kv: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers over all policies."""
    def total(table: PerPolicy, name: str) -> float:
        return sum(row.get(name, 0.0) for row in table.values())

    hits, misses = total(rates, "hits"), total(rates, "misses")
    if hits + misses == 0:
        hits, misses = total(reading.counters, "hits"), total(reading.counters, "misses")
    read, dense = total(rates, "pages_read"), total(rates, "pages_dense")
    if dense == 0:
        read, dense = total(reading.counters, "pages_read"), total(reading.counters, "pages_dense")
    return {
        "memory_saved": _saved(total(reading.gauges, "resident_bytes"),
                               total(reading.gauges, "dense_bytes")),
        "resident_bytes": total(reading.gauges, "resident_bytes"),
        "dense_bytes": total(reading.gauges, "dense_bytes"),
        "sparsity": None if dense == 0 else 1.0 - read / dense,
        "eviction_tokens_per_s": None if reading.rates is None else total(rates, "evicted_tokens"),
        "expert_hit_rate": None if hits + misses == 0 else hits / (hits + misses),
        "policies": sorted(kv),
    }
