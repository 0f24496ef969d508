"""GEAR codec: packing, error bounds per bit width, low-rank and outlier repair, bytes, paging."""

import pytest
import torch

from kvkit import policies
from kvkit.errors import ConfigError
from kvkit.policies import Policy
from kvkit.policies.codecs.gear import GearCodec, pack_bits, unpack_bits
from kvkit.store import PagedKVStore

S, D, H = 16, 64, 3


def _kv(T, seed=0, outlier_channels=True):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(T, H, D, generator=g)
    if outlier_channels:  # keys have a few large channels, as real keys do
        k[..., :4] *= 8
    return k, torch.randn(T, H, D, generator=g)


def _roundtrip(codec, T=96, seed=0, decode_steps=0):
    store = PagedKVStore(1, H, D, page_size=S, dtype=torch.float32, page_format=codec)
    seq = store.add_sequence()
    k, v = _kv(T + decode_steps, seed)
    store.append(seq, 0, k[:T], v[:T])
    for t in range(T, T + decode_steps):
        store.append(seq, 0, k[t:t + 1], v[t:t + 1])
    ks = torch.stack([store.read(seq, 0, h)[1] for h in range(H)], 1)
    vs = torch.stack([store.read(seq, 0, h)[2] for h in range(H)], 1)
    return store, k, v, ks, vs


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bits_is_exact_and_dense(bits):
    codes = torch.randint(0, 2 ** bits, (7, 1024), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 1024 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 1024), codes)


