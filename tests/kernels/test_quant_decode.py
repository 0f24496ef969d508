"""quant_decode (Triton) against kvkit.kernels.ref.quant_decode_ref, under TRITON_INTERPRET=1."""

import pytest
import torch

from kvkit import PagedKVStore, Selection
from kvkit.attention import decode
from kvkit.attention.ref import sparse_decode_ref
from kvkit.kernels import quant_decode
from kvkit.kernels.layout import LowRank, QuantPages
from kvkit.kernels.ref import dequantize_pages, quant_decode_ref, quantize_pages
from kvkit.kernels.testing import LSE_TOL, TOL, random_paged_case
from kvkit.policies.codecs.quant import Int8Codec

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (bits, token_group, channel_group) for K and V
LAYOUTS = {
    "int8-per-token": ((8, 1, None), (8, 1, None)),                 # kvkit's Int8Codec
    "int4-kivi": ((4, 16, 1), (4, 1, 32)),                           # K per channel per page, V per token
    "int4k-int8v-groups": ((4, 4, 8), (8, 1, 16)),
}


def _quantized_case(case, k_layout, v_layout):
    k = quantize_pages(case["k_cache"].float(), *k_layout)
    v = quantize_pages(case["v_cache"].float(), *v_layout)
    return k, v


def _check(q, k, v, table, valid, **kw):
    out, lse = quant_decode(q, k, v, table, valid, **kw)
    kw.pop("num_splits", None)
    ref_out, ref_lse = quant_decode_ref(q, k, v, table, valid, **kw)
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_qo_heads,num_kv_heads", [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_quant_decode_matches_ref(dtype, num_qo_heads, num_kv_heads, layout, device):
    lens = [[70 - 25 * h for h in range(num_kv_heads)], [33 * (h % 2) for h in range(num_kv_heads)]]
    case = random_paged_case(2, num_qo_heads, num_kv_heads, seq_lens=lens,
                             budget_pages=4, evict_frac=0.1, seed=len(layout), device=device)
    k, v = _quantized_case(case, *LAYOUTS[layout])
    _check(case["q"].to(dtype), k, v, case["page_table"], case["slot_valid"], num_splits=2)


