"""kvkit.metrics in one process and in prometheus-client's multiprocess mode (no system packages)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from kvkit import metrics
from kvkit.store import PagedKVStore


def value(name: str, **labels: str) -> float | None:
    return metrics.registry().get_sample_value(name, labels)


def small_store(tokens: int) -> PagedKVStore:
    store = PagedKVStore(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4)
    seq = store.add_sequence()
    for layer in range(2):
        store.append(seq, layer, torch.randn(tokens, 2, 8), torch.randn(tokens, 2, 8))
    return store


def test_series_names_follow_prometheus_conventions():
    names = metrics.series_names()
    assert all(n.startswith("kvkit_") for n in names)
    for required in ("kvkit_kv_resident_bytes", "kvkit_pages_allocated", "kvkit_pages_free",
                     "kvkit_tokens_resident", "kvkit_compression_ratio", "kvkit_pages_read_total",
                     "kvkit_bytes_read_total", "kvkit_decode_sparsity_ratio",
                     "kvkit_decode_seconds_bucket", "kvkit_selection_seconds_sum",
                     "kvkit_evicted_tokens_total", "kvkit_selection_recall_count",
                     "kvkit_expert_cache_hits_total", "kvkit_expert_cache_misses_total",
                     "kvkit_expert_bytes_moved_total", "kvkit_expert_prefetch_useful_total"):
        assert required in names


def test_observe_store_reports_what_the_store_allocated():
    store = small_store(tokens=10)
    metrics.observe_store(store, policy="t_observe", model="m")
    stats = store.stats()
    labels = {"policy": "t_observe", "model": "m"}
    assert value("kvkit_kv_resident_bytes", **labels) == store.nbytes()
    assert value("kvkit_kv_dense_equivalent_bytes", **labels) == stats.nbytes_dense_equivalent
    assert value("kvkit_pages_allocated", **labels) == stats.pages_used
    assert value("kvkit_pages_free", **labels) == stats.pages_free
    assert value("kvkit_pages_capacity", **labels) == stats.pages_capacity
    assert value("kvkit_tokens_resident", **labels) == stats.tokens_resident == 2 * 2 * 10
    assert value("kvkit_compression_ratio", **labels) == pytest.approx(
        store.nbytes() / stats.nbytes_dense_equivalent)


def test_observe_store_follows_eviction():
    store = small_store(tokens=16)
    metrics.observe_store(store, policy="t_evict")
    before = value("kvkit_tokens_resident", policy="t_evict", model="")
    for layer in range(2):
        for head in range(2):
            store.evict(0, layer, head, range(8))
    metrics.observe_store(store, policy="t_evict")
    assert value("kvkit_tokens_resident", policy="t_evict", model="") == before - 2 * 2 * 8
    assert value("kvkit_pages_allocated", policy="t_evict", model="") == store.stats().pages_used


def test_record_decode_counts_pages_bytes_and_sparsity():
    for read, total in ((3, 12), (6, 12)):
        metrics.record_decode("t_decode", read, total, bytes_read=read * 100, seconds=0.002,
                              selection_seconds=0.0005, layer_group="upper")
    labels = {"policy": "t_decode", "layer_group": "upper"}
    assert value("kvkit_pages_read_total", **labels) == 9
    assert value("kvkit_pages_dense_total", **labels) == 24
    assert value("kvkit_bytes_read_total", **labels) == 900
    assert value("kvkit_decode_sparsity_ratio", **labels) == pytest.approx(0.5)  # latest step
    assert value("kvkit_decode_seconds_count", **labels) == 2
    assert value("kvkit_decode_seconds_sum", **labels) == pytest.approx(0.004)
    assert value("kvkit_selection_seconds_sum", **labels) == pytest.approx(0.001)
    assert value("kvkit_decode_seconds_bucket", **labels, le="0.0025") == 2


def test_evictions_recall_and_expert_cache_are_counted():
    metrics.record_evictions("t_misc", 7)
    metrics.record_evictions("t_misc", 5)
    metrics.record_selection_recall("t_misc", 0.97)
    metrics.record_selection_recall("t_misc", 0.5)
    metrics.record_expert_cache("t_misc", hits=3, misses=1, bytes_moved=4096,
                                prefetch_issued=2, prefetch_useful=1)
    assert value("kvkit_evicted_tokens_total", policy="t_misc") == 12
    assert value("kvkit_selection_recall_count", policy="t_misc") == 2
    assert value("kvkit_selection_recall_sum", policy="t_misc") == pytest.approx(1.47)
    assert value("kvkit_selection_recall_bucket", policy="t_misc", le="0.98") == 2
    assert value("kvkit_selection_recall_bucket", policy="t_misc", le="0.95") == 1
    assert value("kvkit_expert_cache_hits_total", policy="t_misc") == 3
    assert value("kvkit_expert_cache_misses_total", policy="t_misc") == 1
    assert value("kvkit_expert_bytes_moved_total", policy="t_misc") == 4096
    assert value("kvkit_expert_prefetch_issued_total", policy="t_misc") == 2
    assert value("kvkit_expert_prefetch_useful_total", policy="t_misc") == 1


@pytest.mark.parametrize("call, match", [
    (lambda: metrics.record_selection_recall("t_err", 1.5), r"recall must be in \[0, 1\]"),
    (lambda: metrics.record_decode("t_err", 5, 4, 0, 0.1), "pages_read=5 exceeds pages_total=4"),
    (lambda: metrics.record_evictions("t_err", -1), "tokens must be >= 0"),
    (lambda: metrics.record_expert_cache("t_err", -1, 0, 0), "hits must be >= 0"),
])
def test_bad_values_raise_and_record_nothing(call, match):
    with pytest.raises(ValueError, match=match):
        call()
    assert value("kvkit_evicted_tokens_total", policy="t_err") in (None, 0)
    assert value("kvkit_pages_read_total", policy="t_err", layer_group="all") in (None, 0)


def test_observe_store_names_missing_stats_fields():
    class NoStats:
        def nbytes(self) -> int:
            return 0

        def stats(self) -> object:
            return object()

    with pytest.raises(TypeError, match="store.stats\\(\\) has no .*pages_capacity"):
        metrics.observe_store(NoStats(), policy="t_bad")


def test_labels_are_bounded(monkeypatch):
    monkeypatch.setattr(metrics, "_seen", {})
    monkeypatch.setattr(metrics, "MAX_LABEL_VALUES", 3)
    for i in range(3):
        metrics.record_evictions(f"t_bound{i}", 1)
    with pytest.raises(ValueError, match="never a request or sequence id"):
        metrics.record_evictions("request-8f3a", 1)
    with pytest.raises(TypeError, match="label 'policy' must be a str"):
        metrics.record_evictions(7, 1)  # type: ignore[arg-type]


def test_exposition_is_prometheus_text_with_help_and_type():
    metrics.record_decode("t_text", 1, 4, 64, 0.001)
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert families["kvkit_pages_read"].type == "counter"
    assert families["kvkit_decode_seconds"].type == "histogram"
    assert families["kvkit_decode_sparsity_ratio"].type == "gauge"
    assert "dense" in families["kvkit_kv_dense_equivalent_bytes"].documentation
    samples = {(s.name, s.labels.get("policy")) for f in families.values() for s in f.samples}
    assert ("kvkit_pages_read_total", "t_text") in samples


def test_serve_answers_metrics_on_loopback():
    metrics.record_evictions("t_serve", 3)
    port = metrics.serve(0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    assert 'kvkit_evicted_tokens_total{policy="t_serve"} 3.0' in body


# --- multiprocess mode: separate processes, PROMETHEUS_MULTIPROC_DIR set before import ---------
WORKER = textwrap.dedent("""
    import json, sys, torch
    from kvkit import metrics
    from kvkit.store import PagedKVStore
    assert metrics.multiprocess_mode()
    tokens = int(sys.argv[1])
    store = PagedKVStore(num_layers=1, num_kv_heads=2, head_dim=8, page_size=4)
    seq = store.add_sequence()
    store.append(seq, 0, torch.randn(tokens, 2, 8), torch.randn(tokens, 2, 8))
    metrics.observe_store(store, policy="dense", model="m")
    metrics.record_decode("dense", pages_read=tokens, pages_total=2 * tokens, bytes_read=10,
                          seconds=0.01)
    metrics.record_expert_cache("lru", hits=tokens, misses=1, bytes_moved=100)
    print(json.dumps({"nbytes": store.nbytes(), "tokens": store.stats().tokens_resident}))
