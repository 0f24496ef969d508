"""Full-precision rows for pages a compressing codec has not compressed yet (GEAR's recent
buffer, CSKV's recent window): a page -> row map and a pool of rows that grows by 1/8."""

from __future__ import annotations

import torch


class StagingRows:
    """Mixin for a PageStorage: `stage_k/stage_v [M, S, D]`, `stage_row [N]` (-1: not staged).

    Rows are few (the pages still open or inside the window), so the pool grows rarely and its
    bytes are counted with the storage's tensors.
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
