"""CSKV codec: bases files, known low-rank reconstruction error, the full-size window, bytes,
paging, per-layer ranks, and generation through KVKitCache on a tiny Llama."""

import pytest
import torch

from kvkit import policies
from kvkit.policies import Policy
from kvkit.policies.codecs.bases import KEYS, load_bases, save_bases
from kvkit.tools.calibrate_cskv import calibrate
from kvkit.policies.codecs.cskv import CskvCodec, _load, bases_path, layer_ranks
from kvkit.store import PagedKVStore

L, H, D, S = 2, 2, 16, 4


def _bases(tmp_path, enc=None, name="b.safetensors", energy=None):
    """A bases file whose encoder/decoder are `enc` (orthonormal rows) or the identity."""
    q = torch.eye(D) if enc is None else enc
    b = {"k_mean": torch.zeros(L, H, D), "v_mean": torch.zeros(L, H, D),
         "k_enc": q.expand(L, H, D, D).clone(), "v_enc": q.expand(L, H, D, D).clone(),
         "k_dec": q.T.expand(L, H, D, D).clone(), "v_dec": q.T.expand(L, H, D, D).clone(),
         "k_energy": energy if energy is not None else torch.linspace(1, 0, D).expand(L, H, D).clone(),
         "v_energy": energy if energy is not None else torch.linspace(1, 0, D).expand(L, H, D).clone()}
    path = tmp_path / name
    save_bases(b, path, {"model": "test"})
    _load.cache_clear()
    return str(path)


def _store(path, rank, window, layers=1, sink=0):
    codecs = [CskvCodec(bases=path, layer=l, k_rank=rank, v_rank=rank, window=window, sink=sink)
              for l in range(layers)]
    return PagedKVStore(layers, H, D, page_size=S, dtype=torch.float32, page_format=codecs)


def _read_all(store, seq, layer=0):
    ks, vs = zip(*[store.read(seq, layer, h)[1:] for h in range(H)])
    return torch.stack(ks, 1), torch.stack(vs, 1)


def test_bases_file_round_trips_and_is_validated(tmp_path):
    path = _bases(tmp_path)
    b = load_bases(path)
    assert set(b) == set(KEYS) and b["k_enc"].shape == (L, H, D, D)
    from safetensors.torch import save_file
    bad = dict(b)
    del bad["v_dec"]
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "missing.st"), metadata={"format": "1"})
    with pytest.raises(ValueError, match=r"lacks \['v_dec'\]"):
        load_bases(tmp_path / "missing.st")
    bad = {k: v.contiguous() for k, v in b.items()}
    bad["k_mean"] = torch.zeros(L, H, D + 1)
    save_file(bad, str(tmp_path / "shape.st"), metadata={"format": "1"})
    with pytest.raises(ValueError, match="has shape .* expected"):
        load_bases(tmp_path / "shape.st")
    bad["k_mean"] = torch.full((L, H, D), float("nan"))
    save_file(bad, str(tmp_path / "nan.st"), metadata={"format": "1"})
    with pytest.raises(ValueError, match="non-finite"):
        load_bases(tmp_path / "nan.st")
    save_file({k: v.contiguous() for k, v in b.items()}, str(tmp_path / "v0.st"), metadata={"format": "0"})
    with pytest.raises(ValueError, match="format"):
        load_bases(tmp_path / "v0.st")
    torch.save(b, tmp_path / "pickle.pt")  # a pickle is never loaded
    with pytest.raises(Exception):
        load_bases(tmp_path / "pickle.pt")


@pytest.mark.parametrize("rank", [2, 8, 13])
def test_known_rank_reconstruction_error(tmp_path, rank):
    # An orthonormal basis Q: projecting onto its first r rows leaves exactly the energy of
    # the other coordinates, ||x Q[r:]^T||, for every token outside the window.
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    path = _bases(tmp_path, enc=q.T)
    store = _store(path, rank, window=0)
    seq = store.add_sequence()
    k, v = torch.randn(24, H, D, generator=g), torch.randn(24, H, D, generator=g)
    store.append(seq, 0, k, v)
    ks, vs = _read_all(store, seq)
    for x, y in ((k, ks), (v, vs)):
        expected = (x @ q)[..., rank:].norm(dim=-1)        # tail coordinates
        torch.testing.assert_close((y - x).norm(dim=-1), expected, atol=5e-3, rtol=5e-3)


