"""`kvkit demo`: the rows it measures on the embedded model, and the read counter under it."""

import pytest
import torch

from kvkit import demo, evaluate, policies
from kvkit.attention.paged import attention_step
from kvkit.policies.selectors.quest import quest


def _decode_once(policy, tokens: int, page_size: int, dtype=torch.float32):
    """Prefill `tokens` random tokens into a 1-layer store, then one decode step under a ReadCounter."""
    H, G, D = 3, 3, 64
    store = policy.make_store(num_layers=1, num_kv_heads=H, head_dim=D, page_size=page_size, dtype=dtype)
    seq = store.add_sequence()
    gen = torch.Generator().manual_seed(0)
    qkv = [torch.randn(1, h, tokens, D, generator=gen, dtype=dtype) for h in (H * G, H, H)]
    attention_step(store, policy, [seq], 0, *qkv)
    counter = demo.ReadCounter(policy)
    step = [torch.randn(1, h, 1, D, generator=gen, dtype=dtype) for h in (H * G, H, H)]
    attention_step(store, policy, [seq], 0, *step, monitor=counter)
    return counter.nbytes, H, D


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_step_reads_every_token_once(dtype):
    nbytes, H, D = _decode_once(policies.get("dense"), tokens=100, page_size=16, dtype=dtype)
    assert nbytes == 101 * H * 2 * D * torch.finfo(dtype).bits // 8  # K and V of every token, no more


def test_quest_step_reads_its_budget_plus_every_pages_bounds():
    budget, tokens, page_size = 64, 200, 8
    nbytes, H, D = _decode_once(quest(budget=budget, dense_layers=0), tokens, page_size)
    pages = -(-(tokens + 1) // page_size)
    bounds = pages * H * 2 * D * 4  # key min and max per page, float32
    assert bounds < nbytes <= bounds + budget * H * 2 * D * 4


@pytest.fixture(scope="module")
def smollm2_bf16():
    return evaluate.load(None, torch.bfloat16)


def test_demo_rows_measure_memory_read_and_time(smollm2_bf16):
    model, tok = smollm2_bf16
    ctx, depths = 500, [0.25, 0.75]
    chosen = demo.build_rows(["streaming", "quest", "duo", "best"], ctx, window=64)
    rows = demo.run(model, tok, chosen, ctx, depths, progress=False)
    by = {r.label: r for r in rows}
    assert [r.label for r in rows] == ["dense", "streaming 64", "quest 62", "duo", "duo+quest+gear4"]
    dense = by["dense"]
    assert dense.correct == dense.samples == 2  # the embedded model retrieves at this length
    # memory is against a tight bf16 copy of the same tokens: the dense store is that plus its
    # page tails, slot positions and the room its rows grow into
    assert dense.dense_bytes <= dense.kv_bytes <= 1.15 * dense.dense_bytes
    # dense reads every cached token of every layer at every step: K and V, bf16
    per_token = 30 * 3 * 2 * 64 * 2
    prompt = min(evaluate.passkey_prompt(tok, ctx, d, "12345").shape[1] for d in depths)
    assert prompt * per_token <= dense.read_bytes_per_token <= (prompt + 8) * per_token
    assert dense.read_bytes_per_token <= dense.kv_bytes
    assert by["streaming 64"].kv_bytes < by["duo"].kv_bytes < dense.kv_bytes
    assert by["duo+quest+gear4"].kv_bytes < by["duo"].kv_bytes  # 4-bit pages
    assert by["quest 62"].kv_bytes > dense.kv_bytes  # it keeps all, plus page bounds
    assert by["quest 62"].read_bytes_per_token < dense.read_bytes_per_token / 2
    assert all(r.ms_per_token > 0 and r.decode_tokens > 0 for r in rows)
    assert demo.table(rows).count("\n") == len(rows) + 1
    assert demo.verdict(rows).startswith("kept dense's 2/2: ")


def test_build_rows_puts_dense_first_and_refuses_unknown_names():
    assert [label for label, _ in demo.build_rows(["quest", "dense"], 2400)] == ["dense", "quest 300"]
    assert demo.build_rows(["lserve"], 2400, budget=512)[1][1].to_config()["selector"]["budget"] == 512
    with pytest.raises(ValueError, match="unknown policy 'qeust'"):
        demo.build_rows(["qeust"], 2400)


@pytest.mark.slow
def test_default_demo_keeps_dense_accuracy_at_a_quarter_of_the_bytes_or_read(smollm2_bf16):
    """What `make demo` shows: some row keeps dense's keys at <= 1/4 of its memory or its read."""
    model, tok = smollm2_bf16
    rows = demo.run(model, tok, demo.build_rows(["streaming", "quest", "duo", "best"], 2400), 2400,
                    [(i + 0.5) / 3 for i in range(3)], progress=False)
    dense = rows[0]
    assert dense.correct == 3
    assert any(r.correct == dense.correct and (r.kv_bytes <= dense.kv_bytes / 4 or
                                               r.read_bytes_per_token <= dense.read_bytes_per_token / 4)
               for r in rows[1:])
