"""The combine on the CPU: each missing row is a weighted sum of source rows, in fp32.

The result is cast to the source dtype once, at the end; no float64 ever reaches a file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Columns per block of ColumnBlocks: 64 fp32 columns of 6,368 to 20,000 rows (1.6-5 MiB) stay in
# a core's cache while every output row of a block takes its slice.
COLUMN_BLOCK = 64


@dataclass(frozen=True)
class ColumnBlocks:
    """Source rows in fp32, laid out as column blocks: blocks[b] is columns [64 b, 64 b + 64) of
    every row, contiguous (the last block zero-padded). The top-k combine gathers from one block
    at a time, so its random row reads hit the cache (docs/design.md, the combine); the sums,
    each over k in the same order, are bit-identical to those from the plain [n, h] table."""

    blocks: torch.Tensor  # [ceil(width / COLUMN_BLOCK), rows, COLUMN_BLOCK] fp32
    width: int

    @classmethod
    def of(cls, rows: torch.Tensor) -> ColumnBlocks:
        n, width = rows.shape
        count = -(-width // COLUMN_BLOCK)
        blocks = torch.zeros((count, n, COLUMN_BLOCK), dtype=torch.float32)
        for b in range(count):
            part = rows[:, b * COLUMN_BLOCK : (b + 1) * COLUMN_BLOCK]
            blocks[b, :, : part.shape[1]] = part
        return cls(blocks, width)

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[1], self.width

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() * 4


def combine_top_k(source_rows: torch.Tensor | ColumnBlocks, positions: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """out[r] = sum_j weights[r, j] * source_rows[positions[r, j]], accumulated in fp32.

    Source rows not already in fp32 (or ColumnBlocks) are converted for this block only, the
    distinct ones it uses.
    """
    if positions.shape[0] == 0:
        return torch.empty((0, source_rows.shape[1]), dtype=out_dtype)
    if isinstance(source_rows, ColumnBlocks):
        weights = weights.to(torch.float32)
        blocks = source_rows.blocks
        mixed = torch.empty((positions.shape[0], blocks.shape[0] * COLUMN_BLOCK), dtype=torch.float32)
        for b in range(blocks.shape[0]):
            mixed[:, b * COLUMN_BLOCK : (b + 1) * COLUMN_BLOCK] = F.embedding_bag(positions, blocks[b], mode="sum", per_sample_weights=weights)
        return mixed[:, : source_rows.width].to(out_dtype)
    if source_rows.dtype == torch.float32:
        rows32, local = source_rows, positions
    else:
        used, local = torch.unique(positions, return_inverse=True)
        rows32, local = source_rows[used].to(torch.float32), local.reshape(positions.shape)
    mixed = F.embedding_bag(
        local,
        rows32,
        mode="sum",
        per_sample_weights=weights.to(torch.float32),
    )
    return mixed.to(out_dtype)


def combine_dense(source_rows: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype, chunk_rows: int = 4096) -> torch.Tensor:
    """out = weights @ source_rows over the whole overlap, accumulated in fp32, on the rows' device:
    besides the weights and the fp32 output, one chunk of rows in fp32 is held at once."""
    device = source_rows.device
    weights = weights.to(device=device, dtype=torch.float32)
    out = torch.zeros((weights.shape[0], source_rows.shape[1]), dtype=torch.float32, device=device)
    for start in range(0, source_rows.shape[0], chunk_rows):
        stop = min(start + chunk_rows, source_rows.shape[0])
        out.addmm_(weights[:, start:stop], source_rows[start:stop].to(torch.float32))
    return out.to(out_dtype)
