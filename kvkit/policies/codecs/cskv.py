"""CSKV: keys and values cached in a low-rank channel space, a recent window full size.
arXiv:2409.10593.

Per layer and KV head, an encoder `E [r, D]` maps a token's key (value) to `r` coefficients
`c = E (x - mean)`; reading reconstructs `x_hat = mean + D c` with a decoder `D [D, r]`. The
bases come from calibration on activations (`kvkit.tools.calibrate_cskv`), not from the
projection weights' singular vectors, which lose far more on SmolLM2 (bench/results/NOTES.md):
keys are fitted in the metric of the queries that read them (so the attention logits are
kept), values in the metric of `o_proj` (so the layer output is kept). RoPE is applied before
caching in kvkit, so keys are calibrated and compressed *after* RoPE.

The most recent `window` tokens of each (sequence, KV head) stay full size (fp16) in a staging
buffer, CSKV's full-size window; so do the pages holding the first `sink` tokens (attention
sinks: atypical, heavily attended values that a calibrated basis reconstructs worst); older pages
hold only `r`-dim fp16 coefficients. The rank is
chosen per layer (one for keys, one for values) by the `cskv` builder: a share of the
channels, spread over layers by calibrated energy, or the smallest rank reaching an energy
threshold. Bases are a model constant shared by every store (like the weights), so they are
not in `store.nbytes()`; `bench/memory.py` reports them beside it.

Contract with the store: `PagedKVStore.append` writes `H*T` rows head-major (all tokens of KV
head 0, then head 1, ...), so a write of `n` rows carries `T = n / H` tokens per head; the
storage uses that to pick each page's head basis and to age its window. A write whose row
count is not a multiple of H raises ValueError. With several sequences in one store, each
sequence's append advances the window clock, so the window is shared among them, and the
sink tokens are the first `sink` tokens the storage receives (the first sequence's).

Shapes: L layers, H KV heads, N pages, U pages in a write, P pages read, S page_size,
D head_dim, r rank, M staging rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from kvkit.policies.base import Codec, Policy, Rule, component
from kvkit.policies.codecs.bases import load_bases
from kvkit.policies.codecs.staging import StagingRows
from kvkit.policies.registry import register

DATA = Path(__file__).resolve().parents[2] / "data"
SHIPPED = {"smollm2": DATA / "cskv_smollm2.safetensors"}


def bases_path(bases: str) -> Path:
    """A shipped name (`smollm2`) or a path to a bases file."""
    return SHIPPED.get(bases, Path(bases).expanduser())


@functools.lru_cache(maxsize=8)
def _load(path: str) -> dict[str, torch.Tensor]:
    return load_bases(path)


class CskvStorage(StagingRows):
    """One layer: fp16 coefficients `ck [N, S, rk]`, `cv [N, S, rv]`, the head of each page
    `page_head [N]` int8, slots written `filled [N, S]`, and fp16 full-size staging rows for
    pages still inside the window `stage_k/stage_v [M, S, D]` (`stage_row [N]`, -1 when none)."""

    def __init__(self, page_size: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 codec: CskvCodec):
        b = _load(str(bases_path(codec.bases)))
        L, H, D = b["k_mean"].shape
        if head_dim != D:
            raise ValueError(f"CSKV bases {codec.bases!r} are for head_dim={D}, the store has {head_dim}")
        if not 0 <= codec.layer < L:
            raise ValueError(f"CSKV bases {codec.bases!r} have {L} layers; layer={codec.layer} is out of range")
        l, rk, rv = codec.layer, codec.k_rank, codec.v_rank
        f = dict(device=device)
        self.H, self.S, self.D, self.dtype, self.device = H, page_size, D, dtype, device
        self.k_mean, self.v_mean = b["k_mean"][l].to(**f), b["v_mean"][l].to(**f)   # [H, D]
        self.k_enc, self.v_enc = b["k_enc"][l, :, :rk].to(**f), b["v_enc"][l, :, :rv].to(**f)  # [H, r, D]
        self.k_dec, self.v_dec = b["k_dec"][l, :, :, :rk].to(**f), b["v_dec"][l, :, :, :rv].to(**f)  # [H, D, r]
        self.ck = torch.zeros(0, page_size, rk, dtype=torch.float16, **f)
        self.cv = torch.zeros(0, page_size, rv, dtype=torch.float16, **f)
        self.page_head = torch.zeros(0, dtype=torch.int8, **f)
        self.filled = torch.zeros(0, page_size, dtype=torch.bool, **f)
        self._init_staging(page_size, D, torch.float16, device)
        self._init_window(codec.window)     # _pinned: pages holding attention-sink tokens
        self.sink = codec.sink

    # ---- PageStorage -------------------------------------------------------------------------
    def grow(self, num_pages: int) -> None:
        extra = num_pages - self.filled.shape[0]
        for name in ("ck", "cv", "page_head", "filled"):
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, t.new_zeros(extra, *t.shape[1:])]))
        self._grow_staging(extra)

    def write(self, pages: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        n = pages.shape[0]
        if n % self.H:
            raise ValueError(f"CSKV storage expects H*T rows head-major (H={self.H} KV heads), got {n} rows")
        T = n // self.H
        heads = torch.arange(n, device=pages.device) // T           # [n]
        ticks = self._clock + torch.arange(n, device=pages.device) % T + 1
        self._clock += T
        uniq, inv = pages.unique(return_inverse=True)               # [U], [n]
        self.page_head[pages] = heads.to(torch.int8)
        work_k, work_v = self._current(uniq)                        # [U, S, D] float32
        work_k[inv, slots] = k.float()
        work_v[inv, slots] = v.float()
        self.filled[pages, slots] = True
        newest = torch.zeros(uniq.shape[0], dtype=torch.int64, device=pages.device)
        newest.scatter_reduce_(0, inv, ticks, "amax")
        if bool((ticks <= self.sink).any()):
            self._pinned.update(pages[ticks <= self.sink].tolist())
        self._settle(uniq, work_k, work_v, newest)

    def read(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._decode(pages)
        rows = self.stage_row[pages].long()
        staged = rows >= 0
        if bool(staged.any()):
            k[staged] = self.stage_k[rows[staged]].float()
            v[staged] = self.stage_v[rows[staged]].float()
        return k.to(self.dtype), v.to(self.dtype)

    def copy_page(self, src: int, dst: int) -> None:
        for t in (self.ck, self.cv, self.page_head, self.filled):
            t[dst] = t[src]
        self._copy_staged(src, dst)

    def tensors(self) -> list[torch.Tensor]:
        return [self.ck, self.cv, self.page_head, self.filled, self.stage_row, self.stage_k, self.stage_v]

    # ---- internals -----------------------------------------------------------------------------
    def _decode(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct pages `[P]` from their coefficients: float32 `[P, S, D]` each."""
        P = pages.shape[0]
        k = torch.empty(P, self.S, self.D, device=self.device)
        v = torch.empty_like(k)
        heads = self.page_head[pages].long()
        for h in range(self.H):
            sel = (heads == h).nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            p = pages[sel]
            k[sel] = self.ck[p].float() @ self.k_dec[h].T + self.k_mean[h]   # [p, S, rk] @ [rk, D]
            v[sel] = self.cv[p].float() @ self.v_dec[h].T + self.v_mean[h]
        return k, v

    def _encode(self, pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        heads = self.page_head[pages].long()
        for h in range(self.H):
            sel = (heads == h).nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            self.ck[pages[sel]] = ((k[sel] - self.k_mean[h]) @ self.k_enc[h].T).half()  # [p, S, rk]
            self.cv[pages[sel]] = ((v[sel] - self.v_mean[h]) @ self.v_enc[h].T).half()

    def _current(self, uniq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.stage_row[uniq].long()
        staged = rows >= 0
        k, v = self._decode(uniq)   # compressed (or never written: junk, overwritten below)
        if bool(staged.any()):
            k[staged] = self.stage_k[rows[staged]].float()
            v[staged] = self.stage_v[rows[staged]].float()
        # a compressed page written again (slot reuse) comes back whole into the window: its
        # slots stay marked written, so it is re-encoded once it leaves the window again
        return k, v


@component("codec", "cskv")
@dataclass(frozen=True)
class CskvCodec(Codec):
    """CSKV low-rank channels for one layer: keys kept as `k_rank` coefficients, values as
    `v_rank`, the last `window` tokens per head full size. `bases` names a shipped calibration
    (`smollm2`) or a bases file path. Built per layer by the `cskv` builder.

    Error bound: an older token's key is its projection `mean + D E (k - mean)` up to fp16
    rounding of the coefficients; tokens inside the window are exact up to fp16.
    """

    bases: str = "smollm2"
    layer: int = 0
    k_rank: int = 32
    v_rank: int = 32
    window: int = 64
    sink: int = 4

    def __post_init__(self) -> None:
        for name in ("layer", "k_rank", "v_rank", "window", "sink"):
            value = getattr(self, name)
            low = 1 if name.endswith("rank") else 0
            if not isinstance(value, int) or value < low:
                raise ValueError(f"CskvCodec.{name} must be an int >= {low}, got {value!r}")
        if not isinstance(self.bases, str):
            raise ValueError(f"CskvCodec.bases must be a shipped name {sorted(SHIPPED)} or a path, got {self.bases!r}")

    def make_storage(self, page_size: int, head_dim: int, dtype: torch.dtype,
                     device: torch.device) -> CskvStorage:
        if max(self.k_rank, self.v_rank) > head_dim:
            raise ValueError(f"CskvCodec ranks ({self.k_rank}, {self.v_rank}) exceed head_dim={head_dim}")
        return CskvStorage(page_size, head_dim, dtype, device, self)


def layer_ranks(energy: torch.Tensor, ratio: float | None, threshold: float | None,
                allocate: str = "energy") -> list[int]:
    """Rank per layer from calibrated energies `[L, H, D]` (descending per head).

    ratio: the share of channels kept on average over layers; `allocate="energy"` spreads them
    where the normalized spectrum is largest, `"uniform"` gives every layer the same rank.
    threshold: the smallest rank whose energy (summed over heads) reaches this share.
    """
    L, H, D = energy.shape
    spec = energy.sum(1)                                       # [L, D]
    frac = spec / spec.sum(-1, keepdim=True).clamp(min=1e-30)  # normalized spectrum per layer
    if threshold is not None:
        cum = frac.cumsum(-1)
        return [int(min(D, (cum[l] < threshold - 1e-9).sum().item() + 1)) for l in range(L)]
    total = max(L, int(round(ratio * D * L)))
    if allocate == "uniform":
        return [max(1, min(D, int(round(ratio * D))))] * L
    # every layer keeps at least one channel; the rest go to the largest normalized eigenvalues
    rest = frac[:, 1:].reshape(-1)
    top = rest.topk(min(total - L, rest.numel())).indices
    ranks = torch.ones(L, dtype=torch.int64)
    ranks += torch.bincount(top // (D - 1), minlength=L)
    return [int(r) for r in ranks]


@register("cskv")
def cskv(ratio: float = 0.5, energy: float | None = None, window: int = 64, sink: int = 4,
         bases: str = "smollm2", allocate: str = "energy") -> Policy:
    """CSKV (arXiv:2409.10593): K/V cached as low-rank channel coefficients (calibrated on
    activations, post-RoPE keys), the last `window` tokens full size. `ratio` is the share of
    channels kept on average (spread over layers by energy, or `allocate="uniform"`); `energy`
    instead keeps per layer the smallest rank reaching that share of the calibrated energy.
    The pages holding the first `sink` tokens stay full size too (attention sinks: their
    values are atypical and heavily attended; projecting them costs most of the error)."""
    if energy is None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"cskv: ratio must be in (0, 1], got {ratio!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ValueError(f"cskv: energy must be in (0, 1], got {energy!r}")
    if allocate not in ("energy", "uniform"):
        raise ValueError(f"cskv: allocate must be 'energy' or 'uniform', got {allocate!r}")
    b = _load(str(bases_path(bases)))
    k_ranks = layer_ranks(b["k_energy"], ratio, energy, allocate)
    v_ranks = layer_ranks(b["v_energy"], ratio, energy, allocate)
    rules = tuple(Rule(layers=(l,), codec=CskvCodec(bases=bases, layer=l, k_rank=rk, v_rank=rv, window=window,
                                                   sink=sink))
                  for l, (rk, rv) in enumerate(zip(k_ranks, v_ranks)))
    return Policy(rules=rules, name="cskv")


__all__ = ["CskvCodec", "CskvStorage", "cskv", "layer_ranks", "bases_path"]