def test_data_inside_the_subspace_comes_back_exact(tmp_path):
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    store = _store(_bases(tmp_path, enc=q.T), rank=5, window=0)
    seq = store.add_sequence()
    k = torch.randn(20, H, 5, generator=g) @ q[:, :5].T      # rank-5 keys in the basis span
    store.append(seq, 0, k, k)
    torch.testing.assert_close(_read_all(store, seq)[0], k, atol=3e-3, rtol=3e-3)


def test_recent_window_stays_full_size(tmp_path):
    store = _store(_bases(tmp_path), rank=2, window=6)
    seq = store.add_sequence()
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(30, H, D, generator=g), torch.randn(30, H, D, generator=g)
    store.append(seq, 0, k[:20], v[:20])
    for t in range(20, 30):
        store.append(seq, 0, k[t:t + 1], v[t:t + 1])
    ks, _ = _read_all(store, seq)
    # the last 6 tokens (and the rest of their pages, 24..29) are exact up to fp16
    torch.testing.assert_close(ks[24:], k[24:], atol=1e-2, rtol=1e-3)
    # older pages keep only 2 of 16 channels
    torch.testing.assert_close(ks[:20, :, :2], k[:20, :, :2], atol=1e-2, rtol=1e-3)
    assert ks[:20, :, 2:].abs().max() == 0
    storage = store.storage(0)
    assert int((storage.stage_row >= 0).sum()) <= H * (6 // S + 2)


def test_sink_pages_stay_full_size(tmp_path):
    store = _store(_bases(tmp_path), rank=2, window=0, sink=2)
    seq = store.add_sequence()
    k = torch.randn(20, H, D)
    store.append(seq, 0, k[:10], k[:10])
    for t in range(10, 20):
        store.append(seq, 0, k[t:t + 1], k[t:t + 1])
    ks, _ = _read_all(store, seq)
    torch.testing.assert_close(ks[:S], k[:S], atol=1e-2, rtol=1e-3)   # the sinks' page
    assert ks[S:, :, 2:].abs().max() == 0                             # the rest projected


def test_heads_use_their_own_basis(tmp_path):
    # head 1's basis keeps the last channels, head 0's the first: the store writes rows
    # head-major, so each page is encoded with its head's basis
    path = tmp_path / "heads.safetensors"
    eye, flip = torch.eye(D), torch.eye(D).flip(0)
    b = {k: torch.zeros(L, H, D) for k in ("k_mean", "v_mean", "k_energy", "v_energy")}
    for key in ("k_enc", "v_enc", "k_dec", "v_dec"):
        b[key] = torch.stack([eye, flip.T if key.endswith("dec") else flip]).expand(L, H, D, D).clone()
    save_bases(b, path, {})
    _load.cache_clear()
    store = _store(str(path), rank=3, window=0)
    seq = store.add_sequence()
    x = torch.randn(8, H, D)
    store.append(seq, 0, x, x)
    ks, _ = _read_all(store, seq)
    torch.testing.assert_close(ks[:, 0, :3], x[:, 0, :3], atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(ks[:, 1, -3:], x[:, 1, -3:], atol=1e-2, rtol=1e-3)
    assert ks[:, 0, 3:].abs().max() == 0 and ks[:, 1, :-3].abs().max() == 0


def test_bytes_are_smaller_than_a_bf16_store(tmp_path):
    path = _bases(tmp_path)
    sizes = {}
    for name in ("cskv", "bf16"):
        store = (_store(path, rank=4, window=4) if name == "cskv" else
                 PagedKVStore(1, H, D, page_size=S, dtype=torch.bfloat16))
        seq = store.add_sequence()
        store.append(seq, 0, torch.randn(400, H, D), torch.randn(400, H, D))
        sizes[name] = store.nbytes()
    # 2 * 4 fp16 coefficients per token and head against 2 * 16 bf16, plus pages' bookkeeping
    assert sizes["cskv"] < 0.45 * sizes["bf16"]


def test_rows_must_be_head_major_multiples(tmp_path):
    storage = CskvCodec(bases=_bases(tmp_path), k_rank=2, v_rank=2).make_storage(S, D, torch.float32,
                                                                                   torch.device("cpu"))
    storage.grow(4)
    with pytest.raises(ValueError, match="H\\*T rows head-major"):
        storage.write(torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]), torch.randn(3, D), torch.randn(3, D))


