"""Score eviction (H2O / A2SF at block granularity) in vLLM: the pieces on their own, then a real
engine whose workers evict blocks that its scheduler frees through kvkit's KV connector."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed in this environment; "
                    "run `make test-vllm`")

from kvkit import policies  # noqa: E402
from kvkit.integrations.vllm.eviction import (EvictedBlocks, EvictionState, StepRows, block_mass,  # noqa: E402
                                              kv_transfer_config, score_evictor)
from kvkit.integrations.vllm.plugin import check_supported  # noqa: E402
from kvkit.policies import Policy, Rule  # noqa: E402
from kvkit.policies.evictors.h2o import A2SFEvictor, H2OEvictor  # noqa: E402
from kvkit.policies.evictors.sink_window import SinkWindowEvictor  # noqa: E402
from kvkit.policies.selectors.quest import QuestSelector  # noqa: E402
from kvkit.testing import shipped_text  # noqa: E402


def test_block_mass_equals_a_per_query_softmax():
    torch.manual_seed(0)
    B, T, Hq, H, M, S, D = 2, 3, 6, 2, 3, 4, 8
    q, k = torch.randn(B, T, Hq, D), torch.randn(B, M, H, S, D)
    length, weights, scale = torch.tensor([10, 7]), torch.tensor([0.25, 0.5, 1.0]), D ** -0.5
    want = torch.zeros(B, M)
    for b in range(B):
        keys = k[b].permute(1, 0, 2, 3).reshape(H, M * S, D)
        for t in range(T):
            visible = int(length[b]) - T + t + 1  # causal: keys up to the query's own position
            for h in range(Hq):
                p = (keys[h // (Hq // H), :visible] @ q[b, t, h] * scale).softmax(-1)
                want[b].index_add_(0, torch.arange(visible) // S, weights[t] * p)
    got = block_mass(q, k.permute(2, 0, 1, 3, 4).reshape(H, B, M * S, D), length, scale, weights, S)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # every query hands out its heads' whole mass: sum = heads x weights
    torch.testing.assert_close(got.sum(-1), torch.full((B,), Hq * float(weights.sum())))


def _step(state: EvictionState, ev: A2SFEvictor, req: str, length: int, mass: list[float],
          budget: int | None = None) -> None:
    """One decode step of one request (blocks of 4 tokens): `mass` per block, then its end."""
    row = state.rows.get(req)
    kept = torch.tensor([i for i in range(len(mass)) if row is None or i not in row.evicted])
    state.add_mass(req, kept, torch.tensor(mass)[kept], len(mass))
    state.this_step = StepRows([req], [length], [True], [budget or ev.budget], ev, 4, "test")
    state.end_step()


def test_end_step_evicts_the_lowest_blocks_outside_sinks_and_window():
    state = EvictionState()
    ev = H2OEvictor(budget=12, sink=4, window=4)  # 3 blocks of 4 tokens: sink block, window block, 1 more
    #           sink  .    .    .    .    window
    _step(state, ev, "a", 24, [9.0, 1.0, 5.0, 0.5, 3.0, 9.0])
    assert sorted(state.rows["a"].evicted) == [1, 3, 4]  # keeps block 2 (5.0), never 0 or 5
    assert state.take_pending() == {"a": [3, 1, 4]} and state.take_pending() == {}
    table, lens, kept = state.compact(torch.arange(10, 16)[None], torch.tensor([24]), ["a"], 4)
    assert kept[0].tolist() == [0, 2, 5] and lens.tolist() == [12]
    assert table[0, :3].tolist() == [10, 12, 15]
    # the next token starts block 6; the last 4 tokens (21..24) still reach into block 5, so
    # block 2 is the only candidate left, however high its score
    _step(state, ev, "a", 25, [1.0, 0.0, 1.0, 0.0, 0.0, 0.1, 1.0])
    assert sorted(state.rows["a"].evicted) == [1, 2, 3, 4]
    assert state.evicted_total == 4


def test_forgetting_factor_lets_old_heavy_hitters_fade():
    def evicted(ev):
        state = EvictionState()
        _step(state, ev, "r", 16, [0.0, 50.0, 0.0, 0.0])  # block 1 heavy early; nothing evicted
        for _ in range(30):  # then block 2 takes a little mass every step
            _step(state, ev, "r", 16, [0.0, 0.0, 1.0, 0.0], budget=16)
        _step(state, ev, "r", 16, [0.0, 0.0, 0.0, 0.0], budget=12)
        return sorted(state.rows["r"].evicted)
    assert evicted(H2OEvictor(budget=16, sink=4, window=4)) == [2]  # 50 > 30: the sums
    assert evicted(A2SFEvictor(budget=16, forgetting_factor=0.5, sink=4, window=4)) == [1]


def test_per_request_budget_and_prefill_rows():
    state, ev = EvictionState(), H2OEvictor(budget=24, sink=4, window=4)
    state.this_step = StepRows(["p", "d"], [24, 24], [False, True], [24, 8], ev, 4, "test")
    for r in ("p", "d"):
        state.add_mass(r, torch.arange(6), torch.ones(6), 6)
    state.end_step()
    assert not state.rows["p"].evicted  # a prefill row never evicts
    assert len(state.rows["d"].evicted) == 4  # keeps sink + window block (budget 8 tokens = 2 blocks)
    state.forget(["d"])
    assert "d" not in state.rows


def test_worker_metadata_aggregates():
    merged = EvictedBlocks({"a": [1, 2]}).aggregate(EvictedBlocks({"a": [2, 3], "b": [4]}))
    assert merged.blocks == {"a": [1, 2, 3], "b": [4]}


def test_policies_the_backend_refuses_to_evict_by_score():
    h2o = policies.get("h2o", budget=256)
    assert isinstance(score_evictor(h2o, 30, 3), H2OEvictor)
    assert score_evictor(policies.get("quest"), 30, 3) is None
    mixed = Policy(evictor=H2OEvictor(budget=256), rules=(Rule(layers=(0,), evictor=SinkWindowEvictor()),))
    with pytest.raises(NotImplementedError, match="one h2o/a2sf evictor on every layer"):
        score_evictor(mixed, 30, 3)
    with pytest.raises(NotImplementedError, match="prefill='end'"):
        check_supported(policies.get("h2o", prefill="chunk"))
    with pytest.raises(NotImplementedError, match="full selector"):
        check_supported(Policy(selector=QuestSelector(), evictor=H2OEvictor(budget=256), name="x"))


# ---- a real engine -----------------------------------------------------------------------------
_LONG = " ".join(shipped_text(1160).split())
PROMPTS = ["The capital of France is", _LONG + " Summary of the text above:", _LONG + " In short:"]
BUDGETS = [128, 128, 64]  # tokens: 4 blocks of 32, and 2 for the last request (its own budget)
RUN = {"prompts": PROMPTS, "max_tokens": 40, "block_size": 32, "max_num_batched_tokens": 128, "rounds": 2,
       "extra_args": [None, None, {"kvkit_budget": 64}]}
H2O = {"name": "h2o", "params": {"budget": 128, "sink": 4, "window": 16}}


@pytest.fixture(scope="module")
def stock(engine):
    return engine.run(**RUN, policy=None)


@pytest.fixture(scope="module")
def h2o(engine):
    return engine.run(**RUN, policy=H2O, check=True, kv_transfer_config=kv_transfer_config())


def test_h2o_in_vllm_evicts_and_the_scheduler_frees_the_blocks(stock, h2o):
    assert h2o["attention"] == [["KVKitCPUAttentionBackend", "KVKitCPUAttentionImpl"]]
    assert h2o["usage"]["evict_calls"] > 0
    # what the rule leaves each request at its last step (prompt + 39 tokens written): the sink
    # block, the blocks holding the last 16 tokens, and at least budget / 32 blocks in all
    expected = []
    for n_prompt, budget in zip(h2o["prompt_tokens"], BUDGETS):
        length = n_prompt + RUN["max_tokens"] - 1
        n = math.ceil(length / 32)
        window_block = min(n - 1, (length - 16) // 32)
        expected.append(max(0, n - max(budget // 32, 1 + n - window_block)))
    assert expected[0] == 0 and 0 < expected[1] < expected[2]  # the own budget evicts more
    ev = h2o["eviction"]
    assert ev["evicted_blocks"] == RUN["rounds"] * sum(expected)
    assert ev["freed_blocks"] == ev["evicted_blocks"]  # every eviction reached the block pool
    m = h2o["metrics"]
    assert m['kvkit_evicted_tokens_total{policy="h2o"}'] == 32 * ev["evicted_blocks"]
    read = m['kvkit_pages_read_total{layer_group="all",policy="h2o"}']
    assert 0 < read < 0.8 * m['kvkit_pages_dense_total{layer_group="all",policy="h2o"}']


def test_h2o_in_vllm_holds_fewer_blocks_and_leaks_none(stock, h2o):
    assert h2o["kv"]["peak_used_blocks"] < stock["kv"]["peak_used_blocks"]
    # all blocks back once the requests finished (the null block is never free)
    assert h2o["kv"]["free_blocks_after"] == stock["kv"]["free_blocks_after"] == h2o["kv"]["num_blocks"] - 1


def test_h2o_in_vllm_reads_exactly_the_kept_blocks(stock, h2o):
    """Under the check, each layer call compares every query's output with a float32 attention
    over exactly the positions of the blocks it kept (written, read by no other row, never the
    null block: a freed block handed to another request would show), and each layer's block
    mass with the same mass from the float32 copy of the written keys."""
    reads = [c for c in h2o["checks"] if c.get("read_check")]
    masses = [c for c in h2o["checks"] if c.get("mass_check")]
    assert len(reads) == h2o["usage"]["evict_calls"] and masses
    assert all(c["within_tol"] and c["kept_written"] and c["kept_blocks_distinct"] for c in reads)
    assert all(c["mass_equal"] for c in masses)
    # the short request never exceeds its budget: its tokens are stock's, in both rounds
    assert [r[0] for r in h2o["rounds"]] == [r[0] for r in stock["rounds"]]


def test_h2o_without_kvkits_connector_is_a_clear_error(engine):
    err = engine.fails(**{**RUN, "rounds": 1}, policy=H2O)
    assert "--kv-transfer-config" in err and "KVKitEvictionConnector" in err


def test_h2o_request_preempted_after_evicting_starts_over(engine):
    """A pool of 26 blocks: two requests that keep up to 480 tokens grow until vLLM preempts the
    third, which evicts down to 64 tokens from its first decode step. Resumed, it is prefilled
    again on fresh blocks, so its evictions must be forgotten (the connector's reset): a stale
    list would drop blocks from its new prefill, which the check's outputs would show."""
    prompts = [_LONG + " Summary:", _LONG + " Summary of the text above:", _LONG + " In short:"]
    run = engine.run(prompts=prompts, max_tokens=150, block_size=32, max_num_batched_tokens=512,
                     max_model_len=512, kv_cache_memory_bytes=19_200_000,
                     extra_args=[None, None, {"kvkit_budget": 64}],
                     policy={"name": "h2o", "params": {"budget": 480, "window": 16}}, check=True,
                     kv_transfer_config=kv_transfer_config())
    assert run["kv"]["num_blocks"] == 26 and run["kv"]["preemptions"] >= 1
    assert run["eviction"]["evicted_blocks"] > 0
    assert run["eviction"]["freed_blocks"] == run["eviction"]["evicted_blocks"]
    assert run["kv"]["free_blocks_after"] == run["kv"]["num_blocks"] - 1
    reads = [c for c in run["checks"] if c.get("read_check")]
    assert reads and all(c["within_tol"] and c["kept_written"] and c["kept_blocks_distinct"] for c in reads)
    assert all(c["mass_equal"] for c in run["checks"] if c.get("mass_check"))
