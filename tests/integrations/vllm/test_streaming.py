"""Sink + window layers inside a real vLLM engine: blocks between sinks and window are freed by
kvkit's KV cache manager, and vLLM's own accounting shows the saving.

- the `streaming` policy (every layer) and `duo` (the layers whose KV heads all stream) run under
  engine_check.py's check: every layer call is checked against a float32 attention over exactly the
  sink and window blocks, which must hold written K/V no other row reads;
- in the same KV pool (`kv_cache_memory_bytes`), more requests run at once than with stock vLLM,
  and a context longer than the whole pool, which stock vLLM refuses to start for, is served.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed in this environment; "
                    "run `make test-vllm`")

from kvkit.integrations.vllm import plugin  # noqa: E402
from kvkit.integrations.vllm.layers import layer_index  # noqa: E402
from kvkit.integrations.vllm.streaming import streaming_evictor, trim_blocks  # noqa: E402
from kvkit.policies import get  # noqa: E402
from kvkit.testing import shipped_text  # noqa: E402

_TEXT = " ".join(shipped_text(24000).split())
PROMPTS = ["The capital of France is", _TEXT[:1100] + " Summary of the text above:"]
BASE = {"prompts": PROMPTS, "max_tokens": 12, "block_size": 32, "max_num_batched_tokens": 128}
STREAMING = {"name": "streaming", "params": {"sink": 16, "window": 96}}
KVKIT = ["KVKitCPUAttentionBackend", "KVKitCPUAttentionImpl"]


def trim_loop(table, seq_lens, query_lens, S, sink, window):
    """One row at a time, from the positions a row reads."""
    rows, lens = [], []
    for b in range(table.shape[0]):
        n, first = int(seq_lens[b]), int(seq_lens[b] - query_lens[b])
        sink_blocks = -(-sink // S)
        window_block = max(sink_blocks, max(0, first - window + 1) // S)
        keep = [i for i in range(-(-n // S)) if i < sink_blocks or i >= window_block]
        rows.append([int(table[b, i]) for i in keep])
        lens.append(n - (window_block - sink_blocks) * S)
    return rows, lens


@pytest.mark.parametrize("S,sink,window", [(32, 16, 96), (32, 0, 1), (16, 32, 17), (32, 64, 4096)])
def test_trim_blocks_matches_a_loop(S, sink, window):
    g = torch.Generator().manual_seed(S + sink + window)
    B, M = 9, 50  # 777 tokens need 49 blocks of 16
    table = torch.randint(1, 500, (B, M), generator=g, dtype=torch.int32)
    seq_lens = torch.tensor([1, S, S + 1, 2 * S, 300, 777, M * S, 5 * S, 130], dtype=torch.int32)
    query_lens = torch.tensor([1, S, 1, 7, 128, 1, 1, 5 * S, 64], dtype=torch.int32)
    got_table, got_lens = trim_blocks(table, seq_lens, query_lens, S, sink, window)
    rows, lens = trim_loop(table, seq_lens, query_lens, S, sink, window)
    assert got_lens.tolist() == lens
    for b, row in enumerate(rows):
        assert got_table[b, : len(row)].tolist() == row
        assert -(-int(got_lens[b]) // S) == len(row)  # the new length covers exactly those blocks


def streaming_layers(kv: dict) -> list[int]:
    """Layer indices in vLLM's streaming KV cache groups (from the engine's `kv` report)."""
    names = [n for spec, layers in zip(kv["groups"], kv["group_layers"]) if spec == "StreamingSpec"
             for n in layers]
    return sorted(layer_index(n) for n in names)


def assert_checked(report: dict, layers: list[int]) -> None:
    checks = [c for c in report["checks"] if c.get("read_check")]
    assert sorted({c["layer"] for c in checks}) == layers
    bad = [c for c in checks if not (c["within_tol"] and c["kept_written"] and c["kept_blocks_distinct"])]
    assert not bad, bad[:3]


@pytest.fixture(scope="module")
def streaming(engine):
    return engine.run(**BASE, policy=STREAMING, check=True)


def test_streaming_layers_read_sink_and_window_blocks(streaming):
    assert streaming["attention"] == [KVKIT]
    assert streaming["usage"]["streaming_calls"] > 0
    assert_checked(streaming, list(range(30)))
    m = streaming["metrics"]
    read = m['kvkit_pages_read_total{layer_group="all",policy="streaming"}']
    assert 0 < read < 0.8 * m['kvkit_pages_dense_total{layer_group="all",policy="streaming"}']
    kv = streaming["kv"]
    assert kv["groups"] == ["StreamingSpec"]
    assert kv["free_blocks_after"] == kv["num_blocks"] - 1  # all back but vLLM's null block


def test_duo_frees_only_layers_whose_heads_all_stream(engine):
    policy = {"name": "duo", "params": {"window": 64}}
    report = engine.run(**BASE, policy=policy, check=True)
    duo = get("duo", window=64)
    layers = [layer for layer in range(30) if streaming_evictor(duo, layer, 3) is not None]
    assert 0 < len(layers) < 30
    assert sorted(report["kv"]["groups"]) == ["FullAttentionSpec", "StreamingSpec"]
    assert streaming_layers(report["kv"]) == layers
    assert report["usage"]["streaming_calls"] > 0 and report["usage"]["dense_calls"] > 0
    assert_checked(report, layers)


def test_a_tuned_policy_file_serves_as_written(engine, tmp_path):
    """A `kvkit tune --codecs bf16` file (per-(layer, KV head) windows, SmolLM2's shape pinned)
    goes the way `kvkit serve` takes it: read, validated and handed to the engine as it is. The
    layers whose heads all stream free blocks and read sink and window; the others stay whole."""
    from kvkit.integrations.vllm.serve import server_command
    from kvkit.policies import Policy
    from kvkit.tools.tune import build_policy
    from kvkit.tools.tune_alloc import Allocation

    streams = list(range(0, 30, 3))  # every head streams here; one head keeps all elsewhere
    window = tuple((1, 1, 1) if layer in streams else (1, 0, 1) for layer in range(30))
    tuned = build_policy(Allocation(codec=(0,) * 30, window=window, loss=0.0, nbytes=0.0), ["bf16"], [None, 64],
                         16, 32, (30, 3))
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(tuned.to_config()))
    _, env = server_command(Policy.from_file(path), "SmolLM2", vllm_args=["--block-size", "32"])
    report = engine.run(**BASE, policy=json.loads(env[plugin.ENV]), check=True)
    assert report["attention"] == [KVKIT]
    assert streaming_layers(report["kv"]) == streams
    assert report["usage"]["streaming_calls"] > 0 and report["usage"]["dense_calls"] > 0
    assert_checked(report, streams)


def test_more_requests_fit_in_the_same_pool(engine):
    # 12 requests of ~380 tokens + 48 generated in a 32 MiB pool (45 blocks of 32 tokens)
    prompts = [_TEXT[i * 1500 : i * 1500 + 1800] + " Summary:" for i in range(12)]
    args = {"prompts": prompts, "max_tokens": 48, "block_size": 32, "max_num_batched_tokens": 256,
            "kv_cache_memory_bytes": 32 << 20, "max_num_seqs": 16}
    stock = engine.run(**args, policy=None)["kv"]
    kvkit = engine.run(**args, policy=STREAMING)["kv"]
    assert stock["num_blocks"] == kvkit["num_blocks"]
    running, advertised = (kvkit["peak_running"] / stock["peak_running"],
                           kvkit["max_concurrency"] / stock["max_concurrency"])
    print(f"same pool: peak running requests x{running:.2f}, advertised concurrency x{advertised:.2f}")
    assert running >= 2 and advertised >= 2
    assert kvkit["free_blocks_after"] == kvkit["num_blocks"] - 1


def test_context_longer_than_the_pool(engine):
    # 16 MiB holds 22 blocks (704 tokens); the prompt is ~1500 tokens
    args = {"prompts": [_TEXT[:7000] + " Summary:"], "max_tokens": 8, "block_size": 32,
            "max_model_len": 2048, "max_num_batched_tokens": 128, "kv_cache_memory_bytes": 16 << 20}
    assert "larger than the available KV cache memory" in engine.fails(**args, policy=None)
    report = engine.run(**args, policy=STREAMING)
    assert report["prompt_tokens"][0] > report["kv"]["num_blocks"] * 32
    assert len(report["tokens"][0]) == 8


def test_prefix_caching_on_is_refused_with_the_fix(engine):
    err = engine.fails(**BASE, policy=STREAMING, enable_prefix_caching=True)
    assert "ConfigError" in err and "--no-enable-prefix-caching" in err


def test_tensor_parallel_workers_agree_on_the_streaming_layers(engine):
    # SmolLM2's 9 query / 3 KV heads: TP=3 (TP=2 does not divide them) gives each worker one KV
    # head; the layers that stream are decided over all 3, so the workers' specs agree
    args = {**BASE, "tensor_parallel_size": 3}
    stock = engine.run(**args, policy=None)
    duo = engine.run(**args, policy={"name": "duo", "params": {"window": 64}})
    assert duo["attention"] == [KVKIT]
    assert sorted(duo["kv"]["groups"]) == ["FullAttentionSpec", "StreamingSpec"]
    policy = get("duo", window=64)
    want = [layer for layer in range(30) if streaming_evictor(policy, layer, 3) is not None]
    assert streaming_layers(duo["kv"]) == want
    assert want != [layer for layer in range(30) if streaming_evictor(policy, layer, 1) is not None]
    assert duo["kv"]["max_concurrency"] > stock["kv"]["max_concurrency"]
    assert [len(t) for t in duo["tokens"]] == [BASE["max_tokens"]] * 2
    assert duo["kv"]["free_blocks_after"] == duo["kv"]["num_blocks"] - 1
