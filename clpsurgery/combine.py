"""The combine on the CPU: each missing row is a weighted sum of source rows, in fp32.

The result is cast to the source dtype once, at the end; no float64 ever reaches a file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def combine_top_k(source_rows: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """out[r] = sum_j weights[r, j] * source_rows[positions[r, j]], accumulated in fp32."""
    if positions.shape[0] == 0:
        return torch.empty((0, source_rows.shape[1]), dtype=out_dtype)
    mixed = F.embedding_bag(
        positions,
        source_rows.to(torch.float32),
        mode="sum",
        per_sample_weights=weights.to(torch.float32),
    )
    return mixed.to(out_dtype)


def combine_dense(source_rows: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """out = weights @ source_rows over the whole overlap, accumulated in fp32."""
    return (weights.to(torch.float32) @ source_rows.to(torch.float32)).to(out_dtype)
