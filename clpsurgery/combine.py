"""The combine on the CPU: each missing row is a weighted sum of source rows, in fp32.

The result is cast to the source dtype once, at the end; no float64 ever reaches a file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def combine_top_k(source_rows: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """out[r] = sum_j weights[r, j] * source_rows[positions[r, j]], accumulated in fp32.

    Source rows not already in fp32 are converted for this block only, the distinct ones it uses.
    """
    if positions.shape[0] == 0:
        return torch.empty((0, source_rows.shape[1]), dtype=out_dtype)
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
