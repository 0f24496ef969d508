"""kvkit.attention.decode dispatches to the kernels: backend="triton" (here through the
interpreter on CPU) gives the reference's result; "auto" keeps Triton off CUDA."""

import pytest
import torch

import kvkit.kernels
from kvkit import PagedKVStore, Selection
from kvkit.attention import decode
from kvkit.kernels.testing import TOL
from kvkit.policies.codecs.quant import Int8Codec


def _store(dtype=torch.float32, page_format=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    store = PagedKVStore(1, 3, 64, page_size=16, dtype=dtype, page_format=page_format)
    seqs = [store.add_sequence() for _ in range(2)]
    for s, n in zip(seqs, (75, 30)):
        store.append(s, 0, torch.randn(n, 3, 64, generator=g), torch.randn(n, 3, 64, generator=g))
    store.evict(seqs[0], 0, 2, range(10, 50))
    q = torch.randn(2, 9, 64, generator=g).to(dtype)
    return store, seqs, q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("codec", ["plain", "int8"])
def test_decode_triton_backend_matches_ref(dtype, codec, device):
    store, seqs, q = _store(dtype, Int8Codec(group_size=32) if codec == "int8" else None)
    table = store.page_tables(seqs, 0)
    sel = Selection(table[..., [0, 2, 3]], slot_mask=torch.rand(2, 3, 3, 16) > 0.2)  # a sparse, masked read
    want, _ = decode(q, store, seqs, 0, sel, backend="ref")
    got, _ = decode(q, store, seqs, 0, sel, backend="triton")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def test_decode_env_var_and_auto(monkeypatch, device):
    store, seqs, q = _store()
    sel = Selection(store.page_tables(seqs, 0))
    calls = []
    real = kvkit.kernels.sparse_decode
    monkeypatch.setattr(kvkit.kernels, "sparse_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    decode(q, store, seqs, 0, sel)                                  # auto on CPU: no Triton
    assert calls == []
    monkeypatch.setenv("KVKIT_ATTENTION_BACKEND", "triton")
    decode(q, store, seqs, 0, sel)
    assert calls == [1]
    decode(q, store, seqs, 0, sel, backend="ref")                   # the argument beats the variable
    assert calls == [1]


def test_decode_backend_errors(device):
    store, seqs, q = _store()
    sel = Selection(store.page_tables(seqs, 0))
    with pytest.raises(ValueError, match="backend must be"):
        decode(q, store, seqs, 0, sel, backend="cuda")
    with pytest.raises(NotImplementedError, match="return_stats"):
        decode(q, store, seqs, 0, sel, return_stats=True, backend="triton")
    out, stats = decode(q, store, seqs, 0, sel, return_stats=True)  # auto: the reference gives stats
    assert stats is not None