def test_grow_copy_page_and_fork_keep_content(tmp_path):
    store = _store(_bases(tmp_path), rank=4, window=2)
    seq = store.add_sequence()
    k, v = torch.randn(14, H, D), torch.randn(14, H, D)
    store.append(seq, 0, k, v)
    before = _read_all(store, seq)
    child = store.fork(seq)
    store.append(child, 0, torch.randn(40, H, D), torch.randn(40, H, D))  # grows, copies on write
    after = _read_all(store, seq)
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    child_k = _read_all(store, child)[0]
    torch.testing.assert_close(child_k[:12], before[0][:12])
    # tokens 12, 13 were in the window; the child's appends pushed them out, so its copy of
    # their page now keeps the first 4 channels (identity basis) and the parent's is untouched
    torch.testing.assert_close(child_k[12:14, :, :4], before[0][12:14, :, :4])
    assert child_k[12:14, :, 4:].abs().max() == 0 and before[0][12:14, :, 4:].abs().max() > 0


def test_layer_ranks():
    e = torch.zeros(3, 1, 8)
    e[0, 0, :2] = 1.0                      # layer 0: all energy in 2 channels
    e[1, 0] = 1.0                          # layer 1: flat spectrum
    e[2, 0] = torch.tensor([4.0, 2, 1, 1, 0, 0, 0, 0])
    assert layer_ranks(e, 0.5, None, "uniform") == [4, 4, 4]
    assert layer_ranks(e, None, 0.99) == [2, 8, 4]
    ranks = layer_ranks(e, 0.5, None)
    assert sum(ranks) == 12 and ranks[1] > ranks[0]


def test_registry_builds_per_layer_codecs_and_round_trips():
    p = policies.get("cskv", ratio=0.5, window=32)
    codecs = [p.codec_for(layer) for layer in range(30)]
    assert all(isinstance(c, CskvCodec) and c.layer == i and c.window == 32 for i, c in enumerate(codecs))
    assert abs(sum(c.k_rank for c in codecs) / 30 - 32) < 1
    assert Policy.from_config(p.to_config()) == p
    with pytest.raises(ValueError, match="ratio must be in"):
        policies.get("cskv", ratio=1.5)


def test_shipped_smollm2_bases_are_valid():
    b = load_bases(bases_path("smollm2"))
    assert b["k_enc"].shape == (30, 3, 64, 64)
    assert bases_path("smollm2").stat().st_size < 5 * 2 ** 20
    # encoder and decoder are inverse (full rank): E D = I, within fp16
    prod = b["k_enc"][3, 1] @ b["k_dec"][3, 1]
    torch.testing.assert_close(prod, torch.eye(64), atol=0.05, rtol=0)


def test_calibrated_full_rank_cskv_generates_like_dense_on_a_tiny_llama(tmp_path):
    from transformers import LlamaForCausalLM

    from kvkit.integrations.hf import KVKitCache
    from kvkit.testing import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    bases = calibrate(model, ids=torch.randint(3, 256, (512,)), chunk_tokens=256, progress=False)
    path = tmp_path / "tiny.safetensors"
    save_bases(bases, path, {"model": "tiny"})
    _load.cache_clear()
    ids = torch.randint(3, 256, (1, 40))
    with torch.inference_mode():
        dense = model.generate(ids, past_key_values=KVKitCache(model, "dense"), max_new_tokens=8,
                               do_sample=False, output_scores=True, return_dict_in_generate=True)
        full = model.generate(ids, past_key_values=KVKitCache(model, "cskv", ratio=1.0, window=0,
                                                               bases=str(path)),
                              max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
        half_cache = KVKitCache(model, "cskv", ratio=0.5, window=8, bases=str(path))
        half = model.generate(ids, past_key_values=half_cache, max_new_tokens=8, do_sample=False,
                              output_scores=True, return_dict_in_generate=True)
    for a, b in zip(dense.scores, full.scores):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    assert all(torch.isfinite(s).all() for s in half.scores)
    assert half_cache.store.stats().tokens_resident == 3 * 2 * 47
