"""A real Prometheus server scrapes a running kvkit workload; PromQL must see what it recorded.

Needs Debian's `prometheus` (bash tests/metrics/install_system_packages.sh); fails if missing.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvkit.integrations.dashboard.sources import PromSource, snapshot

pytestmark = pytest.mark.system

GRAFANA = Path(__file__).resolve().parents[2] / "integrations" / "grafana" / "kvkit.json"
SCRAPE_SECONDS = 1


class Prometheus:
    """A prometheus process on 127.0.0.1 and a small client for its query API."""

    def __init__(self, proc: subprocess.Popen, url: str, http_get: Callable[..., bytes]) -> None:
        self.proc, self.url, self._get = proc, url, http_get

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """Instant query; (labels, value) per series. Fails on a query error."""
        body = json.loads(self._get(f"{self.url}/api/v1/query?"
                                    + urllib.parse.urlencode({"query": promql})))
        assert body["status"] == "success", f"{promql}: {body}"
        return [(r["metric"], float(r["value"][1])) for r in body["data"]["result"]]

    def value(self, promql: str) -> float:
        """The single value of `promql`; fails unless exactly one series comes back."""
        result = self.query(promql)
        assert len(result) == 1, f"{promql} returned {len(result)} series: {result}"
        return result[0][1]


@pytest.fixture
def start_prometheus(tmp_path: Path, helpers) -> Iterator[Callable[[list[int]], Prometheus]]:
    """Start prometheus scraping the given loopback ports every second; stopped afterwards."""
    binary = helpers.require_binary("prometheus")
    procs: list[subprocess.Popen] = []

    def start(ports: list[int]) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        targets = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
        config.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_SECONDS}s\n"
            f"  evaluation_interval: {SCRAPE_SECONDS}s\n"
            "scrape_configs:\n"
            "  - job_name: kvkit\n"
            f"    scrape_timeout: {SCRAPE_SECONDS}s\n"
            f"    static_configs: [{{targets: [{targets}]}}]\n")
        for attempt in range(3):  # the free port may be taken between choosing and binding it
            port = helpers.free_port()
            log = (tmp_path / f"prometheus-{attempt}.log").open("w")
            proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
            log.close()
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"

            def ready() -> bool:
                if proc.poll() is not None:
                    return True  # exited: stop waiting, handled below
                return helpers.http_get(f"{url}/-/ready", timeout=2).startswith(b"Prometheus")
            helpers.wait_until(ready, 60, f"prometheus at {url} to be ready")
            if proc.poll() is None:
                return Prometheus(proc, url, helpers.http_get)
        pytest.fail("prometheus exited at start three times; see "
                    f"{tmp_path}/prometheus-*.log:\n{(tmp_path / 'prometheus-2.log').read_text()[-2000:]}")

    yield start
    for proc in procs:
        helpers.stop(proc)


def test_promql_sees_the_values_the_workload_recorded(start_workload, start_prometheus, helpers):
    work = start_workload(steps=40, step_seconds=0.02, hold=180)
    prom = start_prometheus([work.port])
    summary = work.summary()
    sent, stores, steps = summary["sent"], summary["stores"], summary["steps"]

    # the workload is done and holds still: wait for a scrape taken after its last step
    helpers.wait_until(
        lambda: prom.query('kvkit_decode_seconds_count{policy="streaming"}') and
        prom.value('kvkit_decode_seconds_count{policy="streaming"}') == steps,
        60, f"Prometheus to scrape all {steps} decode steps")
    assert prom.value('up{job="kvkit"}') == 1

    for policy in ("dense", "streaming"):
        labels = f'policy="{policy}", model="{summary["model"]}"'
        final = stores[policy]
        assert prom.value(f"kvkit_kv_resident_bytes{{{labels}}}") == final["nbytes"]
        assert prom.value(f"kvkit_kv_dense_equivalent_bytes{{{labels}}}") == \
            final["nbytes_dense_equivalent"]
        assert prom.value(f"kvkit_tokens_resident{{{labels}}}") == final["tokens_resident"]
        assert prom.value(f"kvkit_pages_allocated{{{labels}}}") == final["pages_used"]
        assert prom.value(f"kvkit_pages_free{{{labels}}}") == final["pages_free"]
        for series in ("pages_read", "pages_dense", "bytes_read"):
            assert prom.value(f'kvkit_{series}_total{{policy="{policy}"}}') == sent[policy][series]

    # resident bytes drop when streaming replaces dense, for the same tokens
    drop = prom.query('kvkit_kv_resident_bytes{policy="streaming"} '
                      '< ignoring(policy) kvkit_kv_resident_bytes{policy="dense"}')
    assert len(drop) == 1, "streaming should hold fewer resident bytes than dense"
    saved = prom.value('1 - kvkit_kv_resident_bytes{policy="streaming"} '
                       '/ kvkit_kv_dense_equivalent_bytes{policy="streaming"}')
    assert saved == pytest.approx(1 - stores["streaming"]["nbytes"]
                                  / stores["streaming"]["nbytes_dense_equivalent"])
    assert saved > 0.5

    sparsity = dict((labels["policy"], v) for labels, v in prom.query(
        "1 - sum by (policy) (kvkit_pages_read_total) / sum by (policy) (kvkit_pages_dense_total)"))
    assert sparsity["dense"] == 0
    assert sparsity["streaming"] == pytest.approx(
        1 - sent["streaming"]["pages_read"] / sent["streaming"]["pages_dense"])
    assert prom.value('kvkit_decode_sparsity_ratio{policy="dense"}') == 0

    assert prom.value('kvkit_evicted_tokens_total{policy="streaming"}') == \
        sent["streaming"]["evicted_tokens"] > 0
    assert prom.query('kvkit_evicted_tokens_total{policy="dense"}') == []  # never evicted
    recall = dict((labels["policy"], v) for labels, v in prom.query(
        "kvkit_selection_recall_sum / kvkit_selection_recall_count"))
    assert recall["dense"] == pytest.approx(1.0)
    assert recall["streaming"] == pytest.approx(
        sent["streaming"]["recall_sum"] / sent["streaming"]["recall_count"])
    assert recall["streaming"] < 1.0

    for series in ("hits", "misses"):
        assert prom.value(f'kvkit_expert_cache_{series}_total{{policy="lru"}}') == sent["lru"][series]
    assert prom.value('kvkit_expert_bytes_moved_total{policy="lru"}') == sent["lru"]["bytes_moved"]
    assert prom.value('kvkit_expert_prefetch_useful_total{policy="lru"}') == \
        sent["lru"]["prefetch_useful"]
    p50 = prom.value('histogram_quantile(0.5, kvkit_decode_seconds_bucket{policy="dense"})')
    assert 0 < p50 < 10


def grafana_queries() -> list[tuple[str, str]]:
    dash = json.loads(GRAFANA.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def test_grafana_queries_and_dashboard_read_a_live_prometheus(start_workload, start_prometheus,
                                                              helpers):
    work = start_workload(steps=400, step_seconds=0.05, hold=60)
    prom = start_prometheus([work.port])
    helpers.wait_until(
        lambda: prom.query('count_over_time(kvkit_decode_seconds_count{policy="streaming"}[1m]) > 6'),
        90, "Prometheus to hold 7 scrapes of the running workload")

    variables = {"$policy": ".*", "$model": ".*", "$cache_policy": ".*",
                 "$__rate_interval": f"{4 * SCRAPE_SECONDS}s"}
    empty = []
    for title, expr in grafana_queries():
        concrete = re.sub(r"\$\w+", lambda m: variables[m.group(0)], expr)
        result = prom.query(concrete)  # fails on a PromQL error
        if not [v for _, v in result if not math.isnan(v)]:
            empty.append(title)
    assert not empty, f"Grafana panels with no data on a live workload: {empty}"

    # `kvkit dashboard --prometheus URL` reads the same server
    snap = snapshot(PromSource(prom.url, window=f"{4 * SCRAPE_SECONDS}s"))
    assert snap["error"] is None
    streaming, dense = snap["kv"]["streaming"], snap["kv"]["dense"]
    assert streaming["resident_bytes"] < dense["resident_bytes"]
    assert streaming["memory_saved"] > 0.4 and dense["memory_saved"] < 0.05
    assert streaming["sparsity"] > 0.5 and dense["sparsity"] == pytest.approx(0)
    assert streaming["eviction_tokens_per_s"] > 0 and not dense["eviction_tokens_per_s"]
    assert 0 <= snap["experts"]["lru"]["hit_rate"] <= 1
    assert snap["totals"]["policies"] == ["dense", "streaming"]