""")

READER = textwrap.dedent("""
    import json, sys, urllib.request
    from kvkit import metrics
    for pid in sys.argv[1:]:
        metrics.mark_process_dead(int(pid))
    port = metrics.serve(0)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "kvkit_kv_resident_bytes" in body, body[:2000]
    print(body)
""")


def run_python(code: str, args: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def samples(text: str) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("policy", "")): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_multiprocess_mode_sums_processes_and_drops_dead_gauges(tmp_path, helpers):
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    env = helpers.child_env(PROMETHEUS_MULTIPROC_DIR=str(mp_dir))
    workers = []
    for tokens in (8, 12):
        out = run_python(WORKER, [str(tokens)], env, tmp_path)
        workers.append(json.loads(out))
    pids = sorted(int(p.stem.rsplit("_", 1)[1]) for p in mp_dir.glob("gauge_livesum_*.db"))
    assert len(pids) == 2, f"expected one livesum file per worker, found {pids}"

    both = samples(run_python(READER, [], env, tmp_path))
    assert both[("kvkit_kv_resident_bytes", "dense")] == sum(w["nbytes"] for w in workers)
    assert both[("kvkit_tokens_resident", "dense")] == sum(w["tokens"] for w in workers)
    assert both[("kvkit_pages_read_total", "dense")] == 8 + 12
    assert both[("kvkit_pages_dense_total", "dense")] == 2 * (8 + 12)
    assert both[("kvkit_decode_seconds_count", "dense")] == 2
    assert both[("kvkit_expert_cache_hits_total", "lru")] == 20
    assert both[("kvkit_expert_cache_misses_total", "lru")] == 2

    # a worker that exits takes its live gauges along; counters keep what it counted
    first_pid = pids[0]
    after = samples(run_python(READER, [str(first_pid)], env, tmp_path))
    assert after[("kvkit_kv_resident_bytes", "dense")] in {w["nbytes"] for w in workers}
    assert after[("kvkit_kv_resident_bytes", "dense")] < both[("kvkit_kv_resident_bytes", "dense")]
    assert after[("kvkit_pages_read_total", "dense")] == 20


def test_multiprocess_registry_needs_an_existing_folder(tmp_path, helpers):
    env = helpers.child_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "missing"))
    done = subprocess.run([sys.executable, "-c", "from kvkit import metrics; metrics.registry()"],
                          env=env, cwd=tmp_path, text=True, capture_output=True, timeout=120)
    assert done.returncode != 0
    assert "is not a folder; create it" in done.stderr
