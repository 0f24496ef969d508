"""GEAR: quantized K/V, repaired by a low-rank residual and sparse outliers. arXiv:2403.05527.

Each page (`page_size` tokens of one KV head) is compressed once it is full and none of its
tokens is among the `window` most recent ones; until then its tokens sit in a full-precision
staging buffer (GEAR's streaming buffer and KIVI's full-precision residual: recent tokens stay
exact and are compressed in chunks — here a chunk is a page). With `window=0` only the open
page is staged; with `window=W` every page holding one of the last W positions is too (page
granular: up to W + 2 * page_size - 2 exact tokens per KV head), and with `sink=n` the pages
holding positions below n are never compressed (attention sinks: the first tokens draw much of
every query's attention, so their quantization error reaches every output). Recency is by
position, which the store passes with each write (`takes_positions`). A full page `X [S, D]`
of keys (or values) is stored as

1. **sparse outliers**: the `outliers` fraction of entries farthest from their quantization
   group's mean, as an int16 flat index plus an fp16 correction, so they are exact after the
   repair and do not stretch their group's range;
2. **group quantization** of the rest to `bits` (2, 3, 4 or 8) with an fp16 minimum and step
   per group, codes really packed (8 codes of b bits in b bytes: two int4 or four int2 per
   byte). As in KIVI and GEAR-KIVI, keys are quantized *per channel* (a group is one channel
   over the page's tokens: keys have outlier channels) and values *per token* (a group is
   `v_group` channels of one token);
3. a **low-rank** (rank `rank`, fp16 factors `[S, r]` and `[r, D]`) approximation of what the
   quantization left over, by truncated SVD of the page's residual (GEAR uses a few power
   iterations; on a 16x64 page an exact SVD is as cheap).

Reading a page dequantizes the codes, adds the low-rank term and scatters the outlier
corrections. Every tensor (codes, scales, factors, outliers, staging buffer, fill mask) is
returned by `tensors()`, so `store.nbytes()` counts them.

Limits: the store does not refill slots that eviction freed in a GEAR layer (`encodes_pages`):
a refill would re-encode the page's other tokens from their decoded values, adding a second
quantization error each time (a streaming head refills its sink page at every step). A page
comes back to the pool when its last token is evicted, so slot-level eviction (H2O, A2SF) frees
memory only page by page. A caller that writes into a compressed page itself gets it decoded
and updated: staged whole (older tokens as decoded) while the new token is inside the window,
else re-encoded at once. A page back in the free pool forgets its compressed content, staging
row and pin (`forget`, called by the store), so its next owner starts with an open page. The
window's clock is the largest position the layer has seen, shared by every sequence of the
store: a sequence shorter than the longest one has its pages compressed early (its exact window
is shorter by the difference). Staging rows are allocated in `buffer_dtype` on top of every
page's compressed tensors, so a window adds `4 * S * D` bytes (fp16) per staged page and KV head.
Bytes per page (S=16, D=64, bits=4, rank=0, no outliers): 1024 B codes + 256 B key mins/steps
+ 4 * S * D / v_group B value mins/steps, against 4096 B in bf16: small pages pay for the
per-channel key groups; `page_size=64` amortizes them (see bench/memory.py).

Shapes: N pages in the pool, U pages in a write, P pages read, S page_size, D head_dim,
g value groups per token (D // v_group), r rank, o outliers per page, M staging rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvkit.policies.base import Codec, Policy, component
from kvkit.policies.codecs.staging import StagingRows
from kvkit.policies.registry import register

BUFFER_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ---- bit packing -----------------------------------------------------------------------------
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dim: `[..., n]` -> uint8 `[..., n*bits/8]`.

    Every 8 codes become `bits` bytes (code i occupies bits [i*b, (i+1)*b) of a little-endian
    word), so 4-bit codes are two per byte and 2-bit codes four per byte. n must be a multiple of 8.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    *lead, n = codes.shape
    if n % 8:
        raise ValueError(f"pack_bits needs a multiple of 8 codes in the last dim, got {n}")
    c = codes.to(torch.int64).reshape(*lead, n // 8, 8)  # [..., n/8, 8]
    shifts = torch.arange(8, device=codes.device) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # [..., n/8, 1], up to 64 bits
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, n // 8 * bits)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 `[..., n*bits/8]` -> uint8 codes `[..., n]`."""
    *lead, m = packed.shape
    if bits in (1, 2, 4, 8):  # whole codes per byte: shift bytes, no wide words
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*lead, n)
    b = packed.to(torch.int64).reshape(*lead, n // 8, bits)  # [..., n/8, bits]
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    word = (b << byte_shifts).sum(-1, keepdim=True)  # [..., n/8, 1]
    shifts = torch.arange(8, device=packed.device) * bits
    return ((word >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(*lead, n)


# ---- one matrix kind (K or V) ------------------------------------------------------------------
class _Part:
    """Compressed pages of one of K or V: codes, group min/step, low-rank factors, outliers."""

    def __init__(self, per_channel: bool, page_size: int, head_dim: int, bits: int, v_group: int,
                 rank: int, num_outliers: int, device: torch.device):
        S, D = page_size, head_dim
        self.per_channel, self.S, self.D, self.bits, self.group = per_channel, S, D, bits, v_group
        self.rank, self.num_outliers = rank, num_outliers
        stats = (D,) if per_channel else (S, D // v_group)
        z = dict(device=device)
        self.codes = torch.zeros(0, S * D * bits // 8, dtype=torch.uint8, **z)
        self.lo = torch.zeros(0, *stats, dtype=torch.float16, **z)
        self.step = torch.zeros(0, *stats, dtype=torch.float16, **z)
        self.a = torch.zeros(0, S, rank, dtype=torch.float16, **z)
        self.b = torch.zeros(0, rank, D, dtype=torch.float16, **z)
        self.o_idx = torch.zeros(0, num_outliers, dtype=torch.int16, **z)
        self.o_val = torch.zeros(0, num_outliers, dtype=torch.float16, **z)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.lo, self.step, self.a, self.b, self.o_idx, self.o_val]

    _NAMES = ("codes", "lo", "step", "a", "b", "o_idx", "o_val")

    def grow(self, num_pages: int) -> None:
        for name in self._NAMES:
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, t.new_zeros(num_pages - t.shape[0], *t.shape[1:])]))

    def copy_page(self, src: int, dst: int) -> None:
        for t in self.tensors():
            t[dst] = t[src]

    def _groups(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A view whose reduction dim is one quantization group, and that dim."""
        if self.per_channel:
            return x, 1                                   # [U, S, D], groups over tokens
        U = x.shape[0]
        return x.reshape(U, self.S, self.D // self.group, self.group), 3  # [U, S, g, group]

    def encode(self, pages: torch.Tensor, x: torch.Tensor) -> None:
        """Compress full pages: x `[U, S, D]` float32 into slots `pages` `[U]`."""
        U, S, D = x.shape
        levels = (1 << self.bits) - 1
        flat = x.reshape(U, S * D)
        xg, dim = self._groups(x)
        center = xg.mean(dim, keepdim=True).expand_as(xg).reshape(U, S * D)
        if self.num_outliers:
            idx = (flat - center).abs().topk(self.num_outliers, dim=1).indices  # [U, o]
            clean = flat.scatter(1, idx, center.gather(1, idx))  # outliers do not stretch ranges
        else:
            idx = torch.zeros(U, 0, dtype=torch.int64, device=x.device)
            clean = flat
        cg, _ = self._groups(clean.reshape(U, S, D))
        lo = cg.amin(dim, keepdim=True).half().float()
        step = ((cg.amax(dim, keepdim=True) - lo) / levels).clamp(min=1e-6).half().float()
        codes = torch.round((cg - lo) / step).clamp(0, levels)
        deq = (codes * step + lo).reshape(U, S, D)
        resid = x - deq                                   # [U, S, D]
        if self.rank:
            fit = resid.reshape(U, S * D).scatter(1, idx, 0.0).reshape(U, S, D)
            u, s, vh = torch.linalg.svd(fit, full_matrices=False)  # [U,S,k], [U,k], [U,k,D]
            root = s[:, :self.rank].sqrt()[:, None, :]
            a, b = (u[:, :, :self.rank] * root).half(), (vh[:, :self.rank] * root.transpose(1, 2)).half()
            self.a[pages], self.b[pages] = a, b
            resid = resid - a.float() @ b.float()
        self.codes[pages] = pack_bits(codes.reshape(U, S * D).to(torch.uint8), self.bits)
        self.lo[pages] = lo.squeeze(dim).half()
        self.step[pages] = step.squeeze(dim).half()
        if self.num_outliers:
            self.o_idx[pages] = idx.to(torch.int16)
            self.o_val[pages] = resid.reshape(U, S * D).gather(1, idx).half()

    def decode(self, pages: torch.Tensor) -> torch.Tensor:
        """Pages `[P]` -> float32 `[P, S, D]`."""
        P, S, D = pages.shape[0], self.S, self.D
        x = unpack_bits(self.codes[pages], self.bits, S * D).to(torch.float32)  # [P, S*D]
        if self.per_channel:
            x = x.view(P, S, D).mul_(self.step[pages].float()[:, None, :]).add_(self.lo[pages].float()[:, None, :])
        else:
            g = x.view(P, S, D // self.group, self.group)
            x = g.mul_(self.step[pages].float()[..., None]).add_(self.lo[pages].float()[..., None]).view(P, S, D)
        if self.rank:
            x = torch.baddbmm(x, self.a[pages].float(), self.b[pages].float())
        if self.num_outliers:
            base = (torch.arange(P, device=x.device) * (S * D))[:, None]
            x.view(-1).index_add_(0, (self.o_idx[pages].long() + base).view(-1),
                                  self.o_val[pages].float().view(-1))
        return x


class GearStorage(StagingRows):
    """GEAR pages of one layer: compressed K and V parts plus a staging buffer for open pages
    and pages inside the recent window.

    Tensors: `filled [N, S]` bool (slots written since the page was opened), `stage_row [N]`
    int32 (row of the staging buffer holding a staged page, -1 when compressed),
    `stage_k/stage_v [M, S, D]` in `buffer_dtype`, and the two `_Part`s.
    """

    takes_positions = True  # the store passes the tokens' positions: they age the window
    encodes_pages = True  # per-channel key groups span a page: the store does not refill evicted slots

    def __init__(self, page_size: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 codec: GearCodec):
        S, D = page_size, head_dim
        self.S, self.D, self.dtype, self.device = S, D, dtype, device
        n_out = int(round(codec.outliers * S * D))
        v_group = min(codec.v_group or D, D)
        common = dict(page_size=S, head_dim=D, bits=codec.bits, v_group=v_group, rank=codec.rank,
                      num_outliers=n_out, device=device)
        self.kp = _Part(per_channel=True, **common)
        self.vp = _Part(per_channel=False, **common)
        self.filled = torch.zeros(0, S, dtype=torch.bool, device=device)
        self._init_staging(S, D, BUFFER_DTYPES[codec.buffer_dtype], device)
        self._init_window(codec.window)
        self.sink = codec.sink

    # ---- PageStorage -------------------------------------------------------------------------
    def grow(self, num_pages: int) -> None:
        extra = num_pages - self.filled.shape[0]
        self.kp.grow(num_pages)
        self.vp.grow(num_pages)
        self.filled = torch.cat([self.filled, self.filled.new_zeros(extra, self.S)])
        self._grow_staging(extra)

    def write(self, pages: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              positions: torch.Tensor | None = None) -> None:
        """Store tokens (pages, slots, positions `[n]`; k, v `[n, D]`). Without positions (a
        caller other than the store) the tokens count as the newest: only valid with window=0."""
        if positions is None:
            if self.window or self.sink:
                raise ValueError("a GEAR storage with a window or sink needs the tokens' positions")
            positions = torch.full_like(pages, self._clock - 1)
        if self.sink and bool((early := positions < self.sink).any()):
            self._pinned.update(pages[early].tolist())
        uniq, inv = pages.unique(return_inverse=True)          # [U], [n]
        work_k, work_v = self._current(uniq)                    # [U, S, D] float32 each
        work_k[inv, slots] = k.float()
        work_v[inv, slots] = v.float()
        self.filled[pages, slots] = True
        # the clock counts positions from 1: the newest token of a sequence is 0 ticks old
        ticks = positions.to(uniq.dtype) + 1
        newest = torch.zeros_like(uniq).scatter_reduce_(0, inv, ticks, "amax")  # [U]
        self._clock = max(self._clock, int(newest.max()))
        self._settle(uniq, work_k, work_v, newest)

    def read(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kp.decode(pages), self.vp.decode(pages)     # [P, S, D]
        rows = self.stage_row[pages].long()                     # [P]
        open_ = rows >= 0
        if bool(open_.any()):
            k[open_] = self.stage_k[rows[open_]].float()
            v[open_] = self.stage_v[rows[open_]].float()
        return k.to(self.dtype), v.to(self.dtype)

    def forget(self, pages: torch.Tensor) -> None:
        """As `StagingRows.forget`, and the pages hold no compressed content: a reused page is
        a fresh one, not a compressed page written again."""
        super().forget(pages)
        self.kp.step[pages] = 0
        self.vp.step[pages] = 0

    def copy_page(self, src: int, dst: int) -> None:
        self.kp.copy_page(src, dst)
        self.vp.copy_page(src, dst)
        self.filled[dst] = self.filled[src]
        self._copy_staged(src, dst)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.kp.tensors(), *self.vp.tensors(), self.filled, self.stage_row,
                self.stage_k, self.stage_v]

    # ---- internals -----------------------------------------------------------------------------
    def _encode(self, pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Compress full pages `[U]` from float32 `[U, S, D]`; their slots count as unwritten again."""
        self.kp.encode(pages, k)
        self.vp.encode(pages, v)
        self.filled[pages] = False

    def _current(self, uniq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What pages `uniq` hold now, float32: staged rows, else decoded pages (zeros if never written)."""
        U = uniq.shape[0]
        k = torch.zeros(U, self.S, self.D, device=self.device)
        v = torch.zeros_like(k)
        rows = self.stage_row[uniq].long()
        staged = rows >= 0
        written = ~staged & self.kp_written(uniq)
        if bool(staged.any()):
            k[staged] = self.stage_k[rows[staged]].float()
            v[staged] = self.stage_v[rows[staged]].float()
        if bool(written.any()):
            # a compressed page written again (slot reuse): decode, update, re-encode; all its
            # slots count as written, so it is re-encoded by this same write
            k[written] = self.kp.decode(uniq[written])
            v[written] = self.vp.decode(uniq[written])
            self.filled[uniq[written]] = True
        return k, v

    def kp_written(self, pages: torch.Tensor) -> torch.Tensor:
        """Pages holding compressed content (step > 0 somewhere: encode clamps steps >= 1e-6)."""
        return (self.kp.step[pages] != 0).any(-1)


@component("codec", "gear")
@dataclass(frozen=True)
class GearCodec(Codec):
    """GEAR (arXiv:2403.05527) on KIVI-style group quantization: keys per channel over a page's
    tokens, values per token in groups of `v_group` channels, `bits` bits, plus a rank-`rank`
    residual per page and the `outliers` fraction of entries kept exact. rank=0 and
    outliers=0 is plain group quantization (KIVI without its residual tail), GEAR's baseline.
    The pages holding the last `window` positions (and the open page) stay in full precision
    (`buffer_dtype`), KIVI's full-precision residual; window=0 keeps only the open page. So do
    the pages holding positions below `sink` (attention sinks); sink=0 pins none.

    Error bound (what the tests check): with no repair each entry is off by at most half a
    step, (max - min of its group) / (2 * (2**bits - 1)), plus fp16 rounding of the step; the
    low-rank term and the outliers only lower the Frobenius error of a page's residual.
    """

    bits: int = 4
    rank: int = 2
    outliers: float = 0.01      # fraction of a page's entries kept exact (per K and per V)
    v_group: int | None = None  # value channels per group; None: the whole head_dim
    buffer_dtype: str = "fp16"  # dtype of the full-precision staging buffer (open and window pages)
    window: int = 0             # most recent tokens per KV head kept in full precision (page granular)
    sink: int = 0               # first positions kept in full precision (page granular)

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"GearCodec.bits must be 2, 3, 4 or 8, got {self.bits!r}")
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"GearCodec.rank must be an int >= 0, got {self.rank!r}")
        if not isinstance(self.outliers, (int, float)) or not 0.0 <= self.outliers < 0.5:
            raise ValueError(f"GearCodec.outliers must be a fraction in [0, 0.5), got {self.outliers!r}")
        if self.v_group is not None and (not isinstance(self.v_group, int) or self.v_group < 1):
            raise ValueError(f"GearCodec.v_group must be None or an int >= 1, got {self.v_group!r}")
        for name, meaning in (("window", "recent tokens kept in full precision; 0: only the open page"),
                              ("sink", "first positions kept in full precision; 0: none")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"GearCodec.{name} must be an int >= 0 ({meaning}), got {value!r}")
        if self.buffer_dtype not in BUFFER_DTYPES:
            raise ValueError(f"GearCodec.buffer_dtype must be one of {sorted(BUFFER_DTYPES)}, "
                             f"got {self.buffer_dtype!r}")

    def make_storage(self, page_size: int, head_dim: int, dtype: torch.dtype,
                     device: torch.device) -> GearStorage:
        if (page_size * head_dim) % 8:
            raise ValueError(f"GearCodec needs page_size * head_dim to be a multiple of 8, "
                             f"got {page_size} * {head_dim}")
        group = min(self.v_group or head_dim, head_dim)
        if head_dim % group:
            raise ValueError(f"GearCodec.v_group={group} must divide head_dim={head_dim} "
                             f"(try one of {[g for g in (8, 16, 32, 64, 128) if head_dim % g == 0]})")
        if self.rank > min(page_size, head_dim):
            raise ValueError(f"GearCodec.rank={self.rank} exceeds min(page_size, head_dim) = "
                             f"{min(page_size, head_dim)}")
        if page_size * head_dim > 32767 and self.outliers:
            raise ValueError("GearCodec stores outlier indices as int16: page_size * head_dim must be "
                             f"< 32768, got {page_size * head_dim}")
        return GearStorage(page_size, head_dim, dtype, device, self)

    def bytes_per_page(self, page_size: int, head_dim: int) -> int:
        """Compressed bytes of one full page (K and V), staging (open and window pages) and fill
        mask excluded."""
        S, D = page_size, head_dim
        group = min(self.v_group or D, D)
        codes = S * D * self.bits // 8
        stats = 4 * D + 4 * S * (D // group)
        lowrank = 2 * self.rank * (S + D)
        outl = 4 * int(round(self.outliers * S * D))
        return 2 * codes + stats + 2 * lowrank + 2 * outl


@register("gear")
def gear(bits: int = 4, rank: int = 0, outliers: float = 0.01, v_group: int | None = None,
         buffer_dtype: str = "fp16", window: int = 32, sink: int = 16, page_size: int = 32) -> Policy:
    """GEAR (arXiv:2403.05527): dense reads over `bits`-bit K/V pages repaired by a rank-`rank`
    residual and `outliers` exact entries per page; the open page and the pages holding the
    last `window` or the first `sink` positions of each KV head stay full precision
    (`buffer_dtype`), as GEAR's streaming buffer does.

    The defaults are the best GEAR setting of `bench/results/gear_window_ppl.md`: rank 0 (on
    small pages the fp16 low-rank factors cost more bytes than they save error; give rank >= 1
    for GEAR's low-rank repair), a 32-token window and the 16 sink positions (each removes most
    of 4-bit's perplexity cost for a few pages) and 32-token pages (the per-channel key groups
    of a 16-token page cost half as much as its 4-bit codes)."""
    return Policy(codec=GearCodec(bits=bits, rank=rank, outliers=outliers, v_group=v_group,
                                  buffer_dtype=buffer_dtype, window=window, sink=sink),
                  page_size=page_size, name="gear")


@register("kivi")
def kivi(bits: int = 4, v_group: int | None = 32, buffer_dtype: str = "fp16", window: int = 0,
         sink: int = 0, page_size: int = 32) -> Policy:
    """Plain group quantization, GEAR's yardstick (KIVI, arXiv:2402.02750): keys per channel over
    a page's tokens, values per token in groups of `v_group` channels, no low-rank or outlier
    repair; the open page and the pages holding the last `window` (KIVI's residual) or the first
    `sink` positions stay full precision. 32-token pages by default: the per-channel key groups
    of a 16-token page cost half as much as its 4-bit codes."""
    return Policy(codec=GearCodec(bits=bits, rank=0, outliers=0.0, v_group=v_group,
                                  buffer_dtype=buffer_dtype, window=window, sink=sink),
                  page_size=page_size, name="kivi")


__all__ = ["GearCodec", "GearStorage", "pack_bits", "unpack_bits", "gear", "kivi"]
