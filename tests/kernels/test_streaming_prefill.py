"""streaming_prefill and lse_merge (Triton) against kvkit.kernels.ref."""

import math

import pytest
import torch

from kvkit.kernels import lse_merge, streaming_prefill
from kvkit.kernels.ref import lse_merge_ref, streaming_prefill_ref
from kvkit.kernels.testing import TOL

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(B, Hq, Hkv, T, D=64, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(B, h, T, D, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return make(Hq), make(Hkv), make(Hkv)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_qo_heads,num_kv_heads", [(3, 3), (6, 2), (8, 2)])
def test_streaming_prefill_matches_ref(dtype, num_qo_heads, num_kv_heads, device):
    q, k, v = _qkv(2, num_qo_heads, num_kv_heads, 77, dtype=dtype, seed=num_qo_heads, device=device)
    streaming = torch.tensor([i % 2 == 0 for i in range(num_kv_heads)], device=device)
    lens = torch.tensor([77, 41], device=device)  # ragged batch
    out = streaming_prefill(q, k, v, streaming, sink=4, window=20, seq_lens=lens, block_m=16, block_n=16)
    want = streaming_prefill_ref(q.cpu(), k.cpu(), v.cpu(), streaming.cpu(), 4, 20, seq_lens=lens.cpu())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.cpu(), want, atol=atol, rtol=rtol)
    assert torch.all(out[1, :, 41:] == 0)


@pytest.mark.parametrize("sink,window,T", [(0, 1, 33), (16, 16, 64), (5, 100, 50), (3, 9, 70)])
def test_streaming_prefill_edges(sink, window, T, device):
    """No sinks, window 1, window beyond the sequence, unaligned sink/window; default 64 blocks too."""
    q, k, v = _qkv(1, 4, 2, T, seed=T, device=device)
    streaming = torch.tensor([True, False], device=device)
    want = streaming_prefill_ref(q.cpu(), k.cpu(), v.cpu(), streaming.cpu(), sink, window)
    for bm, bn in ((16, 16), (64, 64)):
        out = streaming_prefill(q, k, v, streaming, sink, window, block_m=bm, block_n=bn, scale=0.1)
        want = streaming_prefill_ref(q.cpu(), k.cpu(), v.cpu(), streaming.cpu(), sink, window, scale=0.1)
        torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=1e-5)


def test_streaming_prefill_skips_masked_blocks(device):
    """Key blocks between a streaming head's sinks and window are never loaded: poisoning them
    with NaN leaves every query block that must skip them exact (a loaded NaN value would
    spread through p @ V even where p is 0)."""
    T, BN, sink, window = 128, 16, 4, 20
    q, k, v = _qkv(1, 2, 1, T, seed=9, device=device)
    streaming = torch.tensor([True], device=device)
    want = streaming_prefill_ref(q.cpu(), k.cpu(), v.cpu(), streaming.cpu(), sink, window)
    poisoned = v.clone()
    poisoned[:, :, 32:48] = math.nan                     # key block 2
    out = streaming_prefill(q, k, poisoned, streaming, sink, window, block_m=BN, block_n=BN).cpu()
    for m0 in range(0, T, BN):
        win_block = max(m0 - window + 1, 0) // BN * BN
        skipped = 48 <= win_block or m0 + BN <= 32      # block 2 ends before the window / after the queries
        if skipped:
            torch.testing.assert_close(out[:, :, m0:m0 + BN], want[:, :, m0:m0 + BN], atol=1e-5, rtol=1e-5)
    assert out[:, :, 96:].isfinite().all()               # far query blocks never touched block 2


def test_streaming_prefill_all_dense_equals_sdpa(device):
    q, k, v = _qkv(2, 6, 2, 40, seed=3, device=device)
    out = streaming_prefill(q, k, v, torch.tensor([False, False], device=device), 4, 8)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_streaming_prefill_rejects_bad_input(device):
    q, k, v = _qkv(1, 4, 2, 8, device=device)
    with pytest.raises(ValueError, match="streaming must be bool"):
        streaming_prefill(q, k, v, torch.tensor([1, 0], device=device), 1, 2)
    with pytest.raises(ValueError, match="window >= 1"):
        streaming_prefill(q, k, v, torch.tensor([True, False], device=device), 1, 0)
    with pytest.raises(TypeError, match="must share one of"):
        streaming_prefill(q.half(), k, v, torch.tensor([True, False], device=device), 1, 2)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_lse_merge_matches_ref(out_dtype, device):
    g = torch.Generator().manual_seed(0)
    o = torch.randn(6, 5, 64, generator=g)
    lse = torch.randn(6, 5, generator=g) * 3
    lse[1, 2:] = -math.inf      # some empty splits
    lse[4] = -math.inf          # a row with nothing
    out, got_lse = lse_merge(o.to(device), lse.to(device), out_dtype)
    want, want_lse = lse_merge_ref(o, lse, out_dtype)
    atol, rtol = TOL[out_dtype]
    torch.testing.assert_close(out.cpu(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_lse.cpu(), want_lse, atol=1e-5, rtol=1e-5)
    assert torch.all(out[4] == 0) and got_lse[4] == -math.inf


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_streaming_prefill_large_matches_ref(dtype, device):
    q, k, v = _qkv(1, 32, 8, 4096, D=128, dtype=dtype, device=device)
    streaming = torch.arange(8, device=device) % 2 == 0
    out = streaming_prefill(q, k, v, streaming, 64, 1024)
    want = streaming_prefill_ref(q, k, v, streaming, 64, 1024)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, want, atol=atol, rtol=rtol)
