"""Full-precision rows for pages a compressing codec has not compressed yet (GEAR's open pages
and recent window, CSKV's recent window): a page -> row map, a pool of rows that grows by 1/8,
and the recent-window rule both codecs share.

The window rule: a storage keeps a clock (`_clock`; what it counts is the codec's: CSKV ticks
tokens per head, GEAR takes the tokens' positions) and, per staged page, the clock of its newest
token (`_newest`). A page is compressed once it is full (`filled` all set) and its newest token
is `window` or more ticks old, unless it is pinned (`_pinned`, CSKV's attention-sink pages).
The window is page-granular: a page keeps all its tokens exact while any of them is recent.
"""

from __future__ import annotations

import torch


class StagingRows:
    """Mixin for a PageStorage: `stage_k/stage_v [M, S, D]`, `stage_row [N]` (-1: not staged).

    Rows are few (the pages still open or inside the window), so the pool grows rarely and its
    bytes are counted with the storage's tensors. The window part (`_init_window`, `_settle`,
    `_flush`) needs the storage to have `filled [N, S]` (slots written) and to define
    `_encode(pages [U], k [U, S, D], v [U, S, D])` (float32), which compresses full pages.
    """

    def _init_staging(self, page_size: int, head_dim: int, dtype: torch.dtype, device) -> None:
        self.stage_row = torch.zeros(0, dtype=torch.int32, device=device)
        self.stage_k = torch.zeros(0, page_size, head_dim, dtype=dtype, device=device)
        self.stage_v = torch.zeros_like(self.stage_k)
        self._free_rows: list[int] = []

    def _grow_staging(self, extra_pages: int) -> None:
        self.stage_row = torch.cat([self.stage_row, self.stage_row.new_full((extra_pages,), -1)])

    def _stage(self, page: int) -> int:
        """The row holding `page`, taking a free one (growing the pool) if it has none."""
        row = int(self.stage_row[page])
        if row >= 0:
            return row
        if not self._free_rows:
            old = self.stage_k.shape[0]
            new = old + max(1, old // 8)
            pad = self.stage_k.new_zeros(new - old, *self.stage_k.shape[1:])
            self.stage_k = torch.cat([self.stage_k, pad])
            self.stage_v = torch.cat([self.stage_v, pad])
            self._free_rows = list(range(new - 1, old - 1, -1))
        row = self._free_rows.pop()
        self.stage_row[page] = row
        return row

    def _release_row(self, page: int) -> None:
        row = int(self.stage_row[page])
        if row >= 0:
            self._free_rows.append(row)
            self.stage_row[page] = -1

    # ---- the recent window -----------------------------------------------------------------------
    def _init_window(self, window: int) -> None:
        self.window = window
        self._clock = 0
        self._newest: dict[int, int] = {}  # staged page -> clock of its newest token
        self._pinned: set[int] = set()      # pages never compressed (CSKV's attention sinks)

    def _settle(self, uniq: torch.Tensor, work_k: torch.Tensor, work_v: torch.Tensor,
                newest: torch.Tensor) -> None:
        """After a write: pages `uniq` `[U]` now hold `work_k/work_v` `[U, S, D]` (float32), their
        newest tokens at clock `newest` `[U]`. Full pages already out of the window (most of a
        prefill) are compressed at once, the rest staged; then staged pages that left the
        window are compressed (`_flush`)."""
        pinned = torch.tensor([p in self._pinned for p in uniq.tolist()], dtype=torch.bool,
                              device=uniq.device)
        done = self.filled[uniq].all(-1) & (self._clock - newest >= self.window) & ~pinned  # [U]
        if bool(done.any()):
            self._encode(uniq[done], work_k[done], work_v[done])
            for p in uniq[done].tolist():
                self._unstage(p)
        for i in (~done).nonzero(as_tuple=True)[0].tolist():
            row = self._stage(int(uniq[i]))
            self.stage_k[row] = work_k[i].to(self.stage_k.dtype)
            self.stage_v[row] = work_v[i].to(self.stage_v.dtype)
            self._newest[int(uniq[i])] = int(newest[i])
        self._flush()

    def _flush(self) -> None:
        """Compress the full staged pages whose newest token left the window."""
        old = [p for p, t in self._newest.items() if self._clock - t >= self.window and p not in self._pinned]
        if not old:
            return
        cand = torch.tensor(old, dtype=torch.int64, device=self.stage_row.device)
        cand = cand[self.filled[cand].all(-1)]
        if cand.numel() == 0:
            return
        rows = self.stage_row[cand].long()
        self._encode(cand, self.stage_k[rows].float(), self.stage_v[rows].float())
        for p in cand.tolist():
            self._unstage(p)

    def forget(self, pages: torch.Tensor) -> None:
        """Pages back in the free pool (the store calls this): no slot counts as written and no
        staging row, clock or pin stays, so a page's next owner starts from an open page."""
        self.filled[pages] = False
        for page in pages.tolist():
            self._unstage(page)

    def _unstage(self, page: int) -> None:
        self._release_row(page)
        self._newest.pop(page, None)
        self._pinned.discard(page)

    def _copy_staged(self, src: int, dst: int) -> None:
        """Page `dst` takes `src`'s staging row content, clock and pin (or is unstaged)."""
        row = int(self.stage_row[src])
        if row < 0:
            self._unstage(dst)
            return
        new = self._stage(dst)
        self.stage_k[new], self.stage_v[new] = self.stage_k[row], self.stage_v[row]
        if src in self._newest:
            self._newest[dst] = self._newest[src]
        if src in self._pinned:
            self._pinned.add(dst)