@pytest.mark.parametrize("page_size,head_dim", [(64, 64), (16, 128)])
def test_quant_decode_page_sizes_and_head_dims(page_size, head_dim, device):
    case = random_paged_case(2, 6, 2, head_dim=head_dim, page_size=page_size, seq_lens=[130, 64], seed=1,
                             device=device)
    k, v = _quantized_case(case, (4, page_size, 1), (4, 1, 32))
    _check(case["q"].to(torch.bfloat16), k, v, case["page_table"], case["slot_valid"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quant_decode_gear_lowrank_residual(dtype, device):
    case = random_paged_case(2, 6, 2, seq_lens=[[50, 17], [90, 40]], evict_frac=0.1, seed=2, device=device)
    k, v = _quantized_case(case, (4, 1, 16), (4, 1, 16))
    g = torch.Generator().manual_seed(0)
    N, S, D = case["k_cache"].shape
    lr = lambda r: LowRank(0.1 * torch.randn(N, S, r, generator=g), torch.randn(2, 2, D, r, generator=g))  # noqa: E731
    out = _check(case["q"].to(dtype), k, v, case["page_table"], case["slot_valid"], k_lowrank=lr(4),
                 v_lowrank=lr(3), num_splits=3)
    assert out.isfinite().all()


def test_quant_decode_empty_and_masked(device):
    case = random_paged_case(2, 4, 2, seq_lens=[[0, 40], [0, 0]], seed=3, device=device)
    k, v = _quantized_case(case, (8, 1, None), (4, 1, 32))
    B, Hkv, P = case["page_table"].shape
    mask = (torch.rand(B, Hkv, P, 16, generator=torch.Generator().manual_seed(1)) > 0.5).to(device)
    out = _check(case["q"], k, v, case["page_table"], case["slot_valid"], slot_mask=mask, scale=0.2)
    assert torch.all(out[0, :2] == 0) and torch.all(out[1] == 0)


def test_quant_decode_reads_int8codec_storage(device):
    """kvkit's Int8Codec pages are QuantPages(codes, scales) as they lie: same result as decode()."""
    g = torch.Generator().manual_seed(4)
    store = PagedKVStore(1, 2, 64, page_size=16, dtype=torch.float32, page_format=Int8Codec(group_size=32))
    seqs = [store.add_sequence() for _ in range(2)]
    for s, n in zip(seqs, (45, 20)):
        store.append(s, 0, torch.randn(n, 2, 64, generator=g), torch.randn(n, 2, 64, generator=g))
    store.evict(seqs[0], 0, 0, range(3, 20))
    table, st = store.page_tables(seqs, 0), store.storage(0)
    q = torch.randn(2, 6, 64, generator=g)
    want, _ = decode(q, store, seqs, 0, Selection(table))
    out, _ = quant_decode(q, QuantPages(st.k, st.k_scale), QuantPages(st.v, st.v_scale), table,
                          store.slot_positions(0) >= 0)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits,min_cos", [(8, 0.9995), (4, 0.98)])
def test_quant_decode_error_budget_against_unquantized(bits, min_cos, device):
    case = random_paged_case(2, 8, 2, seq_lens=120, seed=5, device=device)
    args = {k: v for k, v in case.items() if k != "positions"}
    exact, _ = sparse_decode_ref(**args)
    k, v = _quantized_case(case, (bits, 1, 32), (bits, 1, 32))
    out, _ = quant_decode(case["q"], k, v, case["page_table"], case["slot_valid"])
    cos = torch.nn.functional.cosine_similarity(out.flatten(0, 1), exact.flatten(0, 1), dim=-1)
    assert cos.min() > min_cos


def test_quantize_pages_roundtrip_layout():
    x = torch.randn(3, 16, 64)
    for bits, tg, cg, tol in [(8, 1, None, 0.02), (4, 1, 32, 0.3), (4, 16, 1, 0.3), (8, 4, 8, 0.02)]:
        qp = quantize_pages(x, bits, tg, cg)
        assert qp.codes.shape == (3, 16, 64 if bits == 8 else 32)
        assert (dequantize_pages(qp) - x).abs().max() < tol
    qp = quantize_pages(torch.arange(64.0).view(1, 1, 64), 4, 1, 64)  # nibble order: 2j low, 2j+1 high
    lo, hi = int(qp.codes[0, 0, 0]) & 0xF, int(qp.codes[0, 0, 0]) >> 4
    assert lo <= hi and dequantize_pages(qp)[0, 0, :2].tolist() == pytest.approx([0.0, 1.0], abs=2.2)


def test_quant_decode_rejects_bad_input(device):
    case = random_paged_case(1, 2, 1, seq_lens=20, device=device)
    k, v = _quantized_case(case, (8, 1, None), (4, 1, 32))
    q, t = case["q"], case["page_table"]
    with pytest.raises(TypeError, match="codes must be torch.uint8"):
        quant_decode(q, k, QuantPages(v.codes.view(torch.int8), v.scale, v.zero, 4), t)
    with pytest.raises(NotImplementedError, match="bits=2"):
        quant_decode(q, k, QuantPages(v.codes, v.scale, v.zero, 2), t)
    with pytest.raises(ValueError, match="scale must be floating"):
        quant_decode(q, QuantPages(k.codes, k.scale[:, :, :0], None, 8), v, t)
    with pytest.raises(ValueError, match="k_lowrank.a must be"):
        quant_decode(q, k, v, t, k_lowrank=LowRank(torch.zeros(1, 16, 2), torch.zeros(1, 1, 64, 2)))


@pytest.mark.gpu
def test_quant_decode_large_matches_ref(device):
    case = random_paged_case(4, 32, 8, head_dim=128, seq_lens=8192, budget_pages=128, device=device)
    k, v = _quantized_case(case, (4, 16, 1), (4, 1, 32))
    _check(case["q"].half(), k, v, case["page_table"], case["slot_valid"])
