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


def test_evicted_slots_are_refilled_and_read_back():
    store = PagedKVStore(1, H, D, page_size=S, dtype=torch.float32, page_format=GearCodec(bits=8, rank=0, outliers=0))
    seq = store.add_sequence()
    k, v = _kv(48)
    store.append(seq, 0, k, v)
    for h in range(H):
        store.evict(seq, 0, h, [3, 20])
    k2, v2 = _kv(2, seed=9)
    store.append(seq, 0, k2, v2)
    pos, ks, _ = store.read(seq, 0, 1)
    assert pos.tolist() == [p for p in range(50) if p not in (3, 20)]
    torch.testing.assert_close(ks[-2:], k2[:, 1], atol=0.1, rtol=0.05)


def test_registry_and_config_round_trip():
    p = policies.get("gear", bits=2, rank=1, outliers=0.02)
    assert p.codec == GearCodec(bits=2, rank=1, outliers=0.02)
    assert Policy.from_config(p.to_config()) == p
    assert policies.get("kivi", bits=3).codec == GearCodec(bits=3, rank=0, outliers=0.0, v_group=32)
    with pytest.raises(ConfigError, match="bits must be 2, 3, 4 or 8"):
        Policy.from_config({"codec": {"type": "gear", "bits": 5}})


@pytest.mark.parametrize("bad,match", [(dict(bits=1), "bits"), (dict(rank=-1), "rank"),
                                       (dict(outliers=0.7), "outliers"), (dict(v_group=0), "v_group"),
                                       (dict(buffer_dtype="int8"), "buffer_dtype")])
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
    default, ranked = policies.get("gear"), policies.get("gear", rank=2)
    assert default.codec.rank == 0
    sizes = []
    for policy in (default, ranked):
        store = policy.make_store(1, 3, 64, dtype=torch.float32)
        seq = store.add_sequence()
        g = torch.Generator().manual_seed(0)
        store.append(seq, 0, torch.randn(256, 3, 64, generator=g), torch.randn(256, 3, 64, generator=g))
        sizes.append(store.nbytes())
    assert sizes[0] < 0.8 * sizes[1]