def test_pack_bits_layout_is_two_int4_or_four_int2_per_byte():
    assert pack_bits(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8), 4).tolist() == \
        [[0x21, 0x43, 0x65, 0x87]]
    assert pack_bits(torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]], dtype=torch.uint8), 2).tolist() == \
        [[0b00111001, 0b11111111]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_plain_quantization_error_is_within_half_a_step(bits):
    store, k, v, ks, vs = _roundtrip(GearCodec(bits=bits, rank=0, outliers=0.0), T=96)
    levels = 2 ** bits - 1
    # keys: groups are channels over a page's 16 tokens; values: one token's 64 channels
    kp = k.view(6, S, H, D)
    k_step = (kp.amax(1, keepdim=True) - kp.amin(1, keepdim=True)) / levels
    bound_k = (k_step / 2 * 1.01 + 1e-3).expand_as(kp).reshape(96, H, D)
    assert ((ks - k).abs() <= bound_k).all()
    v_step = (v.amax(-1, keepdim=True) - v.amin(-1, keepdim=True)) / levels
    assert ((vs - v).abs() <= v_step / 2 * 1.01 + 1e-3).all()


@pytest.mark.parametrize("bits,max_rel", [(2, 0.45), (3, 0.2), (4, 0.1), (8, 0.01)])
def test_gear_relative_error_budget_per_bit_width(bits, max_rel):
    _, k, v, ks, vs = _roundtrip(GearCodec(bits=bits, rank=2, outliers=0.01), T=96)
    for x, y in ((k, ks), (v, vs)):
        assert ((y - x).norm() / x.norm()).item() < max_rel
        assert torch.nn.functional.cosine_similarity(x.reshape(-1, D), y.reshape(-1, D)).min() > 1 - max_rel


@pytest.mark.parametrize("bits", [2, 4])
def test_repair_lowers_the_error_of_plain_quantization(bits):
    _, k, v, k0, v0 = _roundtrip(GearCodec(bits=bits, rank=0, outliers=0.0))
    _, _, _, kr, vr = _roundtrip(GearCodec(bits=bits, rank=0, outliers=0.02))
    _, _, _, kl, vl = _roundtrip(GearCodec(bits=bits, rank=4, outliers=0.0))
    for x, plain, out, low in ((k, k0, kr, kl), (v, v0, vr, vl)):
        assert (out - x).norm() < (plain - x).norm()
        assert (low - x).norm() < (plain - x).norm()


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_low_rank_error_is_the_known_tail_of_the_residual_spectrum(rank):
    # Quantization is the same with and without the repair, so the residual of plain
    # quantization is known; by Eckart-Young its best rank-r approximation leaves exactly the
    # singular values beyond r, and that is what a rank-r page must leave (up to fp16 factors).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(S, D, generator=g) + torch.randn(S, 3, generator=g) @ torch.randn(3, D, generator=g)
    out = {}
    for r in (0, rank):
        store = PagedKVStore(1, 1, D, page_size=S, dtype=torch.float32,
                             page_format=GearCodec(bits=2, rank=r, outliers=0.0))
        seq = store.add_sequence()
        store.append(seq, 0, x[:, None], x[:, None])
        out[r] = store.read(seq, 0, 0)[2]
    sv = torch.linalg.svdvals(x - out[0])
    expected = sv[rank:].square().sum().sqrt()
    got = (x - out[rank]).norm()
    assert got == pytest.approx(expected.item(), rel=0.02)
    assert got < sv.square().sum().sqrt() * (1 - rank / S / 2)


def test_outliers_come_back_exact():
    k, v = _kv(32, outlier_channels=False)
    v[5, 1, 7], k[9, 2, 3] = 40.0, -55.0
    store = PagedKVStore(1, H, D, page_size=S, dtype=torch.float32,
                         page_format=GearCodec(bits=2, rank=0, outliers=0.01))
    seq = store.add_sequence()
    store.append(seq, 0, k, v)
    assert store.read(seq, 0, 1)[2][5, 7].item() == pytest.approx(40.0, abs=0.05)
    assert store.read(seq, 0, 2)[1][9, 3].item() == pytest.approx(-55.0, abs=0.05)


@pytest.mark.parametrize("bits,outliers,limit", [(4, 0.01, 0.35), (2, 0.02, 0.25)])
def test_bytes_are_really_smaller(bits, outliers, limit):
    # page_size 64 amortizes the per-channel key ranges; 4K tokens amortize the open pages'
    # full-precision buffer; ratios against a bf16 store fed the same tokens
    stores = {}
    for name, fmt in (("gear", GearCodec(bits=bits, rank=0, outliers=outliers)), ("bf16", None)):
        store = PagedKVStore(1, H, D, page_size=64, dtype=torch.bfloat16, page_format=fmt)
        seq = store.add_sequence()
        k, v = _kv(4096 + 1)
        store.append(seq, 0, k.bfloat16(), v.bfloat16())
        stores[name] = store.nbytes()
    assert stores["gear"] < limit * stores["bf16"]


def test_bytes_per_page_matches_the_tensors():
    codec = GearCodec(bits=4, rank=2, outliers=0.01)
    store = PagedKVStore(1, 1, D, page_size=S, dtype=torch.float32, page_format=codec)
    before = store.nbytes()
    store.add_sequence()
    store.append(0, 0, *(t[:, :1] for t in _kv(S)))
    pages = store.stats().pages_capacity
    per_page = (store.nbytes() - before) / pages
    overhead = S * 4 + S + 4  # slot positions, fill mask, staging row index
    assert per_page == codec.bytes_per_page(S, D) + overhead


def test_open_page_stays_full_precision_until_full():
    store, k, v, ks, vs = _roundtrip(GearCodec(bits=2, rank=0, outliers=0.0), T=40)
    # tokens 32..39 sit in the open third page: exact up to the fp16 buffer
    torch.testing.assert_close(ks[32:], k[32:], atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(vs[32:], v[32:], atol=1e-2, rtol=1e-3)
    assert not torch.allclose(ks[:32], k[:32], atol=1e-2)


def test_decode_appends_match_a_prefill_of_the_same_tokens():
    _, _, _, k1, v1 = _roundtrip(GearCodec(bits=4, buffer_dtype="fp32"), T=20, decode_steps=45)
    _, _, _, k2, v2 = _roundtrip(GearCodec(bits=4, buffer_dtype="fp32"), T=65)
    torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)


def test_grow_and_copy_page_keep_content():
    codec = GearCodec(bits=4, rank=2, outliers=0.01)
    storage = codec.make_storage(S, D, torch.float32, torch.device("cpu"))
    storage.grow(2)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(S + 5, D, generator=g), torch.randn(S + 5, D, generator=g)
    pages = torch.tensor([0] * S + [1] * 5)
    slots = torch.cat([torch.arange(S), torch.arange(5)])
    storage.write(pages, slots, k, v)
    before = storage.read(torch.tensor([0, 1]))
    storage.grow(40)
    after = storage.read(torch.tensor([0, 1]))
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    storage.copy_page(0, 7)   # a compressed page
    storage.copy_page(1, 9)   # an open page in the staging buffer
    k2, v2 = storage.read(torch.tensor([7, 9]))
    assert torch.equal(k2, torch.stack([before[0][0], before[0][1]]))
    assert torch.equal(v2, torch.stack([before[1][0], before[1][1]]))
    # the copy is independent: filling the copy's open page leaves the original open page as is
    storage.write(torch.tensor([9] * (S - 5)), torch.arange(5, S), k[:S - 5], v[:S - 5])
    assert torch.equal(storage.read(torch.tensor([1]))[0][0, :5], before[0][1, :5])


def test_write_into_a_compressed_page_updates_it():
    # the store never does this (`encodes_pages`); a direct caller gets the page decoded, the slot
    # written and the page re-encoded: the new token reads back, the others stay near their value
    storage = GearCodec(bits=8, rank=0, outliers=0).make_storage(S, D, torch.float32, torch.device("cpu"))
    storage.grow(1)
    k, v = _kv(S, outlier_channels=False)
    storage.write(torch.zeros(S, dtype=torch.int64), torch.arange(S), k[:, 0], v[:, 0])
    before_k, before_v = storage.read(torch.tensor([0]))
    k2, v2 = _kv(1, seed=5, outlier_channels=False)
    storage.write(torch.tensor([0]), torch.tensor([3]), k2[:, 0], v2[:, 0])
    after_k, after_v = storage.read(torch.tensor([0]))
    torch.testing.assert_close(after_k[0, 3], k2[0, 0], atol=0.1, rtol=0.05)
    torch.testing.assert_close(after_v[0, 3], v2[0, 0], atol=0.1, rtol=0.05)
    others = [i for i in range(S) if i != 3]
    torch.testing.assert_close(after_k[0, others], before_k[0, others], atol=0.1, rtol=0.05)
    torch.testing.assert_close(after_v[0, others], before_v[0, others], atol=0.1, rtol=0.05)


def test_fork_and_copy_on_write_through_the_store():
    store = PagedKVStore(1, H, D, page_size=S, dtype=torch.float32, page_format=GearCodec(bits=4))
    seq = store.add_sequence()
    k, v = _kv(40)
    store.append(seq, 0, k, v)
    child = store.fork(seq)
    store.append(child, 0, *_kv(3, seed=5))
    pos, k_parent, _ = store.read(seq, 0, 0)
    assert pos.tolist() == list(range(40))
    assert store.read(child, 0, 0)[0].tolist() == list(range(43))
    torch.testing.assert_close(store.read(child, 0, 0)[1][:40], k_parent)


def _evict_then_append(codec, T):
    """T tokens, positions 3 and 20 evicted from every head, then 2 new tokens appended. Returns
    the tokens, the new ones, head 1's positions, K and V after, and its (positions, K, V) before."""
    store = PagedKVStore(1, H, D, page_size=S, dtype=torch.float32, page_format=codec)
    seq = store.add_sequence()
    k, v = _kv(T)
    store.append(seq, 0, k, v)
    for h in range(H):
        store.evict(seq, 0, h, [3, 20])
    before = store.read(seq, 0, 1)
    k2, v2 = _kv(2, seed=9)
    store.append(seq, 0, k2, v2)
    pos, ks, vs = store.read(seq, 0, 1)
    assert pos.tolist() == [p for p in range(T + 2) if p not in (3, 20)]
    return k, v, k2, v2, pos, ks, vs, before


def test_evicted_slots_are_not_refilled():
    # refilling a hole would re-encode its page: the page's other tokens, quantized again from
    # their decoded values, would change at every refill (2 bits: by a lot)
    _, _, k2, v2, pos, ks, vs, (pos0, k0, v0) = _evict_then_append(GearCodec(bits=2, rank=0, outliers=0), 48)
    assert torch.equal(pos[:-2], pos0) and torch.equal(ks[:-2], k0) and torch.equal(vs[:-2], v0)
    torch.testing.assert_close(ks[-2:], k2[:, 1], atol=0.6, rtol=0.2)  # the open page: 2 bits once full


def test_page_whose_tokens_are_all_evicted_goes_back_to_the_pool():
    store = PagedKVStore(1, H, D, page_size=S, dtype=torch.float32, page_format=GearCodec(bits=4, rank=0))
    seq = store.add_sequence()
    k, v = _kv(3 * S)
    store.append(seq, 0, k, v)
    store.evict(seq, 0, 0, range(S - 1))
    assert len(store.page_table(seq, 0, 0)) == 3  # one token left in page 0: kept
    store.evict(seq, 0, 0, [S - 1])
    assert len(store.page_table(seq, 0, 0)) == 2
    store.append(seq, 0, *_kv(1, seed=3))
    assert len(store.page_table(seq, 0, 0)) == 3 and store.read(seq, 0, 0)[0].tolist() == list(range(S, 3 * S + 1))


def test_registry_and_config_round_trip():
    p = policies.get("gear", bits=2, rank=1, outliers=0.02)
    assert p.codec == GearCodec(bits=2, rank=1, outliers=0.02, window=32, sink=16) and p.page_size == 32
    assert Policy.from_config(p.to_config()) == p
    assert policies.get("kivi", bits=3).codec == GearCodec(bits=3, rank=0, outliers=0.0, v_group=32)
    with pytest.raises(ConfigError, match="bits must be 2, 3, 4 or 8"):
        Policy.from_config({"codec": {"type": "gear", "bits": 5}})


@pytest.mark.parametrize("bad,match", [(dict(bits=1), "bits"), (dict(rank=-1), "rank"),
                                       (dict(outliers=0.7), "outliers"), (dict(v_group=0), "v_group"),
                                       (dict(buffer_dtype="int8"), "buffer_dtype"), (dict(window=-1), "window"),
                                       (dict(window=1.5), "window"), (dict(window=True), "window"),
                                       (dict(sink=-1), "sink"), (dict(sink="16"), "sink")])
def test_bad_parameters_say_what_is_expected(bad, match):
    with pytest.raises(ValueError, match=f"GearCodec.{match}"):
        GearCodec(**bad)


def test_geometry_errors():
    with pytest.raises(ValueError, match="v_group=48 must divide head_dim=64"):
        GearCodec(v_group=48).make_storage(S, D, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="rank=20 exceeds"):
        GearCodec(rank=20).make_storage(S, D, torch.float32, torch.device("cpu"))


def test_generate_through_kvkit_cache_on_a_tiny_llama():
    from transformers import LlamaForCausalLM

    from kvkit.integrations.hf import KVKitCache
    from kvkit.testing import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    ids = torch.randint(3, 256, (1, 50))
    with torch.inference_mode():
        dense = model.generate(ids, past_key_values=KVKitCache(model, "dense"), max_new_tokens=12,
                               do_sample=False, output_scores=True, return_dict_in_generate=True)
        cache = KVKitCache(model, policies.get("gear", bits=8, rank=1))
        gear = model.generate(ids, past_key_values=cache, max_new_tokens=12, do_sample=False,
                              output_scores=True, return_dict_in_generate=True)
    # 8-bit GEAR is near-lossless: the logits of every generated step match closely
    for a, b in zip(dense.scores, gear.scores):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    assert cache.nbytes() > 0 and cache.store.stats().tokens_resident == 3 * 2 * 61


def test_registered_gear_defaults_to_rank_0_which_holds_fewer_bytes():
    assert policies.get("gear").codec.rank == 0
    # without the full-precision pages, which would hide the factors' bytes in 256 tokens
    default, ranked = policies.get("gear", window=0, sink=0), policies.get("gear", rank=2, window=0, sink=0)
    sizes = []
    for policy in (default, ranked):
        store = policy.make_store(1, 3, 64, dtype=torch.float32)
        seq = store.add_sequence()
        g = torch.Generator().manual_seed(0)
        store.append(seq, 0, torch.randn(256, 3, 64, generator=g), torch.randn(256, 3, 64, generator=g))
        sizes.append(store.nbytes())
    assert sizes[0] < 0.8 * sizes[1]


# ---- the full-precision recent window ----------------------------------------------------------
def _windowed(window, T, decode_steps=0, seed=0, bits=2):
    """Reads of a GEAR store (fp32 buffer) after a prefill of T tokens and `decode_steps` appends."""
    return _roundtrip(GearCodec(bits=bits, rank=0, outliers=0.0, buffer_dtype="fp32", window=window),
                      T=T, decode_steps=decode_steps, seed=seed)


def _exact_positions(length, window):
    """The reference: positions whose page (pages fill in order) holds one of the last `window`
    positions, or is the open page."""
    open_page = length // S if length % S else -1
    return [p for p in range(length)
            if p // S == open_page or (p // S) * S + S - 1 >= length - window]


@pytest.mark.parametrize("T,decode_steps", [(40, 0), (64, 0), (20, 30), (1, 47)])
def test_window_covering_the_context_equals_an_uncompressed_store(T, decode_steps):
    _, k, v, ks, vs = _windowed(window=T + decode_steps, T=T, decode_steps=decode_steps)
    assert torch.equal(ks, k) and torch.equal(vs, v)
    _, _, _, ks2, vs2 = _windowed(window=10_000, T=T, decode_steps=decode_steps)
    assert torch.equal(ks2, k) and torch.equal(vs2, v)


@pytest.mark.parametrize("window", [0, 1, S - 1, S, S + 1, 2 * S, 3 * S - 5])
@pytest.mark.parametrize("T,decode_steps", [(50, 0), (64, 0), (33, 14), (16, 33)])
def test_window_keeps_the_last_tokens_exact_and_quantizes_the_rest(window, T, decode_steps):
    n = T + decode_steps
    _, k, v, ks, vs = _windowed(window, T, decode_steps)
    _, _, _, k0, v0 = _windowed(0, T, decode_steps)  # no window: every full page quantized
    exact = _exact_positions(n, window)
    old = [p for p in range(n) if p not in exact]
    assert set(range(max(0, n - window), n)) <= set(exact)  # the last `window` tokens at least
    assert len(exact) <= window + 2 * S - 1                 # page granular, no more
    assert torch.equal(ks[exact], k[exact]) and torch.equal(vs[exact], v[exact])
    # older tokens are exactly what a store without a window holds: quantized, not original
    assert torch.equal(ks[old], k0[old]) and torch.equal(vs[old], v0[old])
    if old:
        assert not torch.allclose(ks[old], k[old], atol=1e-3)


def test_window_ages_with_decode_steps():
    codec = GearCodec(bits=2, rank=0, outliers=0.0, buffer_dtype="fp32", window=S)
    store = PagedKVStore(1, H, D, page_size=S, dtype=torch.float32, page_format=codec)
    seq = store.add_sequence()
    k, v = _kv(80)
    store.append(seq, 0, k[:20], v[:20])
    for t in range(20, 80):
        store.append_step([seq], 0, k[t:t + 1], v[t:t + 1])
        n = t + 1
        ks = store.read(seq, 0, 1)[1]
        exact = _exact_positions(n, S)
        assert torch.equal(ks[exact], k[exact, 1])
        staged = int((store.storage(0).stage_row >= 0).sum())
        assert staged == H * len({p // S for p in exact})  # window pages leave the buffer as they age


def test_window_bytes_are_real_staging_rows():
    sizes = {}
    for window in (0, 64):
        store = PagedKVStore(1, H, D, page_size=S, dtype=torch.float32,
                             page_format=GearCodec(bits=4, rank=0, outliers=0.0, window=window))
        seq = store.add_sequence()
        store.append(seq, 0, *_kv(256))
        storage = store.storage(0)
        staged = int((storage.stage_row >= 0).sum())
        assert staged == H * (window // S)  # 256 = 16 full pages: the last 64 tokens are 4 pages
        assert storage.stage_k.shape[0] >= staged
        assert store.nbytes() == sum(t.nbytes for t in store._pools[0].tensors())
        sizes[window] = store.nbytes()
    # the window's rows are fp16 K and V pages on top of the compressed pool
    assert sizes[64] - sizes[0] >= H * 4 * 2 * S * D * 2


def test_window_survives_fork_and_copy_on_write():
    codec = GearCodec(bits=2, rank=0, outliers=0.0, buffer_dtype="fp32", window=20)
    store = PagedKVStore(1, H, D, page_size=S, dtype=torch.float32, page_format=codec)
    seq = store.add_sequence()
    k, v = _kv(60, seed=1)
    store.append(seq, 0, k[:40], v[:40])
    child = store.fork(seq)
    store.append(child, 0, k[40:45], v[40:45])
    store.append(seq, 0, k[40:45] + 1, v[40:45] + 1)  # the parent diverges in the shared open page
    for s, extra in ((child, 0), (seq, 1)):
        kk = torch.cat([k[:40], k[40:45] + extra])
        alone = PagedKVStore(1, H, D, page_size=S, dtype=torch.float32, page_format=codec)
        a = alone.add_sequence()
        alone.append(a, 0, kk, torch.cat([v[:40], v[40:45] + extra]))
        for h in range(H):
            assert torch.equal(store.read(s, 0, h)[1], alone.read(a, 0, h)[1])
        exact = _exact_positions(45, 20)
        assert torch.equal(store.read(s, 0, 2)[1][exact], kk[exact, 2])


def test_window_with_eviction_keeps_new_tokens_exact():
    codec = GearCodec(bits=2, rank=0, outliers=0.0, buffer_dtype="fp32", window=S)
    k, v, k2, v2, pos, ks, vs, _ = _evict_then_append(codec, 50)
    # the new tokens go to the open page, not into the holes of compressed pages 0 and 1: exact
    assert torch.equal(ks[-2:], k2[:, 1]) and torch.equal(vs[-2:], v2[:, 1])
    recent = (pos >= 32) & (pos < 50)  # pages 2 (newest 47: inside the window) and 3 (open)
    assert torch.equal(ks[recent], k[32:50, 1])


def test_sink_pages_stay_exact_beside_the_window():
    codec = GearCodec(bits=2, rank=0, outliers=0.0, buffer_dtype="fp32", window=S, sink=S + 1)
    store = PagedKVStore(1, H, D, page_size=S, dtype=torch.float32, page_format=codec)
    seq = store.add_sequence()
    k, v = _kv(100)
    store.append(seq, 0, k[:10], v[:10])
    for t in range(10, 100):
        store.append(seq, 0, k[t:t + 1], v[t:t + 1])
    ks, vs = (torch.stack([store.read(seq, 0, h)[i] for h in range(H)], 1) for i in (1, 2))
    _, _, _, k0, _ = _windowed(0, 100)
    exact = sorted(set(range(2 * S)) | set(_exact_positions(100, S)))  # positions 0..16: pages 0 and 1
    old = [p for p in range(100) if p not in exact]
    assert torch.equal(ks[exact], k[exact]) and torch.equal(vs[exact], v[exact])
    assert torch.equal(ks[old], k0[old])
    assert int((store.storage(0).stage_row >= 0).sum()) == H * (2 + 2)  # sinks, the window page, the open page


def test_window_registry_and_config_round_trip():
    p = policies.get("gear", bits=4, window=128, sink=16)
    assert p.codec == GearCodec(bits=4, rank=0, outliers=0.01, window=128, sink=16)
    assert Policy.from_config(p.to_config()) == p
    assert policies.get("kivi", bits=2, window=64).codec.window == 64
    with pytest.raises(ConfigError, match="GearCodec.window must be an int >= 0"):
        Policy.from_config({"codec": {"type": "gear", "window": -4}})


@pytest.mark.parametrize("params", [{"bits": 4}, {"bits": 2, "window": 8}])
def test_a_freed_page_is_a_fresh_page_for_its_next_owner(params):
    """A page freed and taken by another sequence starts open: its new tokens read back exact
    (staged, full precision), not re-encoded with the previous owner's leftovers."""
    store = policies.get("gear", **params).make_store(1, 3, 64)
    S = store.page_size
    first = store.add_sequence()
    store.append(first, 0, torch.randn(4 * S, 3, 64), torch.randn(4 * S, 3, 64))
    store.free(first)
    second = store.add_sequence()
    k, v = torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    store.append(second, 0, k, v)
    for h in range(3):
        _, kh, vh = store.read(second, 0, h)
        torch.testing.assert_close(kh[0].float(), k[0, h], atol=2e-2, rtol=0)  # the staging dtype
        torch.testing.assert_close(vh[0].float(), v[0, h], atol=2e-2, rtol=0)
